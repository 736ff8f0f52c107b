"""Run a sweep's jobs: one process per job, N at a time, resumable, failures recorded.

Scheduling: each concurrent "slot" owns a group of devices. With N GPUs and one
device per job there are N slots, each job pinned to its GPU through
``CUDA_VISIBLE_DEVICES``; a DDP job (``devices_per_job`` > 1) gets a group of
GPUs. On a CPU-only machine the same code runs ``parallel`` jobs at once (1 by
default), splitting the cores between them.

Every job runs in its own process (``python -m adbench.benchmark.orchestration.job``): a crash, a NaN
or an out-of-memory kill ends that job only. A job's record is written
atomically; a job whose record is ``ok`` (or ``warning``) and whose fingerprint
(method config, category, seed, overrides, the source of the code it runs, the
device kind and CPU threads) is unchanged is skipped on the next run, so a killed
sweep resumes where it stopped and never reuses a record of other code. Each job process takes
its own lock (:mod:`.locks`), so two sweeps on one results folder run each job once.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import torch
from tqdm.auto import tqdm

from adbench.benchmark.orchestration.environment import cpu_signature, other_cpu
from adbench.benchmark.orchestration.locks import SKIPPED_EXIT_CODE
from adbench.benchmark.orchestration.records import (
    FINISHED,
    LAUNCH_TOKEN_VARIABLE,
    LAUNCHED_AT_VARIABLE,
    RUNS_FOLDER,
    read_record,
    write_json_atomic,
)
from adbench.benchmark.orchestration.sweep import JobSpec
from adbench.project import project_root

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when the runner dies, so a killed sweep leaves no orphan jobs."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def record_path(results_dir: Path, spec: JobSpec) -> Path:
    return results_dir / RUNS_FOLDER / f"{spec.job_id}.json"


def is_finished(results_dir: Path, spec: JobSpec, retry_failed: bool = True) -> bool:
    record = read_record(record_path(results_dir, spec))
    if record is None or record.get("fingerprint") != spec.fingerprint():
        return False
    return record.get("status") in FINISHED or (record.get("status") == "failed" and not retry_failed)


def _warn_other_cpu(results_dir: Path, done: list[JobSpec]) -> None:
    """Say when skipped records were made on another CPU: the fingerprint does not name the CPU, and
    an unpinned model trained from scratch can move by several points between instruction sets."""
    here = cpu_signature()
    other = {}
    for spec in done:
        differs = other_cpu((read_record(record_path(results_dir, spec)) or {}).get("environment") or {}, here)
        if differs:
            other[spec.job_id] = differs
    if other:
        keys = sorted({k for differs in other.values() for k in differs})
        print(f"[sweep] warning: {len(other)} of the skipped jobs ran on another CPU ({', '.join(keys)} differ, "
              f"e.g. {next(iter(other))}); their numbers will sit beside this machine's, and an unpinned model "
              "trained from scratch can move by several points between CPUs (results/reproducibility.md). "
              "Delete their records to rerun them here, or pin the whole sweep with --cpu-isa AVX2.")


def execution_of(slot: dict[str, str]) -> dict[str, Any]:
    """What a slot runs on, as far as it changes a result: the device kind and the CPU threads."""
    visible = slot.get("CUDA_VISIBLE_DEVICES", "")
    if visible and torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(int(visible.split(",")[0])), "devices": len(visible.split(","))}
    return {"device": "cpu", "threads": int(slot.get("OMP_NUM_THREADS") or torch.get_num_threads())}


def device_slots(devices_per_job: int, parallel: int | None, accelerator: str = "auto") -> list[dict[str, str]]:
    """Environment of each concurrent slot: a GPU group each, or CPU threads each."""
    gpus = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 0
    if gpus:
        groups = [list(range(i, i + devices_per_job)) for i in range(0, gpus - devices_per_job + 1, devices_per_job)]
        if not groups:
            raise ValueError(f"devices_per_job={devices_per_job} but only {gpus} GPU(s) are visible")
        groups = groups[: parallel or len(groups)]
        return [{"CUDA_VISIBLE_DEVICES": ",".join(map(str, g))} for g in groups]
    slots = parallel or 1
    threads = max(1, (os.cpu_count() or 1) // (slots * devices_per_job))
    return [{"OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""} for _ in range(slots)]


@dataclass
class _Running:
    spec: JobSpec
    process: subprocess.Popen
    env: dict[str, str]
    started: float
    log_path: Path
    tail: deque = field(default_factory=lambda: deque(maxlen=60))
    log: IO[bytes] | None = None
    token: str = ""
    timed_out_after: float | None = None  # seconds, when the runner stopped it for its time limit


def _pump(stream: IO[bytes], log: IO[bytes], tail: deque, echo: bool) -> None:
    """Copy a job's output to its log (and the terminal when it runs alone), keeping the last lines."""
    for line in iter(stream.readline, b""):
        log.write(line)
        log.flush()
        tail.append(line.decode(errors="replace").rstrip())
        if echo:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()


def _describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (killed: likely out of memory)" if code == -signal.SIGKILL else ""
        return f"process ended by {name}{hint}"
    return f"process exited with code {code} without writing a record"


