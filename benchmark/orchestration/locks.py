"""One lock per job in the results folder, taken by the job process itself (every launcher gets it).

Two sweeps on one results folder (two local runs, two SLURM submissions, or one of each) run
each job once: a job that finds its lock held exits without running and without a record.

The lock is ``fcntl.flock`` on ``runs/.locks/<job>.lock``. The kernel releases it when its
process ends, however it ends (SIGKILL, OOM kill, ``scancel``), so a killed job never leaves a
stale lock and no pid or host has to be checked. On a local disk and on NFS (Linux clients
emulate flock with NFS byte-range locks, v3 through lockd, v4 natively) the lock holds across
machines; a node that dies holding it releases it when the server's lease (v4) or lockd recovery
(v3) ends. Lustre needs the client mount option ``flock`` (``localflock`` locks per node only);
BeeGFS locks per node unless ``tuneUseGlobalFileLocks`` is set. Where flock is refused
(ENOLCK, EOPNOTSUPP), the job runs unlocked with a warning, as SLURM jobs did before.
The file holds who took it (host, pid, SLURM job), for the message of the one refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

#: Under ``<results>/runs/``: one ``<job>.lock`` per running job.
LOCKS_FOLDER = ".locks"
#: Exit code of a job process that did not run: its lock was held, or its record was finished.
SKIPPED_EXIT_CODE = 75  # EX_TEMPFAIL: try again later
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def lock_path(runs_dir: Path, job_id: str) -> Path:
    return Path(runs_dir) / LOCKS_FOLDER / f"{job_id}.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (just starting)"
    slurm = f", SLURM job {info['slurm_job']}" if info.get("slurm_job") else ""
    return f"{info.get('host')} pid {info.get('pid')}{slurm}"


@contextlib.contextmanager
def job_lock(runs_dir: Path, job_id: str) -> Iterator[str | None]:
    """Hold job ``job_id``'s lock for the ``with`` block: yields ``None`` when held, else who holds it.

    The file is removed on release (while still locked); a process that opened it just before
    then finds it unlinked and tries again, so two processes never hold two files of one name.
    """
    path = lock_path(runs_dir, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(path, job_id)
    if isinstance(fd, str):
        yield fd
        return
    if fd is None:  # flock refused by the file system: unlocked, as said
        yield None
        return
    try:
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        slurm_job = (
            f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
            if array
            else os.environ.get("SLURM_JOB_ID")
        )
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
            "slurm_job": slurm_job,
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _lock(path: Path, job_id: str) -> int | str | None:
    """The locked file's descriptor; who holds it (str); or None where flock is unsupported."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return _holder(path)
        except OSError as error:
            os.close(fd)
            if error.errno not in _UNSUPPORTED:
                raise
            print(
                f"[job] warning: the file system of {path.parent} refuses flock ({error.strerror}): "
                f"{job_id} runs unlocked, so two sweeps on this folder may both run it",
                file=sys.stderr,
            )
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # released and removed by its holder after we opened it: lock the new file


__all__ = ["LOCKS_FOLDER", "SKIPPED_EXIT_CODE", "job_lock", "lock_path"]
