"""The benchmark runner: sweep expansion, resume, SIGKILL safety, failures, parallel and DDP jobs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from adbench.benchmark.orchestration.records import iter_records, read_record, write_json_atomic
from adbench.benchmark.orchestration.runner import device_slots, run_jobs
from adbench.benchmark.orchestration.sweep import SweepConfig, SweepConfigError
from adbench.benchmark.reports.leaderboard import build_leaderboard

from .conftest import REPO

#: Tiny jobs: a couple of training steps at 64 px, so a job is a few seconds of work.
TINY = {
    "data.image_size": 64,
    "data.batch_size": 4,
    "trainer.max_epochs": 1,
    "trainer.limit_train_batches": 2,
    "trainer.enable_progress_bar": False,
}


def _sweep_file(tmp_path: Path, embedded_root: Path, **fields: object) -> Path:
    config = {
        "name": "test",
        "methods": ["stpm"],
        "profile": "quick",
        "categories": ["weave"],
        "seeds": [0],
        "root": str(embedded_root),
        "overrides": TINY,
        **fields,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _run(tmp_path: Path, embedded_root: Path, results: Path, **fields: object) -> list[dict]:
    sweep = SweepConfig.from_yaml(_sweep_file(tmp_path, embedded_root, **fields))
    slots = device_slots(sweep.devices_per_job, sweep.parallel, sweep.accelerator)
    return run_jobs(sweep.jobs(), results, slots, retry_failed=sweep.retry_failed,
                    job_timeout_min=sweep.job_timeout_min)


# --------------------------------------------------------------------------- sweep config


def test_sweep_expansion_and_overrides(tmp_path: Path, embedded_root: Path) -> None:
    path = _sweep_file(tmp_path, embedded_root, categories="all", seeds=[0, 1])
    sweep = SweepConfig.from_yaml(path, methods="stpm", seeds=[3])
    jobs = sweep.jobs()
    assert [(j.method, j.category, j.seed) for j in jobs] == [
        ("stpm", c, 3) for c in ("weave", "marble", "disc")
    ]
    config = jobs[0].config()
    assert config["data"]["init_args"]["image_size"] == 64 and config["seed_everything"] == 3
    assert config["data"]["init_args"]["root"] == str(embedded_root)
    assert config["data"]["init_args"]["category"] == ["weave"], "categories travel as a list"
    assert jobs[0].fingerprint() != jobs[1].fingerprint()


def test_a_jobs_config_is_data_and_reads_back_from_its_yaml(tmp_path: Path, embedded_root: Path) -> None:
    import yaml

    from adbench.cli import AnomalyCLI, job_config

    sweep = SweepConfig(methods=["stpm"], categories=["weave", "disc"], setting="unified", root=str(embedded_root),
                        overrides={**TINY, "model.lr": 0.01}, texture_root="procedural")
    job = sweep.jobs()[0]
    config = job.config()
    assert config["model"]["init_args"]["lr"] == 0.01, "a class group's shorthand key lands in its init_args"
    assert config["data"]["init_args"]["category"] == ["weave", "disc"]
    assert config["data"]["init_args"]["texture_source"] == "procedural"
    from_dict = AnomalyCLI(args=config, run=False)
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(config))
    from_file = AnomalyCLI(args=["--config", str(saved)], run=False)
    for cli in (from_dict, from_file):
        assert cli.datamodule.category_names == ["weave", "disc"] and cli.datamodule.image_size == 64
        assert cli.model.hparams.lr == 0.01 and cli.trainer.max_epochs == TINY["trainer.max_epochs"]
    assert from_dict.config.as_dict() == from_file.config.as_dict() | {"config": from_dict.config.as_dict()["config"]}
    with pytest.raises(KeyError, match="no config key"):
        job_config(job.config_file, "mvtec", {"epochs": 3})


def test_sweep_all_methods_come_from_the_registry(tmp_path: Path, embedded_root: Path) -> None:
    from adbench import models

    sweep = SweepConfig.from_yaml(_sweep_file(tmp_path, embedded_root, methods="all"))
    assert set(sweep.resolve_methods()) <= set(models.list_models())
    assert "stpm" in sweep.resolve_methods()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"methods": ["nosuch"]}, "unknown method 'nosuch'"),
        ({"categories": ["bottle"]}, "category 'bottle' not found"),
        ({"precision": "8-bit"}, "precision '8-bit'"),
        ({"profile": "nosuch"}, "no 'nosuch' profile"),
        ({"seeds": []}, "seeds"),
    ],
)
def test_sweep_errors_name_the_value(tmp_path: Path, embedded_root: Path, fields: dict, message: str) -> None:
    with pytest.raises(SweepConfigError, match=message):
        SweepConfig.from_yaml(_sweep_file(tmp_path, embedded_root, **fields)).jobs()


def test_unknown_sweep_key(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text("methods: all\nmethodz: [stpm]\n")
    with pytest.raises(SweepConfigError, match="methodz"):
        SweepConfig.from_yaml(path)


def test_a_bad_override_is_refused_before_any_job_runs(
    tmp_path: Path, embedded_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from adbench.benchmark.run import main

    results = tmp_path / "results"
    sweep = _sweep_file(tmp_path, embedded_root, methods=["stpm", "patchcore"], categories=["weave", "marble"])
    assert main(["--sweep", str(sweep), "--results-dir", str(results), "--set", "model.init_args.nosuch=1"]) == 2
    error = capsys.readouterr().err
    assert "model.init_args.nosuch" in error and "takes no option 'nosuch'" in error
    assert "its options: backbone, layers" in error, "the valid keys are listed"
    assert error.count("error:") == 1, "one message, not one per job"
    assert not results.exists(), "nothing ran"

    assert main(["--sweep", str(sweep), "--results-dir", str(results), "--set", "trainer.max_epochs=two"]) == 2
    assert "trainer.max_epochs" in capsys.readouterr().err
    with pytest.raises(SweepConfigError, match="cpu_isa 'AVX9'"):
        SweepConfig.from_yaml(_sweep_file(tmp_path, embedded_root, cpu_isa="AVX9"))


# --------------------------------------------------------------------------- records


def test_atomic_record_write_leaves_no_partial_file(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "runs" / "a.json", {"status": "ok"})
    assert read_record(path) == {"status": "ok"}
    (tmp_path / "runs" / "b.json").write_text('{"status": "o')  # a torn file from elsewhere
    assert read_record(tmp_path / "runs" / "b.json") is None
    assert [r["status"] for r in iter_records(tmp_path)] == ["ok"]
    assert not list((tmp_path / "runs").glob(".*.tmp"))


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_sweep_runs_records_and_builds_leaderboard_then_resumes(tmp_path: Path, embedded_root: Path) -> None:
    results = tmp_path / "results"
    records = _run(tmp_path, embedded_root, results, categories=["weave", "disc"])
    assert [r["status"] for r in records] == ["ok", "ok"]
    record = records[0]
    assert 0.0 <= record["metrics"]["image_auroc"] <= 1.0
    assert record["timing"]["test_images_per_second"] > 0 and record["timing"]["fit_seconds"] > 0
    assert record["parameters"] > 0 and record["environment"]["torch"]
    assert record["selection"]["checkpoint"] == "best validation"
    assert record["config"]["data"]["init_args"]["category"] in (["weave"], ["disc"])

    tables = build_leaderboard(results)
    runs = pd.read_csv(results / "runs.csv")
    assert len(runs) == 2 and set(runs.status) == {"ok"}
    assert {"method", "category", "seed", "image_auroc", "pixel_auroc", "pro", "image_f1max", "pixel_f1max",
            "test_images_per_second", "fit_seconds", "parameters"} <= set(runs.columns)  # fmt: skip
    assert tables["image_auroc"].loc["stpm (quick)", "weave"] == pytest.approx(
        runs.loc[runs.category == "weave", "image_auroc"].item()
    )
    # Each record carries its 95 % bootstrap intervals (with how they were drawn) and its per-image scores.
    assert record["bootstrap"]["n_resamples"] == 1000 and record["bootstrap"]["seed"] == 0
    for metric in ("image_auroc", "pixel_auroc", "pro"):
        low, high = record["intervals"][metric]
        assert low <= record["metrics"][metric] <= high, metric
    scores = pd.read_csv(results / record["image_scores"])
    assert list(scores.columns) == ["path", "category", "defect_type", "label", "score", "val_f1_threshold",
                                    "predicted_anomalous"]
    assert len(scores) == record["timing"]["test_images"] and set(scores.label) == {0, 1}
    assert not scores.path.str.startswith("/").any(), "paths are relative to the dataset root"
    assert set(scores.defect_type[scores.label == 0]) == {"good"}
    # Beside them, the per-image pixel histograms the report's paired pixel tests use: their sum gives the
    # record's pixel AUROC within the binning's error, their paths are the score file's.
    from adbench.benchmark.reports.paired import histogram_auroc

    with np.load((results / record["image_scores"]).with_suffix(".pixels.npz")) as pixels:
        assert list(pixels["paths"]) == list(scores.path)
        whole = pixels["histograms"].sum(axis=0)
    assert histogram_auroc(whole[0], whole[1]) == pytest.approx(record["metrics"]["pixel_auroc"], abs=0.003)
    from adbench.callbacks.metrics import roc_auc

    assert roc_auc(scores.score, scores.label) == pytest.approx(record["metrics"]["image_auroc"])
    from sklearn.metrics import average_precision_score

    assert average_precision_score(scores.label, scores.score) == pytest.approx(record["metrics"]["image_ap"])
    # The field's metrics, each with its interval; mAD's table first; seg_f1 at the validation threshold.
    assert list(tables)[:2] == ["mad", "image_auroc"] and {"pixel_ap", "pro_fpr05", "pixel_iou_max", "seg_f1"} <= set(tables)
    for metric in ("image_ap", "pixel_ap", "pro_fpr05", "pixel_iou_max", "seg_f1", "mad"):
        low, high = record["intervals"][metric]
        assert low <= record["metrics"][metric] <= high, metric
    assert math.isfinite(record["metrics"]["seg_f1"])
    for name in ("leaderboard.md", "leaderboard.html", "leaderboard_heatmap.png", "leaderboard_pro.csv"):
        assert (results / name).stat().st_size > 0, name
    markdown = (results / "leaderboard.md").read_text()
    assert "stpm (quick)" in markdown and "scores/stpm__quick__weave__seed0.csv" in markdown

    # Rerun: every job finished -> nothing runs.
    before = {p: p.stat().st_mtime_ns for p in (results / "runs").glob("*.json")}
    started = time.time()
    assert _run(tmp_path, embedded_root, results, categories=["weave", "disc"]) == []
    assert time.time() - started < 5
    assert before == {p: p.stat().st_mtime_ns for p in (results / "runs").glob("*.json")}

    # A changed job definition invalidates its record.
    rerun = _run(tmp_path, embedded_root, results, categories=["weave"], overrides={**TINY, "data.batch_size": 2})
    assert [r["job_id"] for r in rerun] == ["stpm__quick__weave__seed0"]


@pytest.mark.slow
def test_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path: Path, embedded_root: Path) -> None:
    results = tmp_path / "results"
    records = _run(
        tmp_path, embedded_root, results,
        categories=["weave", "disc"], method_overrides={"stpm": {}},
        seeds=[0],
    )  # fmt: skip
    assert all(r["status"] == "ok" for r in records)
    # Inject a failure for one category only: a config value the DataModule rejects.
    sweep = SweepConfig.from_yaml(_sweep_file(tmp_path, embedded_root, categories=["marble"]))
    job = sweep.jobs()[0]
    job.overrides["data.val_fraction"] = 2.0
    failed = run_jobs([job], results, device_slots(1, None))
    assert failed[0]["status"] == "failed" and "val_fraction" in failed[0]["error"]
    assert "Traceback" in failed[0]["traceback"]

    build_leaderboard(results)
    runs = pd.read_csv(results / "runs.csv")
    assert runs.set_index("category").loc["marble", "status"] == "failed"
    markdown = (results / "leaderboard.md").read_text()
    assert "## Failed jobs" in markdown and "val_fraction" in markdown
    assert "failed" in (results / "leaderboard.html").read_text()


@pytest.mark.slow
def test_killed_sweep_resumes_without_loss_or_duplicates(tmp_path: Path, embedded_root: Path) -> None:
    results = tmp_path / "results"
    categories = ["weave", "marble", "disc"]
    sweep_path = _sweep_file(tmp_path, embedded_root, categories=categories)
    command = [sys.executable, "-m", "adbench.benchmark.run", "--sweep", str(sweep_path), "--results-dir", str(results)]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while not list((results / "runs").glob("*.json")) and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "the sweep finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # the runner and its running job, at once
    process.wait()

    first = {p.name: read_record(p) for p in (results / "runs").glob("*.json")}
    assert 1 <= len(first) < len(categories)
    assert all(r is not None and r["status"] == "ok" for r in first.values()), "no corrupt record"

    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    final = {p.name: read_record(p) for p in (results / "runs").glob("*.json")}
    assert sorted(final) == sorted(f"stpm__quick__{c}__seed0.json" for c in categories)
    assert all(r["status"] == "ok" for r in final.values())
    for name, record in first.items():  # finished before the kill: kept, not rerun
        assert final[name]["launch_token"] == record["launch_token"]
    assert len(pd.read_csv(results / "runs.csv")) == len(categories)


@pytest.mark.slow
def test_a_job_past_its_time_limit_is_stopped_and_recorded_as_failed(tmp_path: Path, embedded_root: Path) -> None:
    results = tmp_path / "results"
    endless = {**TINY, "trainer.max_epochs": 100_000, "trainer.limit_train_batches": 1.0}
    started = time.time()
    [record] = _run(tmp_path, embedded_root, results, overrides=endless, job_timeout_min=0.25)
    assert time.time() - started < 120, "a hung job must not hang the sweep"
    assert record["status"] == "failed" and record["error"].startswith("timed out: stopped after 0.")
    assert "job_timeout_min" in record["error"]
    assert read_record(results / "runs" / f"{record['job_id']}.json")["error"] == record["error"]
    with pytest.raises(SweepConfigError, match="job_timeout_min must be > 0"):
        SweepConfig.from_yaml(_sweep_file(tmp_path, embedded_root, job_timeout_min=0))


@pytest.mark.slow
def test_two_jobs_in_parallel_on_cpu(tmp_path: Path, embedded_root: Path) -> None:
    records = _run(tmp_path, embedded_root, tmp_path / "results", categories=["weave", "disc"], parallel=2)
    assert [r["status"] for r in records] == ["ok", "ok"]
    # Both processes must be running at once: each was launched before the other finished (launch
    # times come from the runner, so a job that imports and trains faster than the other still counts).
    (a_start, a_end), (b_start, b_end) = ((r["launched_unix"], r["finished_unix"]) for r in records)
    assert a_start < b_end and b_start < a_end, "the two jobs should overlap in time"
    assert all(r["environment"]["cuda_visible_devices"] == "" for r in records)


@pytest.mark.slow
def test_ddp_job_with_two_cpu_processes(tmp_path: Path, embedded_root: Path) -> None:
    records = _run(tmp_path, embedded_root, tmp_path / "results", devices_per_job=2, accelerator="cpu")
    assert records[0]["status"] == "ok", records[0].get("traceback")
    assert records[0]["config"]["trainer"]["strategy"] == "ddp"
    assert int(records[0]["config"]["trainer"]["devices"]) == 2
    assert 0.0 <= records[0]["metrics"]["pixel_auroc"] <= 1.0


@pytest.mark.slow
def test_wandb_offline_sweep(tmp_path: Path, embedded_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    results = tmp_path / "results"
    command = [sys.executable, "-m", "adbench.benchmark.run", "--sweep", str(_sweep_file(tmp_path, embedded_root)),
               "--results-dir", str(results), "--wandb", "offline"]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env={**os.environ, "WANDB_MODE": "offline"})
    assert [r["status"] for r in iter_records(results)] == ["ok"]
    job_runs = list((results / "jobs").rglob("offline-run-*"))
    leaderboard_runs = list((results / "wandb").glob("offline-run-*"))
    assert job_runs and leaderboard_runs


@pytest.mark.slow
def test_named_variants_become_their_own_jobs_and_rows(tmp_path: Path, embedded_root: Path) -> None:
    sweep = SweepConfig.from_yaml(
        _sweep_file(
            tmp_path, embedded_root,
            methods=["stpm", "stpm-sum"],
            variants={"stpm-sum": {"method": "stpm", "overrides": {"model.init_args.map_fusion": "sum"}}},
        )
    )  # fmt: skip
    plain, variant = sweep.jobs()
    assert (plain.name, plain.method, variant.name, variant.method) == ("stpm", "stpm", "stpm-sum", "stpm")
    assert variant.config()["model"]["init_args"]["map_fusion"] == "sum"
    assert plain.config()["model"]["init_args"]["map_fusion"] == "product"
    assert plain.job_id != variant.job_id

    results = tmp_path / "results"
    records = run_jobs([variant], results, device_slots(1, None))
    assert records[0]["status"] == "ok" and records[0]["config"]["model"]["init_args"]["map_fusion"] == "sum"
    tables = build_leaderboard(results)
    assert list(tables["image_auroc"].index) == ["stpm-sum (quick)"]
    published = (results / "leaderboard.md").read_text().split("Ours vs published")[1].split("## Significance")[0]
    assert "stpm-sum" not in published, (
        "a variant is never set beside the method's published figures"
    )


def test_shipped_sweeps_are_valid(embedded_root: Path) -> None:
    for path in sorted((REPO / "configs" / "sweeps").glob("*.yaml")):
        sweep = SweepConfig.from_yaml(path, root=str(embedded_root))
        assert sweep.jobs(), path


def test_paper_protocol_trains_on_all_of_train_good_and_is_named_in_the_leaderboard(tmp_path: Path) -> None:
    from dataclasses import asdict

    from adbench.benchmark.reports.leaderboard import runs_frame

    selected = SweepConfig(methods=["stpm"], categories=["weave"]).jobs()[0]
    paper = SweepConfig(methods=["stpm"], categories=["weave"], protocol="paper").jobs()[0]
    assert paper.config()["data"]["init_args"]["val_fraction"] == 0
    assert "val_fraction" not in selected.config()["data"]["init_args"]
    assert paper.fingerprint() != selected.fingerprint()
    with pytest.raises(SweepConfigError, match="protocol"):
        SweepConfig(protocol="tuned").validate()
    records = [{**asdict(spec), "status": "ok", "metrics": {"image_auroc": 0.9}} for spec in (selected, paper)]
    profiles = sorted(runs_frame(records).profile)
    assert profiles == ["quick", "quick, paper protocol"]


def test_ablation_table_pairs_each_arm_with_its_full_method_by_seed() -> None:
    from adbench.benchmark.reports.ablation_table import ablation_table
    from adbench.benchmark.reports.leaderboard import runs_frame

    def record(name: str, method: str, seed: int, pixel: float) -> dict:
        return {"name": name, "method": method, "profile": "quick", "category": "bottle", "seed": seed,
                "status": "ok", "metrics": {"pixel_auroc": pixel}}  # fmt: skip

    records = [record("rstpm", "rstpm", 0, 0.90), record("rstpm", "rstpm", 1, 0.94),
               record("rstpm-no-attention", "rstpm", 0, 0.80), record("rstpm-no-attention", "rstpm", 1, 0.86),
               record("stpm", "stpm", 0, 0.91), record("stpm", "stpm", 1, 0.91)]  # fmt: skip
    table = ablation_table(runs_frame(records), ["pixel_auroc"], baselines={"rstpm": "stpm"}).set_index("row")
    assert table.loc["rstpm", "pixel_auroc"] == "92.0 ± 2.8"
    # Paired by seed: deltas 10 and 8 -> +9.0 ± 1.4 (unpaired means would give the same mean, another std).
    assert table.loc["rstpm-no-attention", "Δ pixel_auroc"] == "+9.0 ± 1.4"
    assert table.loc["stpm", "Δ pixel_auroc"] == "rstpm: +1.0 ± 2.8"


def test_ablation_table_marks_deltas_whose_two_records_ran_in_different_environments(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from adbench.benchmark.orchestration.records import RUNS_FOLDER, write_json_atomic
    from adbench.benchmark.reports.ablation_table import main

    xeon = {"packages": {"torch": "2.14.1"}, "cpu": "Xeon", "torch_cpu_capability": "AVX512"}
    epyc = {**xeon, "cpu": "EPYC", "torch_cpu_capability": "AVX2"}
    # rstpm's seed 0 ran on the Xeon, everything else on the EPYC: only the seed-0 deltas cross.
    for name, seed, pixel, env in (("rstpm", 0, 0.90, xeon), ("rstpm", 1, 0.94, epyc),
                                   ("rstpm-no-attention", 0, 0.80, epyc), ("rstpm-no-attention", 1, 0.86, epyc),
                                   ("rstpm-no-second-pair", 1, 0.90, epyc)):  # fmt: skip
        write_json_atomic(tmp_path / RUNS_FOLDER / f"{name}__{seed}.json", {
            "name": name, "method": "rstpm", "profile": "quick", "categories": ["bottle"], "seed": seed,
            "status": "ok", "metrics": {"pixel_auroc": pixel}, "environment": env})  # fmt: skip
    assert main([str(tmp_path), "--metrics", "pixel_auroc"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line for line in out.splitlines() if line.startswith("| bottle")}
    assert "+9.0 ± 1.4 †" in rows["rstpm-no-attention"]  # seeds 0 and 1 pair, seed 0 across CPUs
    assert "+4.0" in rows["rstpm-no-second-pair"] and "†" not in rows["rstpm-no-second-pair"]
    assert "† 1 of 3 paired deltas compare records of different environments (cpu, torch_cpu_capability differ)" in out


def test_ablation_table_reads_several_folders_first_record_wins_and_keeps_named_rows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from adbench.benchmark.orchestration.records import RUNS_FOLDER, write_json_atomic
    from adbench.benchmark.reports.ablation_table import main

    def record(folder: str, name: str, seed: int, image: float, category: str = "bottle") -> None:
        # Records before 2026-12-05 name their category in "category" only; later ones in "categories".
        where = {"category": category} if folder == "seeds" else {"categories": [category]}
        write_json_atomic(tmp_path / folder / RUNS_FOLDER / f"{name}__{category}__{seed}.json", {
            "name": name, "method": name, "profile": "quick", **where, "seed": seed, "status": "ok",
            "metrics": {"image_auroc": image}})  # fmt: skip

    for seed, image in enumerate((0.90, 0.94)):
        record("seeds", "stpm", seed, image)
        record("seeds", "rstpm", seed, image + 0.02)
    record("seeds", "stpm", 0, 0.50, category="transistor")  # another category: not the same job
    record("rivals", "stpm", 0, 0.10)  # the same job again: the first folder's record counts
    record("rivals", "glass", 0, 0.80)
    record("rivals", "simplenet", 0, 0.70)
    # Records from before jobs recorded their baseline: their sweep's YAML (rivals.yaml: glass vs simplenet).
    for path in (tmp_path / "rivals" / RUNS_FOLDER).glob("*.json"):
        write_json_atomic(path, {**json.loads(path.read_text()), "sweep": "rivals"})
    assert main([str(tmp_path / "seeds"), str(tmp_path / "rivals"), "--metrics", "image_auroc",
                 "--rows", "stpm,glass,simplenet"]) == 0  # fmt: skip
    lines = {tuple(cell.strip() for cell in line.split("|")[1:3]): line
             for line in capsys.readouterr().out.splitlines()[2:] if line.startswith("|")}  # fmt: skip
    assert sorted(lines) == [("bottle", "glass"), ("bottle", "simplenet"), ("bottle", "stpm"), ("transistor", "stpm")]
    assert "92.0 ± 2.8" in lines[("bottle", "stpm")] and "+10.0" in lines[("bottle", "simplenet")]  # glass - baseline


def test_seed_methods_are_compared_with_the_baseline_their_sweep_declares(
        tmp_path: Path, embedded_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import asdict

    from adbench.benchmark.orchestration.records import RUNS_FOLDER
    from adbench.benchmark.reports.ablation_table import main

    sweep = SweepConfig.from_yaml(REPO / "configs" / "sweeps" / "ablations.yaml", root=str(embedded_root),
                                  categories=["weave"], methods=["draem", "draem-pretrained-encoder", "pouta", "stpm", "rstpm"])  # fmt: skip
    assert sweep.baselines["pouta"] == sweep.baselines["tsdn"] == "draem-pretrained-encoder"
    jobs = {j.name: j for j in sweep.jobs()}
    assert jobs["pouta"].baseline == "draem-pretrained-encoder" and jobs["rstpm"].baseline == "stpm"
    assert jobs["draem"].baseline is None
    # Same budget as DRAEM quick, only the encoder switched.
    variant, draem = jobs["draem-pretrained-encoder"].config(), jobs["draem"].config()
    assert variant["model"]["init_args"].pop("encoder") == "tf_efficientnet_lite0"
    assert variant == draem
    for name, image in (("pouta", 0.95), ("draem", 0.80), ("draem-pretrained-encoder", 0.90)):
        write_json_atomic(tmp_path / RUNS_FOLDER / f"{name}.json", {
            **asdict(jobs[name]), "status": "ok", "metrics": {"image_auroc": image}})  # fmt: skip
    assert main([str(tmp_path), "--metrics", "image_auroc"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line for line in out.splitlines() if line.startswith("| weave")}
    assert "pouta: +5.0" in rows["draem-pretrained-encoder"]  # on the same encoder, not +15 against scratch DRAEM
    assert "pouta" not in rows["draem"]
    assert "pouta vs draem-pretrained-encoder" in out
    with pytest.raises(SweepConfigError, match="baselines"):
        SweepConfig(baselines={"pouta": "draem-same"}).validate()


def test_ablation_forest_plot_draws_the_paired_deltas_of_shared_seeds(tmp_path: Path) -> None:
    from adbench.benchmark.reports.ablation_table import paired_deltas, plot_deltas
    from adbench.benchmark.reports.leaderboard import runs_frame

    def record(name: str, method: str, seed: int, pixel: float) -> dict:
        return {"name": name, "method": method, "profile": "quick", "category": "bottle", "seed": seed,
                "status": "ok", "metrics": {"pixel_auroc": pixel}}  # fmt: skip

    # The arm lacks seed 2 and has a failed seed 1: only seed 0 pairs.
    records = [record("pouta", "pouta", 0, 0.90), record("pouta", "pouta", 1, 0.94), record("pouta", "pouta", 2, 0.9),
               record("pouta-finest-only", "pouta", 0, 0.85), record("draem", "draem", 1, 0.70),
               {**record("pouta-finest-only", "pouta", 1, 0.1), "status": "failed"}]  # fmt: skip
    deltas = paired_deltas(runs_frame(records), ["pixel_auroc"], {"pouta": "draem"}).set_index(["row", "seed"])
    assert sorted(deltas.index) == [("draem", 1), ("pouta-finest-only", 0)]
    assert deltas.loc[("pouta-finest-only", 0), "delta"] == pytest.approx(5.0)
    assert deltas.loc[("draem", 1), ["vs", "kind"]].tolist() == ["pouta", "baseline"]
    path = plot_deltas(deltas.reset_index(), tmp_path / "deltas.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000


def test_ablation_table_compares_an_arm_with_its_partner_and_prints_the_sweeps_notes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An arm that cannot keep the full method's map rule is read against its sweep ``partner`` too
    (partner minus arm, by seed); a variant's ``note`` and a renamed arm's are footnotes of the table."""
    from adbench.benchmark.orchestration.records import RUNS_FOLDER, write_json_atomic
    from adbench.benchmark.reports.ablation_table import RENAMED, main

    sweep = tmp_path / "arms.yaml"
    sweep.write_text(yaml.safe_dump({"name": "arms", "methods": ["tsdn", "tsdn-one-stream", "tsdn-map-reconstruction"],
                                     "variants": {
        "tsdn-one-stream": {"method": "tsdn", "overrides": {"model.init_args.two_stream": False},
                            "partner": "tsdn-map-reconstruction", "note": "the map is the reconstruction error"},
        "tsdn-map-reconstruction": {"method": "tsdn", "overrides": {"model.init_args.anomaly_map": "reconstruction"}},
    }}))  # fmt: skip
    assert SweepConfig.from_yaml(sweep).variants["tsdn-one-stream"]["partner"] == "tsdn-map-reconstruction"
    pixel = {"tsdn": (0.90, 0.94), "tsdn-one-stream": (0.80, 0.84), "tsdn-map-reconstruction": (0.70, 0.76),
             "rstpm-no-discriminator": (0.5, 0.5)}  # fmt: skip
    for name, values in pixel.items():
        for seed, value in enumerate(values):
            write_json_atomic(tmp_path / "results" / RUNS_FOLDER / f"{name}__{seed}.json", {
                "name": name, "method": name.split("-")[0], "profile": "quick", "categories": ["bottle"],
                "seed": seed, "status": "ok", "metrics": {"pixel_auroc": value}})  # fmt: skip
    assert main([str(tmp_path / "results"), "--metrics", "pixel_auroc", "--sweeps", str(sweep)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "| tsdn-one-stream " in line)
    # Full minus arm: 10 and 10; partner minus arm: -10 and -8.
    assert "tsdn: +10.0 ± 0.0, tsdn-map-reconstruction: -9.0 ± 1.4" in row and "[2]" in row
    assert "[1] rstpm-no-discriminator: " + RENAMED["rstpm-no-discriminator"] in out
    assert "[2] tsdn-one-stream: the map is the reconstruction error" in out


def test_ablation_table_compares_a_unified_model_with_the_same_rows_per_category(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A unified job's per-category metrics are rows of their own: per-category minus unified by category
    and seed, and a unified arm against the unified full method, not against the per-category one."""
    from adbench.benchmark.orchestration.records import RUNS_FOLDER, write_json_atomic
    from adbench.benchmark.reports.ablation_table import main

    def record(name: str, seed: int, by_category: dict[str, float]) -> None:
        categories = list(by_category)
        unified = len(categories) > 1
        write_json_atomic(tmp_path / RUNS_FOLDER / f"{name}__{'unified' if unified else categories[0]}__{seed}.json", {
            "name": name, "method": "uniad", "profile": "quick", "categories": categories, "seed": seed,
            "status": "ok", "setting": "unified" if unified else "per-category",
            "metrics": {"pixel_auroc": sum(by_category.values()) / len(categories)},
            "metrics_by_category": {c: {"pixel_auroc": v} for c, v in by_category.items()}})  # fmt: skip

    for seed, (bottle, transistor) in enumerate(((0.98, 0.90), (0.96, 0.92))):
        record("uniad", seed, {"bottle": bottle})
        record("uniad", seed, {"transistor": transistor})
        record("uniad", seed, {"bottle": bottle - 0.01 * (seed + 1), "transistor": transistor - 0.10})
        record("uniad-no-neighbour-mask", seed, {"bottle": bottle - 0.05, "transistor": transistor - 0.20})
    assert main([str(tmp_path), "--metrics", "pixel_auroc"]) == 0
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line
            for line in capsys.readouterr().out.splitlines() if line.startswith(("| bottle", "| transistor"))}  # fmt: skip
    assert sorted(rows) == [(c, r) for c in ("bottle", "transistor")
                            for r in ("uniad", "uniad (unified)", "uniad-no-neighbour-mask (unified)")]  # fmt: skip
    assert "| uniad " in rows[("bottle", "uniad (unified)")] and "+1.5 ± 0.7" in rows[("bottle", "uniad (unified)")]
    assert "+10.0 ± 0.0" in rows[("transistor", "uniad (unified)")]
    # The unified arm against the unified model: 5 - 1 and 5 - 2 points on bottle; 10 on transistor.
    assert "uniad (unified)" in rows[("bottle", "uniad-no-neighbour-mask (unified)")]
    assert "+3.5 ± 0.7" in rows[("bottle", "uniad-no-neighbour-mask (unified)")]
    assert "+10.0 ± 0.0" in rows[("transistor", "uniad-no-neighbour-mask (unified)")]


def test_the_ablation_sweeps_partners_and_notes_are_valid() -> None:
    from adbench.benchmark.reports.ablation_table import notes, partners, sweep_variants

    path = REPO / "configs" / "sweeps" / "ablations.yaml"
    config = SweepConfig.from_yaml(path)  # partner and note are variant keys the sweep accepts
    assert partners(sweep_variants([path])) == {"tsdn-one-stream": "tsdn-map-reconstruction"}
    assert set(partners(sweep_variants())) >= {"tsdn-one-stream"}  # every sweep YAML by default
    assert {"rstpm-no-attention", "tsdn-one-stream"} <= set(notes(sweep_variants([path])))
    assert all(p in config.variants for p in partners(config.variants).values())


@pytest.mark.slow
def test_two_sweeps_on_one_results_folder_run_each_job_once(tmp_path: Path, embedded_root: Path) -> None:
    results = tmp_path / "results"
    categories = ["weave", "marble", "disc"]
    sweep_path = _sweep_file(tmp_path, embedded_root, categories=categories)
    command = [sys.executable, "-m", "adbench.benchmark.run", "--sweep", str(sweep_path), "--results-dir", str(results)]
    other = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list((results / "runs" / ".locks").glob("*.lock")) and time.time() < deadline:
        time.sleep(0.1)
    sweep = SweepConfig.from_yaml(sweep_path)
    mine = run_jobs(sweep.jobs(), results, device_slots(1, None))
    out, _ = other.communicate(timeout=600)
    theirs = {line.split()[2] for line in out.splitlines() if line.startswith("[sweep] done")}
    ours = {r["job_id"] for r in mine}
    assert not ours & theirs, "no job ran twice"
    assert ours | theirs == {f"stpm__quick__{c}__seed0" for c in categories}
    assert all(r["status"] == "ok" for r in iter_records(results)), "no false failure"
    assert not list((results / "runs" / ".locks").glob("*.lock")), "locks released"


def test_bench_patchcore_reads_the_metrics_lightning_prints(capsys: pytest.CaptureFixture[str]) -> None:
    # Lightning prints a plain table, or a rich one with box-drawing borders when rich is
    # installed (memray brings it): the benchmark must read both.
    from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop

    from adbench.benchmark.experiments.bench_patchcore import printed_test_metrics

    _EvaluationLoop._print_results([{"test/image_auroc": 0.875, "test/pixel_auroc": 0.9979014992713928}], "test")
    printed = capsys.readouterr().out
    assert printed_test_metrics(printed) == {"image_auroc": "0.875", "pixel_auroc": "0.9979014992713928"}
    rich_row = "│     test/pixel_auroc      │    0.9979014992713928     │"
    assert printed_test_metrics(rich_row) == {"pixel_auroc": "0.9979014992713928"}
    assert printed_test_metrics("test/pro 0.5") == {}


def test_split_seed_follows_the_seed_unless_the_sweep_fixes_it(tmp_path: Path, embedded_root: Path) -> None:
    path = _sweep_file(tmp_path, embedded_root, seeds=[0, 1, 2])
    following = SweepConfig.from_yaml(path).jobs()
    assert [(j.seed, j.split_seed, j.split_seed_source) for j in following] == [(s, s, "seed") for s in (0, 1, 2)]
    assert [j.config()["data"]["init_args"]["split_seed"] for j in following] == [0, 1, 2]
    fixed = SweepConfig.from_yaml(path, split_seed=7).jobs()
    assert [(j.split_seed, j.split_seed_source) for j in fixed] == [(7, "sweep")] * 3
    assert [j.config()["data"]["init_args"]["split_seed"] for j in fixed] == [7, 7, 7]
    assert fixed[0].fingerprint() != following[0].fingerprint()
    with pytest.raises(SweepConfigError, match="split_seed"):
        SweepConfig(split_seed="seed").validate()


def test_validation_saturation_on_crafted_histories() -> None:
    from adbench.benchmark.orchestration.records import (
        record_saturated,
        saturation_rate,
        selection_saturation,
    )

    def history(*scores: float) -> list[dict]:
        return [{"epoch": i, "selection_score": s} for i, s in enumerate(scores)]

    assert selection_saturation(history(0.8, 1.0, 0.9), 1.0)["reason"] == "maximum"
    assert selection_saturation(history(0.95, 0.94, 0.951), 0.951)["reason"] == "first"  # +0.001: a tie
    assert selection_saturation(history(0.97), 0.97)["reason"] == "first"  # validated once: nothing ranked
    improving = selection_saturation(history(0.9, 0.99, 0.995), 0.995)
    assert improving == {"saturated": False, "reason": None, "ranked_epochs": 3}
    # A staged method's not-ready epochs (-1) are no candidates: the first candidate is 0.9.
    assert selection_saturation(history(-1.0, 0.9, 0.96), 0.96)["saturated"] is False
    assert selection_saturation(history(-1.0, 0.96, 0.9), 0.96)["reason"] == "first"
    assert selection_saturation([], None)["saturated"] is None

    def record(status: str, *scores: float) -> dict:
        return {"status": status, "selection": {"history": history(*scores), "best_val_score": max(scores)}}

    records = [record("ok", 0.9, 1.0), record("ok", 0.9, 0.95), record("warning", 0.97, 0.96),
               record("failed", 0.5, 1.0), {"status": "ok", "selection": {"history": [], "best_val_score": None}}]  # fmt: skip
    assert [record_saturated(r) for r in records] == [True, False, True, None, None]
    assert saturation_rate(records) == (2, 3)
