"""`torchgc run` with an executable in front of the script (issue 22, item 6; fails until the fix):
`torchgc run python train.py` stops today with "is not a Python script", and `torchgc run
/path/to/python train.py` dies with a SyntaxError (it runs the interpreter binary as a script).
Any executable must run, with the Python processes it starts patched through the environment, as
torchrun's workers already are."""

import os
import sys
from pathlib import Path

import pytest

from process_helpers import run_bounded

PROBE = ("import sys\nfrom transformers import PreTrainedModel\n"
         "open(sys.argv[1], 'w').write(PreTrainedModel.gradient_checkpointing_enable.__module__)\n")


@pytest.mark.parametrize("program", ["python", "interpreter path", "shell script"])
def test_the_script_behind_an_executable_runs_patched(tmp_path, program):
    (tmp_path / "probe.py").write_text(PROBE)
    out = tmp_path / "out.txt"
    (tmp_path / "run.sh").write_text(f'#!/bin/sh\nexec python "{tmp_path / "probe.py"}" "$1"\n')
    (tmp_path / "run.sh").chmod(0o755)
    executable = {"python": ["python", str(tmp_path / "probe.py")], "interpreter path": [sys.executable, str(tmp_path / "probe.py")],
                  "shell script": [str(tmp_path / "run.sh")]}[program]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHGC_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # `python` is this environment's
    done = run_bounded([sys.executable, "-m", "torchgc", "run", "--strategy", "checkpoint", *executable, str(out)], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_text() == "torchgc.patching"