def run_jobs(
    jobs: list[JobSpec],
    results_dir: str | Path,
    slots: list[dict[str, str]],
    retry_failed: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    job_timeout_min: float | None = None,
) -> list[dict[str, Any]]:
    """Run the unfinished jobs; return the records of the jobs run now.

    ``job_timeout_min``: a job still running after that many minutes is stopped (SIGTERM,
    then SIGKILL 10 s later) and recorded as failed with that reason, so one hung job
    cannot hang the sweep; None: no limit.
    """
    results_dir = Path(results_dir)
    # Every slot of a sweep is of one kind (same GPU model, same share of the cores).
    jobs = [replace(j, execution=execution_of(slots[0])) for j in jobs]
    finished_before = [is_finished(results_dir, j, retry_failed) for j in jobs]
    done = [j for j, f in zip(jobs, finished_before, strict=True) if f]
    pending = deque(j for j, f in zip(jobs, finished_before, strict=True) if not f)
    if done:
        print(f"[sweep] {len(done)} of {len(jobs)} job(s) already finished: skipped")
        _warn_other_cpu(results_dir, done)
    free = list(slots)
    running: list[_Running] = []
    finished: list[dict[str, Any]] = []
    echo = len(slots) == 1
    spec_dir = results_dir / "jobs" / "_specs"
    spec_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(pending), desc="sweep", unit="job", position=0, dynamic_ncols=True, disable=not pending)
    failures = 0
    try:
        while pending or running:
            while pending and free:
                spec = pending.popleft()
                if is_finished(results_dir, spec, retry_failed):  # finished by another sweep meanwhile
                    bar.update(1)
                    continue
                slot = free.pop(0)
                spec_path = write_json_atomic(spec_dir / f"{spec.job_id}.json", asdict(spec))
                log_path = results_dir / "logs" / f"{spec.job_id}.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                token = uuid.uuid4().hex
                env = {**os.environ, **slot, "PYTHONUNBUFFERED": "1", LAUNCH_TOKEN_VARIABLE: token,
                       LAUNCHED_AT_VARIABLE: repr(time.time())}  # fmt: skip
                process = subprocess.Popen(
                    [sys.executable, "-m", "adbench.benchmark.orchestration.job", str(spec_path), str(record_path(results_dir, spec))],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent, cwd=project_root(),
                )
                job = _Running(spec, process, slot, time.time(), log_path, token=token)
                job.log = open(log_path, "wb")  # noqa: SIM115 - closed when the job ends
                threading.Thread(target=_pump, args=(process.stdout, job.log, job.tail, echo), daemon=True).start()
                running.append(job)
                bar.set_postfix_str(f"running {', '.join(r.spec.job_id for r in running)}")
            time.sleep(0.2)
            if job_timeout_min is not None:
                for job in running:
                    _enforce_time_limit(job, job_timeout_min * 60.0)
            for job in [r for r in running if r.process.poll() is not None]:
                running.remove(job)
                free.append(job.env)
                job.process.wait()
                time.sleep(0.05)  # let the pump thread drain the last lines
                job.log.close()
                bar.update(1)
                if job.process.returncode == SKIPPED_EXIT_CODE and job.timed_out_after is None:
                    # The job's own lock (locks.py): another sweep on this folder runs it, or has run it.
                    said = next((line for line in reversed(job.tail) if line.startswith("[job]")), "")
                    tqdm.write(f"[sweep] skipped {job.spec.job_id}: {said.partition('skipped, ')[2] or said}; "
                               "its record is the other sweep's")
                    continue
                record = _collect(results_dir, job)
                finished.append(record)
                failures += record["status"] not in FINISHED
                if on_record:
                    on_record(record)
                bar.set_postfix_str(f"failed {failures}" if failures else "")
                tqdm.write(_summary(record, time.time() - job.started))
    finally:
        for job in running:  # interrupted (Ctrl-C): stop the children (the kernel frees their locks)
            job.process.kill()
        bar.close()
    return finished


def _enforce_time_limit(job: _Running, limit_s: float) -> None:
    elapsed = time.time() - job.started
    if job.timed_out_after is None and elapsed > limit_s:
        job.timed_out_after = elapsed
        tqdm.write(f"[sweep] {job.spec.job_id}: past its {limit_s / 60:g} min limit (job_timeout_min): stopping it")
        job.process.terminate()
    elif job.timed_out_after is not None and elapsed > job.timed_out_after + 10.0:
        job.process.kill()  # SIGTERM was ignored (e.g. stuck in native code)


def _collect(results_dir: Path, job: _Running) -> dict[str, Any]:
    path = record_path(results_dir, job.spec)
    record = read_record(path)
    if job.timed_out_after is not None:
        error = (f"timed out: stopped after {job.timed_out_after / 60:.1f} min "
                 f"(job_timeout_min; {_describe_exit(job.process.returncode)})")
    elif record is not None and record.get("launch_token") == job.token:  # written by this launch
        return record
    else:  # the process died without a record (segfault, OOM kill)
        error = _describe_exit(job.process.returncode)
    # Record the failure ourselves (a timed-out job's own partial record, if any, is replaced).
    record = {
        **asdict(job.spec), "job_id": job.spec.job_id, "fingerprint": job.spec.fingerprint(),
        "status": "failed", "error": error,
        "traceback": "\n".join(job.tail), "log": str(job.log_path),
    }
    write_json_atomic(path, record)
    return record


def _summary(record: dict[str, Any], seconds: float) -> str:
    if record["status"] not in FINISHED:
        return f"[sweep] FAILED {record['job_id']} after {seconds:.0f}s: {record['error']}"
    metrics = record.get("metrics", {})
    shown = " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float))
    warned = f" WARNING: {'; '.join(record['warnings'])}" if record.get("warnings") else ""
    return f"[sweep] done {record['job_id']} in {seconds:.0f}s: {shown}{warned}"
