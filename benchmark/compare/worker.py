"""One (method, side) run per fresh process, so that timings and peak memory are never shared.

The protocol: the main process writes a run *spec* (JSON: :func:`worker_specs`) and starts
``python -m adbench.benchmark.compare worker --spec SPEC --json-out RESULT``
(:func:`run_worker_process`). The worker (:func:`worker_main`, :func:`run_worker`) builds one
side's model and data, fits, predicts, saves the raw predictions (``.npz``: paths, scores,
maps) and writes its measurements, or the error, to RESULT. Its lines starting with
:data:`WORKER_PREFIX` are progress, echoed by the main process; everything goes to its log.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from .pairs import METHODS, REPO, layer_names, our_init_args, require_anomalib

WORKER_PREFIX = "[worker]"


# --------------------------------------------------------------------------- main process side


def worker_specs(args: argparse.Namespace, root: str, category: str, train_paths: list[str] | None,
                 test_paths: list[str] | None, run_dir: Path) -> list[dict[str, Any]]:  # fmt: skip
    """One spec per (method, side) of ``args``, in run order; ``None`` paths: all images."""
    specs = []
    for method in args.methods:
        pair = METHODS[method]
        class_path, init_args = our_init_args(pair, args.draem_width)
        init_args.update(dict.fromkeys(pair.image_size_args, args.image_size))
        layers = init_args.get("layers")
        anomalib_layers = layer_names(init_args["backbone"], list(layers)) if layers else None
        for side in args.sides:
            name = f"{method}__{side}"
            specs.append({
                "method": method, "side": side, "kind": pair.kind, "root": root, "category": category,
                # EfficientAD trains on one image per step, as the paper (anomalib refuses any other size).
                "image_size": args.image_size, "batch_size": 1 if pair.kind == "efficientad" else args.batch_size,
                "eval_batch_size": args.eval_batch_size, "num_workers": args.num_workers,
                "seed": args.seed, "threads": args.threads, "accelerator": args.accelerator,
                "profile_steps": args.profile_steps,
                "stpm_epochs": args.stpm_epochs, "fastflow_epochs": args.fastflow_epochs,
                "glass_epochs": args.glass_epochs,
                "draem_steps": args.draem_steps, "draem_width": list(args.draem_width),
                "efficientad_steps": args.efficientad_steps,
                "stfpm_optimizer": args.stfpm_optimizer, "padim_subset": args.padim_subset,
                "coreset_ratio": pair.coreset_ratio, "texture_root": args.texture_root,
                "train_paths": train_paths, "test_paths": test_paths,
                "our_class_path": class_path, "our_init_args": init_args,
                "anomalib_layers": anomalib_layers,
                "work_dir": str(run_dir / "work" / name),
                "predictions": str(run_dir / "predictions" / f"{name}.npz"),
            })  # fmt: skip
    return specs


def run_worker_process(spec: dict[str, Any], run_dir: Path, env: dict[str, str], timeout: float | None,
                       label: str) -> dict[str, Any]:  # fmt: skip
    """Run one spec in a fresh interpreter; its log goes to ``run_dir/logs``, its progress to stdout."""
    name = f"{spec['method']}__{spec['side']}"
    for sub in ("specs", "results", "logs", "predictions"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    spec_path, result_path = (
        run_dir / "specs" / f"{name}.json",
        run_dir / "results" / f"{name}.json",
    )
    log_path = run_dir / "logs" / f"{name}.log"
    spec_path.write_text(json.dumps(spec, indent=2))
    result_path.unlink(missing_ok=True)  # a stale result must not pass for this run's
    command = [sys.executable, "-m", "adbench.benchmark.compare", "worker", "--spec", str(spec_path),
               "--json-out", str(result_path)]  # fmt: skip
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
        killer = threading.Timer(timeout, process.kill) if timeout else None
        if killer:
            killer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                if line.startswith(WORKER_PREFIX):
                    print(f"  {label} {line[len(WORKER_PREFIX) :].strip()}", flush=True)
            process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            if killer:
                killer.cancel()
    wall = time.perf_counter() - start
    if result_path.is_file():
        record = json.loads(result_path.read_text())
    else:
        tail = log_path.read_text().splitlines()[-15:]
        reason = "timed out" if timeout and wall >= timeout else f"exit code {process.returncode}"
        record = {"method": spec["method"], "side": spec["side"], "status": "failed",
                  "error": f"worker died ({reason}) without a result; log tail: " + " | ".join(tail)}  # fmt: skip
    record.update(worker_seconds=wall, log=str(log_path))
    return record


def json_default(value: Any) -> Any:
    """numpy scalars as plain numbers, anything else unknown as its string."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# --------------------------------------------------------------------------- worker process side


