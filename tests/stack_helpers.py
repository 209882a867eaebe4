"""Shared by the tests of training stacks (tests/test_stacks_*.py): `torchgc run --report` of a
launcher, and the reports of the workers it started."""

import json
import shutil
import sys
from pathlib import Path

from process_helpers import run_bounded

# gloo's threads sometimes abort a worker at exit after training has finished, with or without
# torchgc (see tests/test_cli.py): that abort, and only it, gets one more try.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def torchgc_launch(program, report: Path, cwd: Path, env: dict):
    """Runs `torchgc run --report REPORT program...` and asserts that it succeeded."""
    command = [sys.executable, "-m", "torchgc", "run", "--report", str(report), *program]
    done = run_bounded(command, cwd=cwd, env=env)
    if done.returncode != 0 and GLOO_EXIT_ABORT in done.stderr:
        shutil.rmtree(report, ignore_errors=True)
        done = run_bounded(command, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr[-5000:]


def worker_reports(report: Path) -> dict:
    """{rank: report} of the processes that ran under torchrun or the deepspeed launcher."""
    found = [json.loads(p.read_text()) for p in report.glob("torchgc-*.json")]
    return {r["rank"]: r for r in found if r["rank"] is not None}
