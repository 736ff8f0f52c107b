"""The per-job lock every launcher's jobs take (benchmark/orchestration/locks.py), across processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from adbench.benchmark.orchestration.locks import job_lock, lock_path

from .conftest import REPO

#: Another process: tries the lock, prints who holds it (or "held"), then waits for a line on stdin.
_OTHER = """
import sys
from adbench.benchmark.orchestration.locks import job_lock
with job_lock(sys.argv[1], "job") as holder:
    print(holder or "held", flush=True)
    sys.stdin.readline()
"""


def _other(runs: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _OTHER, str(runs)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip


def test_one_of_two_processes_gets_the_lock_and_it_is_released(tmp_path: Path) -> None:
    with job_lock(tmp_path, "job") as holder:
        assert holder is None
        other = _other(tmp_path)
        refused = other.stdout.readline().strip()
        other.communicate("\n", timeout=30)
        assert refused == f"{socket.gethostname()} pid {os.getpid()}", "told who holds it"
        with job_lock(tmp_path, "other-job") as unrelated:
            assert unrelated is None, "one lock per job"
    assert not lock_path(tmp_path, "job").exists(), "released and removed"
    other = _other(tmp_path)
    assert other.stdout.readline().strip() == "held"
    other.communicate("\n", timeout=30)


def test_a_killed_holders_lock_is_taken_over(tmp_path: Path) -> None:
    holder = _other(tmp_path)
    assert holder.stdout.readline().strip() == "held"
    with job_lock(tmp_path, "job") as refused:
        assert refused == f"{socket.gethostname()} pid {holder.pid}"
    # No cleanup runs: the file stays, the kernel drops the lock.
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert lock_path(tmp_path, "job").exists()
    with job_lock(tmp_path, "job") as taken:
        assert taken is None
