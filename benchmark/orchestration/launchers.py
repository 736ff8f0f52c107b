"""Where a sweep's jobs run: this machine's process pool (``local``) or a SLURM cluster (``slurm``).

Both run the same job code (:func:`adbench.benchmark.orchestration.job.main`), write the same records with the
same resume rule (:func:`adbench.benchmark.orchestration.runner.is_finished`) and feed the same leaderboard.
The job takes its own lock (:mod:`.locks`), so two submissions of one sweep run each job once.

SLURM goes through submitit (one job array per sweep, one array task per unfinished job):

    python -m adbench.benchmark.run --sweep configs/sweeps/mvtec.yaml --launcher slurm \\
        --slurm partition=gpu --slurm gpus_per_job=1 --slurm time_min=720

While the array runs (``--no-wait`` returns at once), ``python -m adbench.benchmark.run ...
--leaderboard-only`` rebuilds the leaderboard from the records already written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from adbench.benchmark.orchestration.locks import SKIPPED_EXIT_CODE
from adbench.benchmark.orchestration.records import FINISHED, read_record, write_json_atomic
from adbench.benchmark.orchestration.runner import (
    device_slots,
    is_finished,
    record_path,
    run_jobs,
)
from adbench.benchmark.orchestration.sweep import JobSpec, SweepConfigError


@dataclass
class SlurmSettings:
    """sbatch resources of every array task (sweep YAML key ``slurm`` or ``--slurm key=value``)."""

    partition: str | None = None
    account: str | None = None
    time_min: int = 60
    gpus_per_job: int = 0
    cpus_per_job: int = 2
    mem_gb: float = 8
    array_parallelism: int = 64
    #: any other sbatch option, e.g. {"qos": "high", "constraint": "a100"}
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SlurmSettings:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise SweepConfigError(f"unknown slurm setting(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**values)

    def executor_parameters(self) -> dict[str, Any]:
        parameters: dict[str, Any] = {
            "timeout_min": self.time_min, "cpus_per_task": self.cpus_per_job, "mem_gb": self.mem_gb,
            "slurm_array_parallelism": self.array_parallelism, "tasks_per_node": 1, "nodes": 1,
        }  # fmt: skip
        if self.gpus_per_job:
            parameters["slurm_gres"] = f"gpu:{self.gpus_per_job}"
        if self.partition:
            parameters["slurm_partition"] = self.partition
        if self.account:
            parameters["slurm_account"] = self.account
        if self.extra:
            parameters["slurm_additional_parameters"] = dict(self.extra)
        return parameters

    def execution(self) -> dict[str, Any]:
        """The fingerprint's view of where a task runs (see JobSpec.execution)."""
        return {"device": "slurm", "partition": self.partition, "gpus": self.gpus_per_job, "threads": self.cpus_per_job}


class SlurmTask:
    """One array task: the job, exactly as the local runner starts it (in this process).

    Preemption and time limits: submitit asks SLURM for a warning signal (USR2, 90 s before
    the limit, and on preemption); on it, submitit calls :meth:`checkpoint`, which saves the
    running job's full training state (:func:`adbench.benchmark.orchestration.job.save_for_requeue`), then requeues
    the task with the same arguments and ends this attempt. The next attempt resumes
    training from that file and writes the job's one record. Lightning's own SLURM
    auto-requeue is switched off in the job (only one of the two may act). A task past its
    limit too often, or killed, ends with a failed record naming SLURM's reason.
    """

    def __call__(self, spec_path: str, record_path_: str) -> dict[str, Any]:
        """The job's outcome: ``skipped`` when another submission runs it or has run it (its lock)."""
        from adbench.benchmark.orchestration import job

        code = job.main([spec_path, record_path_])
        return {"record": record_path_, "skipped": code == SKIPPED_EXIT_CODE}

    def checkpoint(self, spec_path: str, record_path_: str) -> Any:
        import submitit

        from adbench.benchmark.orchestration import job

        job.save_for_requeue()
        return submitit.helpers.DelayedSubmission(self, spec_path, record_path_)


def run_local(jobs: list[JobSpec], results_dir: Path, sweep: Any, **_: Any) -> list[dict[str, Any]]:
    slots = device_slots(sweep.devices_per_job, sweep.parallel, sweep.accelerator)
    return run_jobs(jobs, results_dir, slots, retry_failed=sweep.retry_failed,
                    job_timeout_min=sweep.job_timeout_min)


