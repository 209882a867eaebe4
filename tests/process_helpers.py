"""Shared by the tests that start processes of their own (launchers, torchrun workers, LLaMA-Factory)."""

import os
import shutil
import signal
import socket
import subprocess

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bounded(command, cwd, env, timeout=420) -> subprocess.CompletedProcess:
    """Runs command in its own process group; on timeout the whole group is killed, so no worker
    is left behind, and the test fails."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{command[:6]} timed out after {timeout} s; stderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


# gloo's threads sometimes abort a worker at exit after training has finished, with or without
# torchgc, even after destroy_process_group (seen in make test, never when a test runs alone).
GLOO_EXIT_ABORT = "terminate called without an active exception"


def run_launcher(command, cwd, env, outputs=()) -> subprocess.CompletedProcess:
    """run_bounded for a launcher of gloo workers: that abort, and only it, gets one more try, after
    the folders in `outputs` are removed."""
    done = run_bounded(command, cwd=cwd, env=env)
    if done.returncode != 0 and GLOO_EXIT_ABORT in done.stderr:
        for folder in outputs:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
        done = run_bounded(command, cwd=cwd, env=env)
    return done
