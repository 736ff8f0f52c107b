"""Every registered method, through the same CLI and runner a user drives.

Tiny settings (64 px, two training batches): these tests check that each method
honours the output contract, trains under bf16 mixed precision and as a
2-process DDP job without errors or NaNs; their accuracy is checked in each
method's own test file and on real data in the README's figures.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adbench import models
from adbench.benchmark.experiments import gpu_check
from adbench.benchmark.orchestration.runner import device_slots, run_jobs
from adbench.benchmark.orchestration.sweep import SweepConfig, config_path
from adbench.cli import AnomalyCLI

METHODS = models.list_models()
#: The toy budget, one definition with `make gpu-check CPU=1`'s: 64 px, two training batches.
TINY = {**gpu_check.TOY, **gpu_check.QUIET}
#: Per method, on top of TINY: EfficientAD's quick profile distils its teacher for 1000 steps at the first fit.
METHOD_TINY = gpu_check.TOY_METHOD_BUDGET


def test_every_method_has_both_profiles() -> None:
    for method in METHODS:
        for profile in ("quick", "paper"):
            assert config_path(method, profile).is_file(), f"{method} lacks configs/{method}/{profile}.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_bf16_mixed_fit_and_test(method: str, tmp_path: Path, embedded_root: Path) -> None:
    cli = AnomalyCLI(
        args=[
            f"--config={config_path(method, 'quick')}",
            f"--data.root={embedded_root}",
            "--data.category=disc",
            "--trainer.precision=bf16-mixed",
            f"--trainer.default_root_dir={tmp_path}",
            *(f"--{k}={'null' if v is None else v}" for k, v in {**TINY, **METHOD_TINY.get(method, {})}.items()),
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    metrics = dict(cli.evaluator.test_metrics)
    if not cli.evaluator.val_history:  # no validation in one epoch (check_val_every_n_epoch > 1): no seg threshold
        assert math.isnan(metrics.pop("seg_f1"))
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in metrics.values()), metrics
    assert all(torch.isfinite(p).all() for p in cli.model.parameters()), "NaN/inf weights after bf16 training"

    # The output contract, checked directly: full-resolution map, one score per image.
    images = torch.rand(2, 3, 64, 64)
    cli.model.eval()
    with torch.inference_mode():
        anomaly_map, image_score = cli.model(images)
    assert anomaly_map.shape == (2, 1, 64, 64) and image_score.shape == (2,)
    assert torch.isfinite(anomaly_map).all() and torch.isfinite(image_score).all()


@pytest.mark.slow
def test_every_method_as_a_two_process_ddp_job(tmp_path: Path, embedded_root: Path) -> None:
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        "name: ddp\nmethods: all\nprofile: quick\ncategories: [weave]\n"
        f"root: {embedded_root}\naccelerator: cpu\ndevices_per_job: 2\n"
        "overrides: {" + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}\n"
    )
    sweep = replace(SweepConfig.from_yaml(sweep_file), method_overrides=METHOD_TINY)
    records = run_jobs(sweep.jobs(), tmp_path / "results", device_slots(2, None, "cpu"))
    assert sorted(r["method"] for r in records) == METHODS
    for record in records:
        assert record["status"] == "ok", f"{record['method']}: {record['error']}\n{record.get('traceback')}"
        assert record["config"]["trainer"]["strategy"] == models.get_model_class(record["method"]).ddp_strategy
        # seg_f1 is NaN where one tiny epoch ran no validation (no segmentation threshold): checked in test_cli.
        assert all(math.isfinite(v) for k, v in record["metrics"].items() if k != "seg_f1"), record["metrics"]


def test_configs_name_registered_classes() -> None:
    import yaml

    for method in METHODS:
        for profile in ("quick", "paper"):
            config = yaml.safe_load(config_path(method, profile).read_text())
            module, _, name = config["model"]["class_path"].rpartition(".")
            assert models.get_model_class(method).__name__ == name, (method, profile)
            assert models.get_model_class(method).__module__ == module, (method, profile)
