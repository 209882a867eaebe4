"""Shared by the tests of training stacks (tests/test_stacks_*.py): `torchgc run --report` of a
launcher, and the reports of the workers it started."""

import json
import sys
from pathlib import Path

from process_helpers import run_launcher


def torchgc_launch(program, report: Path, cwd: Path, env: dict):
    """Runs `torchgc run --report REPORT program...` and asserts that it succeeded."""
    command = [sys.executable, "-m", "torchgc", "run", "--report", str(report), *program]
    done = run_launcher(command, cwd=cwd, env=env, outputs=[report])
    assert done.returncode == 0, done.stderr[-5000:]


def worker_reports(report: Path) -> dict:
    """{rank: report} of the processes that ran under torchrun or the deepspeed launcher."""
    found = [json.loads(p.read_text()) for p in report.glob("torchgc-*.json")]
    return {r["rank"]: r for r in found if r["rank"] is not None}
