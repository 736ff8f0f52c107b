"""Small builders shared by the per-method tests: a toy-size DataModule, a step-bounded Trainer,
and the two checks every trained method goes through (separation of the embedded defects, and a
finite bf16-mixed run)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer, seed_everything

from adbench.benchmark.orchestration.environment import ONEDNN_ISA_VARIABLE
from adbench.callbacks.evaluation import AnomalyEvaluator
from adbench.datamodules import MVTecDataModule

SIZE = 64  # toy resolution: every method's code path, at a fraction of its cost
#: The quality tests' seed (0). Set to measure their spread across seeds (tests/measure_quality.sh).
TEST_SEED = int(os.environ.get("ADBENCH_TEST_SEED", "0"))


def log_quality(metrics: dict[str, float]) -> dict[str, float]:
    """Append a quality test's metrics, seed and CPU pin to ``$ADBENCH_QUALITY_LOG`` (if set); return them.

    The bounds of the learned-quality tests come from this log, over seeds and instruction sets."""
    log = os.environ.get("ADBENCH_QUALITY_LOG")
    if log:
        entry = {"test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], "seed": TEST_SEED,
                 "cpu_isa": os.environ.get(ONEDNN_ISA_VARIABLE), **metrics}
        with open(log, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
    return metrics


def small_datamodule(
    root: Path, category: str = "weave", size: int = SIZE, **kwargs: Any
) -> MVTecDataModule:
    """The embedded category at ``size`` px, all of train/good for training (no validation split)."""
    return MVTecDataModule(root=str(root), category=category, image_size=size, batch_size=8, val_fraction=0.0,
                           **kwargs)  # fmt: skip


def step_trainer(steps: int, **kwargs: Any) -> Trainer:
    """A quiet CPU Trainer bounded by ``steps`` optimiser steps, without validation or checkpoints."""
    return Trainer(
        accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip


def first_train_batch(
    root: Path, category: str = "weave", size: int = SIZE
) -> dict[str, torch.Tensor]:
    """One training batch with pseudo-anomalies, as a method that trains on them receives it."""
    data = small_datamodule(root, category, size, pseudo_anomalies=True)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def fit_and_test(
    build: Callable[[], LightningModule], root: Path, steps: int, category: str = "weave", **trainer_kwargs: Any
) -> tuple[LightningModule, dict[str, float]]:
    """From TEST_SEED (initialisation included), train ``steps`` steps, test; the model and its metrics."""
    seed_everything(TEST_SEED, verbose=False)
    model = build()
    evaluator = AnomalyEvaluator()
    data = small_datamodule(root, category)
    trainer = step_trainer(steps, callbacks=[evaluator], **trainer_kwargs)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    return model, log_quality(evaluator.test_metrics)


def assert_bf16_training_is_finite(
    build: Callable[[], LightningModule],
    root: Path,
    logged: Sequence[str] = ("train/loss",),
    steps: int = 3,
) -> None:
    """Train under ``bf16-mixed``: finite logged losses and weights, and a float32 map at inference."""
    seed_everything(0, verbose=False)
    model = build()
    trainer = step_trainer(steps, precision="bf16-mixed")
    trainer.fit(model, datamodule=small_datamodule(root))
    assert trainer.global_step == steps
    for key in logged:
        assert torch.isfinite(trainer.callback_metrics[key]), key
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        anomaly_map, score = model.eval()(torch.rand(2, 3, SIZE, SIZE))
    assert anomaly_map.dtype == torch.float32 and torch.isfinite(anomaly_map).all()
    assert torch.isfinite(score).all()
