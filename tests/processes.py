"""Subprocesses that tests start in a session of their own, so a hung one is killed whole."""
import os
import signal
import subprocess

import pytest


def run_until_exit(cmd: list, timeout: float, **popen) -> tuple[int, str]:
    """Run `cmd` (Popen keyword arguments in `popen`) in a new session: (exit status, its
    stdout and stderr as text). After `timeout` s its whole process group is killed and the
    test fails, showing the end of the output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{cmd[:4]} did not finish in {timeout} s:\n{output[-4000:]}")
    return proc.returncode, output


def run_to_the_end(cmd: list, timeout: float, **popen) -> str:
    """run_until_exit, which must end with status 0: the output (else the test fails,
    showing its end)."""
    code, output = run_until_exit(cmd, timeout, **popen)
    assert code == 0, output[-4000:]
    return output
