"""One benchmark job in its own process: fit, select a checkpoint on validation, test, record.

    python -m adbench.benchmark.orchestration.job SPEC.json RECORD.json

The job is built through the same Lightning CLI (and the same YAML) a user
runs by hand, so a leaderboard number can always be reproduced with
``adbench fit/test --config ...``. The checkpoint that is tested is chosen on
the validation split (held-out ``train/good`` with synthetic anomalies), never
on the test set. Whatever happens, a record is written: ``ok`` with metrics, or
``failed`` with the error, so a sweep never loses a result or hides a failure; a job that
another process runs (its lock, :mod:`.locks`) or whose record is finished writes nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from adbench.benchmark.orchestration.environment import environment, pin_cpu_isa
from adbench.benchmark.orchestration.locks import SKIPPED_EXIT_CODE, job_lock
from adbench.benchmark.orchestration.records import (
    FINISHED,
    LAUNCH_TOKEN_VARIABLE,
    LAUNCHED_AT_VARIABLE,
    RUNS_FOLDER,
    selection_saturation,
    write_json_atomic,
    write_text_atomic,
)
from adbench.benchmark.orchestration.runner import is_finished
from adbench.benchmark.orchestration.sweep import JobSpec
from adbench.callbacks.guards import LossHistory
from adbench.callbacks.pixel_histograms import HISTOGRAM_SUFFIX, PixelHistograms
from adbench.cli import AnomalyCLI


def _logger(spec: JobSpec, job_dir: Path) -> Any:
    settings = spec.wandb or {}
    if not settings.get("enabled"):  # the training curves still: <job_dir>/metrics.csv
        return {"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(job_dir), "name": "", "version": ""}}
    # LightningCLI takes subclass defaults as class_path/init_args, not as instances.
    return {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {
            "project": settings.get("project", "adbench"),
            "group": spec.sweep,
            "job_type": spec.method,
            "name": spec.job_id,
            "tags": [spec.category, spec.profile, f"seed{spec.seed}"],
            "offline": settings.get("mode", "offline") == "offline",
            "save_dir": str(settings.get("dir", job_dir)),
        },
    }


SCORES_FOLDER = "scores"
#: In the job's folder: its whole config; ``adbench fit/test --config`` with it reproduces the job.
JOB_CONFIG_FILE = "config.yaml"


def result_warnings(metrics: dict[str, float], images: dict[str, list[Any]], losses: LossHistory) -> list[str]:
    """Why a finished job's figures should not be read like any other (empty: none)."""
    warnings = []
    labels = images.get("label", [])
    if labels and (all(labels) or not any(labels)):
        kind = "no good" if all(labels) else "no anomalous"
        warnings.append(f"test split has {kind} image: image AUROC and F1-max are undefined")
    elif any(math.isnan(metrics.get(k, math.nan)) for k in ("image_auroc", "pixel_auroc", "pro")):
        missing = [k for k in ("image_auroc", "pixel_auroc", "pro") if math.isnan(metrics.get(k, math.nan))]
        warnings.append(f"undefined metric(s) {', '.join(missing)} (NaN scores or no ground-truth region)")
    if losses.diverged:
        warnings.append(f"diverged: {losses.diverged}")
    return warnings


#: Written when SLURM warns of preemption or the time limit (save_for_requeue); the next attempt resumes from it.
REQUEUE_CHECKPOINT = "requeue.ckpt"
#: The job running in this process (for save_for_requeue, called from submitit's signal handler).
_ACTIVE: dict[str, Any] = {}


def save_for_requeue() -> None:
    """Save the running fit's full state (weights, optimiser, loops) for the requeued attempt."""
    trainer, job_dir = _ACTIVE.get("trainer"), _ACTIVE.get("job_dir")
    _ACTIVE["requeued"] = True
    if trainer is not None and trainer.state.fn == "fit":
        trainer.save_checkpoint(job_dir / "checkpoints" / REQUEUE_CHECKPOINT)
        print(f"[job] preempted or near the time limit: training state saved at epoch {trainer.current_epoch}")