def worker_main(argv: list[str]) -> int:
    """``python -m adbench.benchmark.compare worker``: run one spec, always write a result."""
    parser = argparse.ArgumentParser(prog="python -m adbench.benchmark.compare worker")
    parser.add_argument(
        "--spec", required=True, help="run spec (JSON file written by the main process)"
    )
    parser.add_argument("--json-out", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    record: dict[str, Any] = {"method": spec["method"], "side": spec["side"]}
    try:
        record.update(run_worker(spec), status="ok", error=None)
        code = 0
    except BaseException as error:  # noqa: BLE001 - every failure must reach the table
        record.update(
            status="failed",
            error=f"{type(error).__name__}: {error}",
            traceback=traceback.format_exc(),
        )
        print(record["traceback"], file=sys.stderr, flush=True)
        code = 1
    Path(args.json_out).write_text(json.dumps(record, indent=2, default=json_default))
    return code


def _trainer_kwargs(spec: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    """A plain Trainer for both sides: 32-bit, no logger, checkpoints, progress bar or validation."""
    kind = spec["kind"]
    if kind in ("patchcore", "padim"):  # one pass over the training images
        bounds = {"max_epochs": 1}
    elif kind == "stpm":
        bounds = {"max_epochs": spec["stpm_epochs"]}
    elif kind == "fastflow":
        bounds = {"max_epochs": spec["fastflow_epochs"]}
    elif kind == "glass":
        bounds = {"max_epochs": spec["glass_epochs"]}
    elif kind == "efficientad":
        bounds = {"max_epochs": -1, "max_steps": spec["efficientad_steps"]}
    else:
        bounds = {"max_epochs": -1, "max_steps": spec["draem_steps"]}
    return {
        "accelerator": spec["accelerator"],
        "devices": 1,
        "precision": "32-true",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(work_dir),
        **bounds,
    }


def _collect_predictions(side: str, outputs: list[Any]) -> tuple[list[str], Any, Any]:
    """Paths, image scores (N,) and anomaly maps (N, H, W) from either library's predict outputs."""
    import numpy as np

    paths: list[str] = []
    scores, maps = [], []
    for out in outputs:
        if side == "ours":
            batch_paths, score, amap = out["path"], out["image_score"], out["anomaly_map"]
        else:
            batch_paths, score, amap = out.image_path, out.pred_score, out.anomaly_map
        amap = amap.detach().float().cpu()
        amap = amap.reshape(amap.shape[0], *amap.shape[-2:])
        paths += [str(p) for p in batch_paths]
        scores.append(score.detach().float().cpu().reshape(-1).numpy())
        maps.append(amap.numpy())
    return paths, np.concatenate(scores), np.concatenate(maps)


def _efficientad_fitted(side: str, model: Any) -> dict[str, str]:
    """What each EfficientAD fitted on the training images: teacher channel statistics, map quantiles."""
    if side == "ours":
        mean, std = model.teacher_mean, model.teacher_std
        q = [float(v) for v in model.quantiles]
    else:
        mean, std = model.model.mean_std["mean"], model.model.mean_std["std"]
        names = ("qa_st", "qb_st", "qa_ae", "qb_ae")
        q = [float(model.model.quantiles[n]) for n in names]
    return {"fitted": f"teacher channel mean (averaged) {float(mean.mean()):.4g}, std {float(std.mean()):.4g}; "
                      f"map quantiles local {q[0]:.4g} / {q[1]:.4g}, global {q[2]:.4g} / {q[3]:.4g}"}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (method, side) run in this process: build, fit, predict; save raw predictions."""
    import numpy as np
    import torch
    from lightning import Trainer, seed_everything

    from adbench.callbacks.timing import peak_rss_mb

    from .loop_timer import LoopTimer

    side = spec["side"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    work_dir = Path(spec["work_dir"])
    work_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(spec["seed"], workers=True, verbose=False)
    print(f"{WORKER_PREFIX} building model and data", flush=True)
    if side == "ours":
        from .build_ours import build_ours

        model, data, notes = build_ours(spec)
    else:
        require_anomalib()
        from .build_anomalib import build_anomalib  # needs anomalib: imported only here

        model, data, notes = build_anomalib(spec, work_dir)
    rss_before_fit = peak_rss_mb()

    timer = LoopTimer()
    callbacks = [timer]
    if side == "ours":
        from adbench.callbacks.allocator import ReuseFreedMemory

        callbacks.append(ReuseFreedMemory())  # as `adbench` and the runner do: see callbacks/allocator.py
    profiler = None
    if spec.get("profile_steps"):
        from .step_profiler import StepProfiler

        profiler = StepProfiler(int(spec["profile_steps"]), work_dir)
        callbacks.append(profiler)
    trainer = Trainer(**_trainer_kwargs(spec, work_dir), callbacks=callbacks)
    cuda = trainer.strategy.root_device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def _sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # Wall clocks around fit and predict (data setup included), not the loop timer's spans.
    print(f"{WORKER_PREFIX} fitting", flush=True)
    _sync()
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    _sync()
    fit_seconds = time.perf_counter() - start
    steps = int(trainer.global_step)
    print(
        f"{WORKER_PREFIX} fit done in {fit_seconds:.1f} s ({steps} optimiser steps); predicting",
        flush=True,
    )

    if spec["kind"] == "efficientad":
        notes.update(_efficientad_fitted(side, model))

    start = time.perf_counter()
    outputs = trainer.predict(model, datamodule=data)
    _sync()
    predict_seconds = time.perf_counter() - start
    paths, scores, maps = _collect_predictions(side, outputs)
    np.savez(spec["predictions"], paths=np.array(paths), scores=scores.astype(np.float32),
             maps=maps.astype(np.float32))  # fmt: skip
    train, predict = timer.summary("train"), timer.summary("predict")
    result = {
        "fit_seconds": fit_seconds,
        "optimizer_steps": steps,
        "steps_per_second": steps / fit_seconds if steps and fit_seconds > 0 else math.nan,
        "train_images": train["images"],
        "train_batches": train["batches"],
        "train_loop_seconds": train["seconds"],
        "train_images_per_second": train["images_per_second"],
        "test_images": predict["images"],
        "test_loop_seconds": predict["seconds"],
        "test_images_per_second": predict["images_per_second"],
        "predict_seconds": predict_seconds,
        "rss_before_fit_mb": rss_before_fit,
        "peak_rss_mb": peak_rss_mb(),
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else math.nan,
        "device": str(trainer.strategy.root_device),
        "torch_threads": torch.get_num_threads(),
        "notes": notes,
    }
    if profiler is not None and profiler.summary:
        result["profile"] = profiler.summary
    print(f"{WORKER_PREFIX} predicted {predict['images']} images in {predict_seconds:.1f} s; "
          f"peak RSS {result['peak_rss_mb']:.0f} MiB", flush=True)  # fmt: skip
    return result
