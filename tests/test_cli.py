"""The ``adbench`` Lightning CLI: fit / validate / test / predict from YAML, W&B offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adbench.callbacks.metrics import METRIC_LABELS
from adbench.cli import AnomalyCLI

from .conftest import REPO

TINY = [
    "--config", str(REPO / "configs" / "stpm" / "quick.yaml"),
    "--data.image_size=64", "--data.batch_size=4", "--data.category=weave",
    "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
]  # fmt: skip


def _cli(subcommand: str, tmp_path: Path, embedded_root: Path, *extra: str) -> AnomalyCLI:
    return AnomalyCLI(
        args=[subcommand, *TINY, f"--data.root={embedded_root}", f"--trainer.default_root_dir={tmp_path}", *extra]
    )


def test_fit_then_test_from_checkpoint(tmp_path: Path, embedded_root: Path) -> None:
    fit = _cli("fit", tmp_path, embedded_root)
    assert "val/image_auroc" in fit.trainer.callback_metrics
    checkpoint = fit.trainer.checkpoint_callback.best_model_path
    assert checkpoint and Path(checkpoint).is_file()

    test = _cli("test", tmp_path, embedded_root, f"--ckpt_path={checkpoint}")
    metrics = test.evaluator.test_metrics
    assert set(metrics) == set(METRIC_LABELS) - {"spro_fpr05", "spro"}  # sPRO: MVTec LOCO AD only
    # Every metric defined, seg_f1 included: its threshold came from the fit's validation, in the checkpoint.
    assert all(0.0 <= v <= 1.0 for v in metrics.values()), metrics
    assert test.trainer.callback_metrics["test/pixel_auroc"].item() == pytest.approx(metrics["pixel_auroc"], abs=1e-6)


def test_validate_and_predict(tmp_path: Path, embedded_root: Path) -> None:
    validate = _cli("validate", tmp_path, embedded_root)
    assert 0.0 <= validate.evaluator.val_metrics["image_auroc"] <= 1.0

    _cli("predict", tmp_path, embedded_root)  # the subcommand runs end to end
    predict = AnomalyCLI(  # and, built without running, returns maps and paths
        args=[*TINY, f"--data.root={embedded_root}", f"--trainer.default_root_dir={tmp_path}"], run=False
    )
    outputs = predict.trainer.predict(predict.model, datamodule=predict.datamodule)
    first = outputs[0]
    assert first["anomaly_map"].shape[1:] == (1, 64, 64)
    assert len(first["path"]) == len(first["image_score"])


def test_bad_config_value_is_reported(tmp_path: Path, embedded_root: Path) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        _cli("fit", tmp_path, embedded_root, "--data.val_fraction=2")


@pytest.mark.slow
def test_console_script_lists_models() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "adbench", "models"], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert "stpm" in result.stdout.split()


@pytest.mark.slow
def test_wandb_offline_logger(tmp_path: Path, embedded_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    _cli(
        "fit", tmp_path, embedded_root,
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.offline=true", "--trainer.logger.project=adbench-test",
        f"--trainer.logger.save_dir={tmp_path}",
    )  # fmt: skip
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, f"no offline W&B run under {tmp_path / 'wandb'}: {os.listdir(tmp_path)}"
    assert any(runs[0].rglob("*.wandb")), "the offline run holds no logged data"


@pytest.mark.slow
def test_refit_replaces_the_run_folders_checkpoints(tmp_path: Path, embedded_root: Path) -> None:
    # Two fits into one run folder with other epochs and learning rate, then `test --ckpt_path best`.
    first = _cli("fit", tmp_path, embedded_root, "--model.init_args.lr=0.4")
    first_metrics = _cli("test", tmp_path, embedded_root, "--ckpt_path=best").evaluator.test_metrics
    second = _cli("fit", tmp_path, embedded_root, "--model.init_args.lr=0.01", "--trainer.max_epochs=2")
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"], "no best-v1.ckpt"
    assert sorted(p.name for p in (checkpoints / "previous").glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    assert Path(second.checkpoint.best_model_path) == checkpoints / "best.ckpt"
    for name in ("best.ckpt", "last.ckpt"):
        saved = torch.load(checkpoints / name, map_location="cpu", weights_only=False)
        assert saved["hyper_parameters"]["lr"] == 0.01, f"{name} is not the second fit's"
    epochs = [torch.load(p, weights_only=False)["epoch"] for p in (checkpoints / "last.ckpt",
                                                                   checkpoints / "previous" / "last.ckpt")]
    assert epochs == [2, 1], "last.ckpt ends the second fit (2 epochs); the first fit's is set aside"
    # Resuming the second fit (as a SLURM requeue does) continues it: nothing is set aside.
    _cli("fit", tmp_path, embedded_root, "--model.init_args.lr=0.01", "--trainer.max_epochs=3",
         f"--ckpt_path={checkpoints / 'last.ckpt'}")
    epochs = [torch.load(p, weights_only=False)["epoch"] for p in (checkpoints / "last.ckpt",
                                                                   checkpoints / "previous" / "last.ckpt")]
    assert epochs == [3, 1], "a resumed fit keeps its own checkpoints and leaves previous/ alone"
    del first

    tested = _cli("test", tmp_path, embedded_root, "--ckpt_path=best")
    metrics = tested.evaluator.test_metrics
    again = _cli("test", tmp_path, embedded_root, f"--ckpt_path={second.checkpoint.best_model_path}")
    assert metrics == again.evaluator.test_metrics
    assert metrics != first_metrics, "best must not name the first fit's model"


@pytest.mark.slow
def test_input_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "adbench", "fit", "--config", str(REPO / "configs" / "stpm" / "quick.yaml"),
         "--data.root", str(tmp_path / "nowhere"), "--data.category", "bottle",
         f"--trainer.default_root_dir={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "ADBENCH_TRACEBACK": ""},
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("adbench fit: error: FileNotFoundError: MVTec AD dataset root") and "nowhere" in last
