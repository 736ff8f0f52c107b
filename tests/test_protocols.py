"""Protocols beyond one category of MVTec AD: datasets by name in the sweep, few-shot
training (``train_shots`` / ``shots``) and the unified multi-class setting (``setting``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from adbench.benchmark.orchestration.runner import device_slots, run_jobs
from adbench.benchmark.orchestration.sweep import SweepConfig, SweepConfigError
from adbench.benchmark.reports.leaderboard import build_leaderboard
from adbench.cli import AnomalyCLI
from adbench.datamodules import MVTecDataModule, get_dataset_class
from adbench.datamodules.base import DatasetError

from .dataset_layouts import BUILDERS

TINY = {
    "data.image_size": 64,
    "data.batch_size": 4,
    "trainer.max_epochs": 1,
    "trainer.limit_train_batches": 2,
    "trainer.enable_progress_bar": False,
}


def _sweep(tmp_path: Path, **fields: object) -> SweepConfig:
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({"name": "protocols", "methods": ["stpm"], "profile": "quick", "seeds": [0],
                                "overrides": TINY, **fields}))
    return SweepConfig.from_yaml(path)


# --------------------------------------------------------------------------- few-shot


def test_few_shot_draws_k_images_per_category_seeded_and_keeps_the_validation_split(embedded_root: Path) -> None:
    def fit_files(**kwargs: object) -> tuple[list[str], list[str]]:
        data = MVTecDataModule(root=str(embedded_root), category="weave,disc", image_size=32, **kwargs)
        data.setup("fit")
        return [s.image_path.as_posix() for s in data.train_set.samples], data.val_set.samples

    full, full_val = fit_files()
    four, four_val = fit_files(train_shots=4)
    again, _ = fit_files(train_shots=4)
    other_seed, _ = fit_files(train_shots=4, split_seed=1)
    assert [Path(p).parts[-4] for p in four].count("weave") == 4 and len(four) == 8
    assert four == again, "the same seed draws the same shots"
    assert set(four) <= set(full) and set(four) != set(other_seed), "drawn from the training part, by the seed"
    assert four_val == full_val, "few-shot training leaves the validation images as they are"
    data = MVTecDataModule(root=str(embedded_root), category="weave", image_size=32, train_shots=2)
    data.setup("fit")
    assert len(data.shot_files) == 2 and all(Path(p).is_file() for p in data.shot_files)


def test_few_shot_beyond_the_training_images_is_a_clear_error(embedded_root: Path) -> None:
    data = MVTecDataModule(root=str(embedded_root), category="weave", image_size=32, train_shots=10_000)
    with pytest.raises(DatasetError, match="train_shots=10000 but only"):
        data.setup("fit")
    with pytest.raises(ValueError, match="train_shots must be a positive"):
        MVTecDataModule(root=str(embedded_root), category="weave", train_shots=0)


# --------------------------------------------------------------------------- datasets by name


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_sweep_selects_a_dataset_by_name_and_its_jobs_load_it(tmp_path: Path, name: str) -> None:
    root = tmp_path / name
    counts = BUILDERS[name](root)
    sweep = _sweep(tmp_path, dataset=name, root=str(root), categories="all")
    jobs = sweep.jobs()
    assert [j.category for j in jobs] == [counts.category]
    assert jobs[0].job_id == f"stpm__quick__{name}-{counts.category}__seed0"
    cli = AnomalyCLI(args=jobs[0].config(), run=False)
    assert type(cli.datamodule) is get_dataset_class(name)
    data = cli.datamodule
    data.setup()
    assert len(data.train_set) + len(data.val_set or []) == counts.train
    assert int(data.test_set.labels.sum()) == counts.test_anomalous
    assert len(data.test_set) == counts.test_good + counts.test_anomalous


def test_sweep_dataset_errors_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(SweepConfigError, match="dataset 'nosuch' is not registered"):
        _sweep(tmp_path, dataset="nosuch", root=str(tmp_path))
    with pytest.raises(SweepConfigError, match="needs a root"):
        _sweep(tmp_path, dataset="visa")
    with pytest.raises(SweepConfigError, match="setting 'joint'"):
        _sweep(tmp_path, setting="joint")
    with pytest.raises(SweepConfigError, match="shots must list positive integers"):
        _sweep(tmp_path, shots=[0, "full"])


# --------------------------------------------------------------------------- shots x unified, end to end


@pytest.mark.slow
def test_shots_and_unified_sweep_expand_and_the_leaderboard_has_their_columns(
    tmp_path: Path, embedded_root: Path
) -> None:
    sweep = _sweep(tmp_path, root=str(embedded_root), categories=["weave", "disc"], shots=[1, 4])
    assert [(j.category, j.shots) for j in sweep.jobs()] == [("weave", 1), ("weave", 4), ("disc", 1), ("disc", 4)]
    assert sweep.jobs()[1].config()["data"]["init_args"]["train_shots"] == 4

    unified = _sweep(tmp_path, root=str(embedded_root), categories=["weave", "disc"], setting="unified",
                     shots=[2])
    jobs = unified.jobs()
    assert [(j.categories, j.job_id) for j in jobs] == [(["weave", "disc"], "stpm__quick__unified__seed0__shots2")]
    assert jobs[0].config()["data"]["init_args"]["category"] == ["weave", "disc"]
    results = tmp_path / "results"
    records = run_jobs(jobs, results, device_slots(1, None, "auto"))
    record = records[0]
    assert record["status"] in ("ok", "warning"), record.get("error")
    assert set(record["metrics_by_category"]) == {"weave", "disc"}
    assert len(record["shot_files"]) == 4, "2 shots in each of the 2 categories"
    scores = pd.read_csv(results / record["image_scores"])
    assert set(scores.category) == {"weave", "disc"}
    for category, metrics in record["metrics_by_category"].items():
        assert 0.0 <= metrics["pixel_auroc"] <= 1.0, category
    # The union's image AUROC is not the mean of the categories' (scores are ranked across them).
    build_leaderboard(results, jobs=jobs)
    runs = pd.read_csv(results / "runs.csv")
    assert list(runs.category) == ["disc", "weave"] and set(runs.setting) == {"unified"}
    assert set(runs.shots) == {2}
    for row in runs.itertuples():
        assert row.pixel_auroc == pytest.approx(record["metrics_by_category"][row.category]["pixel_auroc"])
    text = (results / "leaderboard.md").read_text()
    assert "stpm (quick, unified, 2-shot)" in text


def test_the_leaderboard_groups_rows_by_dataset_and_never_averages_across_them(tmp_path: Path) -> None:
    from adbench.benchmark.orchestration.records import write_json_atomic

    metrics = {"image_auroc": 0.9, "pixel_auroc": 0.8, "pro": 0.7, "image_f1max": 0.6, "pixel_f1max": 0.5}
    for dataset, category, value in (("mvtec", "weave", 0.9), ("visa", "candle", 0.5), ("visa", "pcb1", 0.7)):
        job = f"stpm__quick__{dataset}-{category}__seed0"
        write_json_atomic(tmp_path / "runs" / f"{job}.json", {
            "sweep": "grouped", "name": "stpm", "method": "stpm", "profile": "quick", "dataset": dataset,
            "category": category, "seed": 0, "status": "ok", "job_id": job, "finished_unix": 1.0,
            "metrics": {**metrics, "image_auroc": value},
        })
    tables = build_leaderboard(tmp_path, sweep_name="grouped")
    image = tables["image_auroc"]
    assert image.loc["stpm (quick)", "mean"] == pytest.approx(0.9)
    assert image.loc["stpm (quick; visa)", "mean"] == pytest.approx(0.6), "visa's mean is over visa's categories"
    text = (tmp_path / "leaderboard.md").read_text()
    section = text[text.index("## Image AUROC"):text.index("## Pixel AUROC")]
    mvtec_part, visa_part = section.split("Dataset: visa")
    assert "Dataset: mvtec" in mvtec_part and "weave" in mvtec_part and "candle" not in mvtec_part
    assert "candle" in visa_part and "pcb1" in visa_part and "weave" not in visa_part


def test_loco_and_folder_load_through_the_sweep(tmp_path: Path) -> None:
    from PIL import Image

    def image(path: Path, value: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), (value, 100, 200 - value)).save(path)

    def mask(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        array = Image.new("L", (48, 40), 0)
        array.paste(255, (4, 4, 20, 20))
        array.save(path)

    # MVTec LOCO AD: official validation, several masks per defective image.
    loco = tmp_path / "loco" / "pushpins"
    for i in range(4):
        image(loco / "train" / "good" / f"{i:03d}.png", i)
    for i in range(2):
        image(loco / "validation" / "good" / f"{i:03d}.png", 10 + i)
        image(loco / "test" / "good" / f"{i:03d}.png", 20 + i)
    image(loco / "test" / "logical_anomalies" / "000.png", 30)
    mask(loco / "ground_truth" / "logical_anomalies" / "000" / "000.png")
    mask(loco / "ground_truth" / "logical_anomalies" / "000" / "001.png")
    jobs = _sweep(tmp_path, dataset="loco", root=str(tmp_path / "loco"), categories="all").jobs()
    assert [j.job_id for j in jobs] == ["stpm__quick__loco-pushpins__seed0"]
    data = AnomalyCLI(args=jobs[0].config(), run=False).datamodule
    data.setup()
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (4, 2, 3)
    assert type(data).report_per_defect_type

    # folder: the user's layout, given as sweep data overrides only.
    own = tmp_path / "own"
    for i in range(5):
        image(own / "ok" / f"{i}.jpg", i)
    image(own / "test_ok" / "0.jpg", 50)
    image(own / "defects" / "dent" / "0.jpg", 60)
    mask(own / "defects" / "dent" / "0.png")
    overrides = {**TINY, "data.normal": "ok", "data.test_normal": "test_ok",
                 "data.test_abnormal": "defects/*/*.jpg", "data.mask": "{parent}/{stem}.png"}
    jobs = _sweep(tmp_path, dataset="folder", root=str(own), categories=["my-part"], overrides=overrides).jobs()
    assert [j.job_id for j in jobs] == ["stpm__quick__folder-my-part__seed0"]
    data = AnomalyCLI(args=jobs[0].config(), run=False).datamodule
    data.setup()
    assert len(data.train_set) + len(data.val_set or []) == 5 and sorted(data.test_set.defect_types) == ["dent", "good"]