def run_job(spec: JobSpec, job_dir: Path, scores_path: Path | None = None) -> dict[str, Any]:
    """Fit, select, test with the CLI's protocol (adbench.cli.protocol_callbacks); return the record's measured part."""
    resume = job_dir / "checkpoints" / REQUEUE_CHECKPOINT
    if "LOCAL_RANK" not in os.environ and not resume.is_file():  # the launcher, never a DDP worker mid-run
        # A rerun (changed code or config) must not find the previous run's best.ckpt beside its own.
        shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)
    trainer_defaults: dict[str, Any] = {"default_root_dir": str(job_dir), "logger": _logger(spec, job_dir)}
    if "SLURM_JOB_ID" in os.environ:  # submitit requeues (launchers.SlurmTask): not Lightning as well
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        trainer_defaults["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    config = spec.config()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # what `adbench fit/test --config` reads back
        job_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(job_dir / JOB_CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    parse_errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(parse_errors):
            # The job's own config file stands for Lightning's (which would add this folder's logger and paths).
            cli = AnomalyCLI(args=config, run=False, trainer_defaults=trainer_defaults, save_config_callback=None)
    except SystemExit as error:  # the argument parser's message, not a bare "SystemExit: 2"
        lines = [line for line in parse_errors.getvalue().splitlines() if line.strip()]
        raise ValueError(lines[-1] if lines else f"the CLI exited with {error.code}") from None
    finally:
        sys.stderr.write(parse_errors.getvalue())
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    checkpoint, timing, losses = cli.checkpoint, cli.timing, cli.losses
    resumed = None
    if resume.is_file():
        resumed = {"checkpoint": str(resume), "epoch": int(torch.load(resume, map_location="cpu",
                                                                      weights_only=False)["epoch"])}
        print(f"[job] resuming training from {resume} (epoch {resumed['epoch']})")
    _ACTIVE.update(trainer=trainer, job_dir=job_dir)
    trainer.fit(model, datamodule=data, ckpt_path=str(resume) if resumed else None, weights_only=False)
    _ACTIVE.pop("trainer", None)
    resume.unlink(missing_ok=True)
    best = checkpoint.best_model_path
    trainer.test(model, datamodule=data, ckpt_path=best or None, weights_only=False)
    best_score = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None
    history = cli.evaluator.val_history
    selection = {
        "checkpoint": "best validation" if best else "last epoch (no validation metric)",
        "best_val_score": best_score,
        "val_metrics": cli.evaluator.val_metrics,
        "history": history,
        "saturation": selection_saturation(history, best_score),
    }
    evaluator = cli.evaluator
    threshold = evaluator.val_image_threshold
    if scores_path is not None and evaluator.test_images and trainer.is_global_zero:
        evaluator.save_test_scores(scores_path, spec.root)
        if trainer.world_size == 1:  # each rank holds its share of the maps: one process only
            for callback in trainer.callbacks:
                if isinstance(callback, PixelHistograms):  # for the report's paired tests of pixel metrics
                    callback.save(scores_path.with_suffix(HISTOGRAM_SUFFIX), spec.root)
    return {
        "metrics": evaluator.test_metrics,
        # Unified setting: the leaderboard reads one row per category from here.
        "metrics_by_category": evaluator.test_metrics_by_category,
        "metrics_by_defect_type": evaluator.test_metrics_by_defect_type,
        "shot_files": data.shot_files,  # few-shot: the training images drawn (seeded)
        "intervals": evaluator.test_intervals,
        "bootstrap": evaluator.bootstrap,
        "warnings": result_warnings(evaluator.test_metrics, evaluator.test_images, losses),
        "training_loss": losses.stats,
        "val_image_threshold": None if math.isnan(threshold) else threshold,
        "image_scores": None if scores_path is None else f"{SCORES_FOLDER}/{scores_path.name}",
        "timing": timing.stats,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "selection": selection,
        "resumed_from": resumed,
        "config": json.loads(json.dumps(cli.config.as_dict(), default=str)),
        "is_global_zero": trainer.is_global_zero,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the job unless another process runs it or its record is finished: then exit with
    :data:`SKIPPED_EXIT_CODE`, writing nothing. The lock is taken here, by the job itself, so
    the local and the SLURM launcher share one rule (:mod:`.locks`)."""
    spec_path, record_path = (argv or sys.argv[1:])[:2]
    spec = JobSpec(**json.loads(Path(spec_path).read_text()))
    if spec.cpu_isa:  # read by torch at its first kernel, i.e. still to come in this process
        pin_cpu_isa(spec.cpu_isa)
    results_dir = Path(record_path).parent.parent
    if "LOCAL_RANK" in os.environ:  # a DDP worker Lightning started: its rank 0 holds the lock
        return _run_and_record(spec, Path(record_path), results_dir)
    with job_lock(results_dir / RUNS_FOLDER, spec.job_id) as holder:
        if holder is not None:
            print(f"[job] {spec.job_id}: skipped, being run by {holder}")
            return SKIPPED_EXIT_CODE
        if is_finished(results_dir, spec):  # finished by another sweep since this one was launched
            print(f"[job] {spec.job_id}: skipped, its record is finished (same fingerprint)")
            return SKIPPED_EXIT_CODE
        return _run_and_record(spec, Path(record_path), results_dir)


def _run_and_record(spec: JobSpec, record_path: Path, results_dir: Path) -> int:
    job_dir = results_dir / "jobs" / spec.job_id
    record: dict[str, Any] = {**asdict(spec), "job_id": spec.job_id, "fingerprint": spec.fingerprint()}
    record["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record["started_unix"] = time.time()
    record["launch_token"] = os.environ.get(LAUNCH_TOKEN_VARIABLE)
    # When the runner spawned this process: jobs of one sweep overlap in [launched, finished] when parallel.
    launched = os.environ.get(LAUNCHED_AT_VARIABLE)
    record["launched_unix"] = float(launched) if launched else record["started_unix"]
    record["environment"] = environment()
    try:
        record.update(run_job(spec, job_dir, results_dir / SCORES_FOLDER / f"{spec.job_id}.csv"), error=None)
        # "warning": finished, but its figures are degenerate (see result_warnings); shown as such.
        record["status"] = "warning" if record["warnings"] else "ok"
    except BaseException as error:  # noqa: BLE001 - every failure must become a record
        if _ACTIVE.get("requeued") and isinstance(error, SystemExit):
            raise  # submitit ends this attempt after requeueing it: the next one writes the record
        record.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        if isinstance(error, torch.cuda.OutOfMemoryError):
            record["error"] = f"out of memory: {error}"
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record["finished_unix"] = time.time()
    # Under DDP only rank 0 writes (ranks > 0 of a failed job still exit non-zero).
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        record.pop("is_global_zero", None)
        write_json_atomic(record_path, record)
    print(f"[job] {spec.job_id}: {record['status']}" + (f" ({record['error']})" if record["error"] else ""))
    return 0 if record["status"] in FINISHED else 1


if __name__ == "__main__":
    sys.exit(main())