def run_slurm(jobs: list[JobSpec], results_dir: Path, sweep: Any, wait: bool = True,
              poll_seconds: float = 2.0, slurm: SlurmSettings | None = None) -> list[dict[str, Any]]:
    """Submit the unfinished jobs as one array; with ``wait``, collect their records.
    ``slurm``: the sweep's settings, when the caller has built them already."""
    import submitit

    logging.getLogger("submitit").setLevel(logging.ERROR)  # "sacct error" warnings where accounting is off
    settings = slurm or SlurmSettings.from_dict(sweep.slurm or {})
    jobs = [replace(j, execution=settings.execution()) for j in jobs]
    pending = [j for j in jobs if not is_finished(results_dir, j, sweep.retry_failed)]
    print(f"[slurm] {len(pending)} of {len(jobs)} job(s) to run ({len(jobs) - len(pending)} finished)")
    if not pending:
        return []
    specs = results_dir / "jobs" / "_specs"
    specs.mkdir(parents=True, exist_ok=True)
    spec_paths, record_paths = [], []
    for spec in pending:
        path = specs / f"{spec.job_id}.json"
        path.write_text(json.dumps(asdict(spec)))
        spec_paths.append(str(path))
        record_paths.append(str(record_path(results_dir, spec)))
    executor = submitit.AutoExecutor(folder=results_dir / "slurm" / "%j", cluster="slurm")
    executor.update_parameters(name=f"adbench-{sweep.name}", **settings.executor_parameters())
    submitted_at = time.time()
    tasks = executor.map_array(SlurmTask(), spec_paths, record_paths)
    print(f"[slurm] submitted array {tasks[0].job_id.split('_')[0]} ({len(tasks)} task(s)); "
          f"logs under {results_dir / 'slurm'}")
    if not wait:
        print("[slurm] not waiting: rebuild the leaderboard any time with --leaderboard-only")
        return []
    return _collect(pending, tasks, results_dir, submitted_at, poll_seconds)


def _collect(pending: list[JobSpec], tasks: list[Any], results_dir: Path, submitted_at: float,
             poll_seconds: float) -> list[dict[str, Any]]:
    records: dict[str, dict[str, Any] | None] = {}
    with tqdm(total=len(tasks), desc="slurm", unit="job") as bar:
        while len(records) < len(tasks):
            for spec, task in zip(pending, tasks, strict=True):
                if spec.job_id in records or not task.done():
                    continue
                bar.update(1)
                record = read_record(record_path(results_dir, spec))
                if _skipped(task):  # another submission's task runs it (or ran it): its record, if any
                    records[spec.job_id] = record if record and record.get("status") in FINISHED else None
                    tqdm.write(f"[slurm] skipped {spec.job_id}: run by another submission on this folder "
                               f"({task.paths.stdout})")
                    continue
                if record is None or (record.get("started_unix") or 0) < submitted_at:
                    record = _failed_without_record(spec, task, results_dir)
                records[spec.job_id] = record
                status = record.get("status")
                tqdm.write(f"[slurm] {'done' if status in FINISHED else 'FAILED'} {spec.job_id}"
                           + ("" if status in FINISHED else f": {record.get('error')}"))
            time.sleep(poll_seconds)
    return [records[s.job_id] for s in pending if records[s.job_id] is not None]


def _skipped(task: Any) -> bool:
    """Whether the task's job did not run (SlurmTask's outcome), never raising."""
    try:
        outcome = task.result()
    except Exception:  # noqa: BLE001 - a failed task is not a skipped one
        return False
    return isinstance(outcome, dict) and bool(outcome.get("skipped"))


def _failed_without_record(spec: JobSpec, task: Any, results_dir: Path) -> dict[str, Any]:
    """The task ended (cancelled, timed out, node failure) before its job wrote a record."""
    try:
        task.result()
        reason = f"SLURM task {task.job_id} ended without a record (state {task.state})"
    except Exception as error:  # noqa: BLE001 - submitit raises the task's failure, or SLURM's
        reason = f"SLURM task {task.job_id} ({task.state}): {str(error).strip().splitlines()[-1][:500]}"
    record = {**asdict(spec), "job_id": spec.job_id, "fingerprint": spec.fingerprint(), "status": "failed",
              "error": reason, "log": str(task.paths.stderr)}
    write_json_atomic(record_path(results_dir, spec), record)
    return record


LAUNCHERS: dict[str, Callable[..., list[dict[str, Any]]]] = {"local": run_local, "slurm": run_slurm}

__all__ = ["LAUNCHERS", "SlurmSettings", "SlurmTask", "run_local", "run_slurm"]
