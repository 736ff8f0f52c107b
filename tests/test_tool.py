"""The suite as a tool: one protocol for CLI and sweep, checkpoints found in a new process,
predict on any folder of images, the Python API, short model names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import adbench
from adbench import models
from adbench.benchmark.orchestration.job import JOB_CONFIG_FILE
from adbench.benchmark.orchestration.runner import device_slots, run_jobs
from adbench.benchmark.orchestration.sweep import SweepConfig
from adbench.checkpoints import LegacyCheckpointError, upgrade
from adbench.cli import TEST_SCORES_FILE, AnomalyCLI, expand_model_names

from .conftest import REPO
from .test_benchmark import TINY as TINY_OVERRIDES
from .test_cli import TINY


def test_short_model_names_become_class_paths() -> None:
    assert expand_model_names(["fit", "--model", "stpm", "--model=PatchCore", "--data.category=stpm"]) == [
        "fit", "--model", "adbench.models.stpm.STPM", "--model=adbench.models.patchcore.PatchCore", "--data.category=stpm"]


@pytest.mark.slow
def test_a_fit_always_leaves_a_checkpoint_and_best_or_last_are_found_by_name(
    tmp_path: Path, embedded_root: Path
) -> None:
    common = [*TINY, f"--data.root={embedded_root}", f"--trainer.default_root_dir={tmp_path}"]
    # Validation every 5 epochs, one epoch: no validated epoch, still a last.ckpt with the final weights.
    AnomalyCLI(args=["fit", *common, "--trainer.check_val_every_n_epoch=5"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()
    with pytest.raises(SystemExit, match="no checkpoint at .*best.ckpt.*use --ckpt_path last"):
        AnomalyCLI(args=["test", *common, "--ckpt_path=best"])
    test = AnomalyCLI(args=["test", *common, "--ckpt_path=last"])
    assert 0.0 <= test.evaluator.test_metrics["image_auroc"] <= 1.0
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["adbench"]["model"] == "stpm" and state["adbench"]["image_size"] == 64


def _job(tmp_path: Path, embedded_root: Path) -> tuple[dict, Path]:
    sweep = SweepConfig(name="tool", methods=["stpm"], categories=["weave"], root=str(embedded_root),
                        overrides=dict(TINY_OVERRIDES))
    [record] = run_jobs(sweep.jobs(), tmp_path / "results", device_slots(1, None))
    assert record["status"] == "ok", record.get("traceback")
    return record, tmp_path / "results" / "jobs" / record["job_id"]


@pytest.mark.slow
def test_a_sweep_row_is_reproduced_by_adbench_test_and_fit_from_its_config(tmp_path: Path, embedded_root: Path) -> None:
    record, job_dir = _job(tmp_path, embedded_root)
    curves = pd.read_csv(job_dir / "metrics.csv")  # the job keeps its training curves
    assert "val/selection_score" in curves.columns and curves["val/selection_score"].notna().any()
    assert len(list((job_dir / "anomaly_maps").glob("*.png"))) == len(pd.read_csv(tmp_path / "results" / record["image_scores"]))
    # The job's saved config is the whole of it: `adbench test --config` with it reproduces the row.
    result = subprocess.run(
        [sys.executable, "-m", "adbench", "test", f"--config={job_dir / JOB_CONFIG_FILE}",
         f"--trainer.default_root_dir={job_dir}", "--ckpt_path=best"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = dict(re.findall(r"test/(\w+)\s+([0-9.]+)", result.stdout))
    for metric in ("image_auroc", "pixel_auroc", "pro"):
        assert float(printed[metric]) == pytest.approx(record["metrics"][metric], abs=1e-6), metric
    assert f"run folder: {job_dir}" in result.stdout
    # ... and writes the job's per-image scores into the run folder.
    ours, sweeps = pd.read_csv(job_dir / TEST_SCORES_FILE), pd.read_csv(tmp_path / "results" / record["image_scores"])
    assert list(ours.path) == list(sweeps.path) and ours.score.to_numpy() == pytest.approx(sweeps.score.to_numpy(), rel=1e-5)
    assert (ours.predicted_anomalous == sweeps.predicted_anomalous).all()
    # Training again from the same config, in a new folder, gives the row again.
    refit = tmp_path / "refit"
    for command in ("fit", "test"):
        result = subprocess.run(
            [sys.executable, "-m", "adbench", command, f"--config={job_dir / JOB_CONFIG_FILE}",
             f"--trainer.default_root_dir={refit}", *(["--ckpt_path=best"] if command == "test" else [])],
            capture_output=True, text=True, cwd=REPO, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    printed = dict(re.findall(r"test/(\w+)\s+([0-9.]+)", result.stdout))
    for metric in ("image_auroc", "pixel_auroc", "pro"):
        assert float(printed[metric]) == pytest.approx(record["metrics"][metric], abs=1e-6), metric


@pytest.mark.slow
def test_python_api_and_predict_on_a_folder_of_mixed_images(tmp_path: Path, embedded_root: Path) -> None:
    record, job_dir = _job(tmp_path, embedded_root)
    checkpoint = job_dir / "checkpoints" / "best.ckpt"
    detector = adbench.load(checkpoint)
    scores = pd.read_csv(tmp_path / "results" / record["image_scores"])
    # The API's preprocessing is the evaluation's: same image, same score as the job's test.
    for row in scores.head(3).itertuples():
        result = detector.predict(embedded_root / row.path)
        assert result.score == pytest.approx(row.score, rel=1e-5)
        assert result.anomalous == (row.score >= row.val_f1_threshold)
        assert result.anomaly_map.shape == (256, 256)  # the image's own size, not the model's 64 px

    source = embedded_root / scores.path[scores.label == 1].iloc[0]
    folder = tmp_path / "inbox" / "nested"
    folder.mkdir(parents=True)
    with Image.open(source) as image:
        image.convert("L").resize((120, 90)).save(folder / "gray.jpg")
        image.convert("RGBA").save(folder.parent / "alpha.tiff")
        image.save(folder.parent / "plain.bmp")
    (folder / "notes.txt").write_text("not an image")
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "adbench", "predict", f"--ckpt_path={checkpoint}",
         f"--data.path={folder.parent}", f"--output={output}"], capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(output / "predictions.csv") in result.stdout
    table = pd.read_csv(output / "predictions.csv")
    assert sorted(table.path) == ["alpha.tiff", "nested/gray.jpg", "plain.bmp"]
    assert set(table.anomalous) <= {0, 1}
    assert table.set_index("path").at["plain.bmp", "score"] == pytest.approx(detector.predict(source).score, rel=1e-5)
    raw = np.load(output / "maps" / "nested__gray.npy")
    assert raw.shape == (90, 120)
    with Image.open(output / "maps" / "nested__gray.png") as picture:
        assert picture.size[0] > 2 * 120  # input | overlay | colour bar

    with pytest.raises(FileNotFoundError, match="no image file or folder"):
        adbench.predict_folder(detector, tmp_path / "missing", tmp_path / "o")


def test_top_level_help_lists_every_command_without_importing_torch() -> None:
    probe = ("import sys; from adbench.__main__ import main; main(['--help']); "
             "print('heavy:', sorted(m for m in ('torch', 'lightning', 'adbench.models') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    assert result.stdout.startswith("usage: adbench <command>")
    for command in ("fit", "validate", "test", "predict", "export", "models"):
        assert re.search(rf"^  {command} ", result.stdout, re.MULTILINE), command
    assert "heavy: []" in result.stdout
    unknown = subprocess.run([sys.executable, "-m", "adbench", "fitt"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert unknown.returncode != 0 and "unknown command 'fitt'" in unknown.stderr


@pytest.mark.slow
def test_cli_help_says_adbench() -> None:
    result = subprocess.run([sys.executable, "-m", "adbench", "fit", "--help"], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0 and re.search(r"usage: adbench (\[options\] )?fit", result.stdout), result.stdout[:300]


def test_testing_without_the_evaluator_warns_how_to_add_it(embedded_root: Path) -> None:
    from lightning import Trainer

    from adbench.datamodules import MVTecDataModule
    from adbench.models.stpm import STPM

    data = MVTecDataModule(root=str(embedded_root), category="weave", image_size=64, eval_batch_size=8)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_test_batches=1)
    with pytest.warns(UserWarning, match="without an AnomalyEvaluator.*AnomalyEvaluator"):
        trainer.test(STPM(backbone="tf_efficientnet_lite0"), datamodule=data)


@pytest.mark.slow
def test_a_bad_override_records_the_parsers_message(tmp_path: Path, embedded_root: Path) -> None:
    sweep = SweepConfig(name="tool", methods=["stpm"], categories=["weave"], root=str(embedded_root),
                        overrides={**TINY_OVERRIDES, "model.init_args.no_such_argument": 3})
    [record] = run_jobs(sweep.jobs(), tmp_path / "results", device_slots(1, None))
    assert record["status"] == "failed"
    assert "no_such_argument" in record["error"] and "SystemExit" not in record["error"]


def test_a_checkpoint_from_before_the_namespace_is_refused_with_its_upgrade_command(tmp_path: Path) -> None:
    model = models.create_model("stpm", backbone="tf_efficientnet_lite0")
    state = {"state_dict": model.state_dict(), "adbench": {"model": "stpm", "image_size": 64},
             "hyper_parameters": {"_class_path": "models.stpm.STPM", **model.hparams}}
    legacy = tmp_path / "old.ckpt"
    torch.save(state, legacy)
    with pytest.raises(LegacyCheckpointError, match=r"'models\.stpm\.STPM'.*python -m adbench\.checkpoints upgrade"):
        adbench.load(legacy)
    with pytest.raises(LegacyCheckpointError, match="upgrade"):
        AnomalyCLI(args=["test", *TINY, f"--ckpt_path={legacy}"])
    upgraded = upgrade(legacy)
    assert torch.load(upgraded, weights_only=False)["hyper_parameters"]["_class_path"] == "adbench.models.stpm.STPM"
    detector = adbench.load(upgraded)
    for name, value in detector.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
