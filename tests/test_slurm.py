"""The SLURM launcher against a real one-node SLURM cluster on this machine (.ci/slurm-up)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from adbench.benchmark import run
from adbench.benchmark.orchestration.records import iter_records

from .conftest import REPO
from .test_benchmark import TINY

#: Set by .ci/run, which starts the cluster: there these tests must run, never skip.
REQUIRE_SLURM = os.environ.get("ADBENCH_REQUIRE_SLURM") == "1"


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    was_up = shutil.which("sinfo") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    if not was_up:
        if os.geteuid() != 0 and not REQUIRE_SLURM:
            pytest.skip("no SLURM running and not root: cannot start the one-node cluster (.ci/slurm-up)")
        started = subprocess.run([str(REPO / ".ci" / "slurm-up")], capture_output=True, text=True, timeout=600)
        if started.returncode != 0:
            if REQUIRE_SLURM:
                pytest.fail(f".ci/slurm-up failed: {started.stderr[-2000:]}")
            pytest.skip(f"the one-node SLURM cluster did not start: {started.stderr[-300:]}")
    yield
    if not was_up:
        subprocess.run(["scontrol", "shutdown"], capture_output=True)


def _sweep(tmp_path: Path, embedded_root: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({
        "name": "slurm-test", "methods": ["stpm"], "profile": "quick", "categories": ["weave", "disc"],
        "seeds": [0], "root": str(embedded_root), "overrides": TINY, "launcher": "slurm",
        "slurm": {"cpus_per_job": 1, "mem_gb": 3, "time_min": 20, "array_parallelism": 1},
    }))  # fmt: skip
    return path


@pytest.mark.slow
def test_slurm_sweep_records_leaderboard_and_resume_after_scancel(
    slurm_cluster: None, tmp_path: Path, embedded_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    sweep = _sweep(tmp_path, embedded_root)
    # Submit without waiting, cancel the second task while the first runs (parallelism 1).
    assert run.main(["--sweep", str(sweep), "--results-dir", str(results), "--no-wait"]) == 0
    array = next(line for line in capsys.readouterr().out.splitlines() if "submitted array" in line).split()[3]
    subprocess.run(["scancel", f"{array}_1"], check=True)
    deadline = time.time() + 600
    while len(list((results / "runs").glob("*.json"))) < 1 and time.time() < deadline:
        time.sleep(1)
    while subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True).stdout.strip():
        time.sleep(1)  # the first task has written its record and left the queue
    first = iter_records(results)
    assert len(first) == 1 and first[0]["status"] == "ok"

    # Rerun: only the cancelled job is submitted; every job ends recorded exactly once.
    assert run.main(["--sweep", str(sweep), "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "[slurm] 1 of 2 job(s) to run (1 finished)" in out
    records = iter_records(results)
    assert sorted(r["job_id"] for r in records) == ["stpm__quick__disc__seed0", "stpm__quick__weave__seed0"]
    assert all(r["status"] == "ok" and r["execution"]["device"] == "slurm" for r in records)
    assert next(r for r in records if r["job_id"] == first[0]["job_id"])["started_unix"] == first[0]["started_unix"]
    runs = pd.read_csv(results / "runs.csv")
    assert len(runs) == 2 and (results / "leaderboard.html").is_file()


def test_leaderboard_only_and_dry_run(tmp_path: Path, embedded_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = _sweep(tmp_path, embedded_root)
    assert run.main(["--sweep", str(sweep), "--results-dir", str(tmp_path / "r"), "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == ["run", "stpm__quick__weave__seed0", "run", "stpm__quick__disc__seed0"]
    assert run.main(["--sweep", str(sweep), "--results-dir", str(tmp_path / "r"), "--leaderboard-only"]) == 1
    assert "no job records" in capsys.readouterr().err
    assert run.main(["--sweep", str(sweep), "--slurm", "partition"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert run.main(["--sweep", str(sweep), "--slurm", "gpus=1"]) == 2
    assert "unknown slurm setting(s) ['gpus']" in capsys.readouterr().err


@pytest.mark.slow
def test_a_preempted_task_checkpoints_requeues_resumes_and_ends_with_one_record(
    slurm_cluster: None, tmp_path: Path, embedded_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    path = tmp_path / "sweep.yaml"
    long_enough = {**TINY, "trainer.max_epochs": 100, "trainer.check_val_every_n_epoch": 10}
    path.write_text(json.dumps({
        "name": "slurm-preempt", "methods": ["stpm"], "profile": "quick", "categories": ["weave"], "seeds": [0],
        "root": str(embedded_root), "overrides": long_enough, "launcher": "slurm",
        "slurm": {"cpus_per_job": 1, "mem_gb": 3, "time_min": 20},
    }))  # fmt: skip
    assert run.main(["--sweep", str(path), "--results-dir", str(results), "--no-wait"]) == 0
    array = next(line for line in capsys.readouterr().out.splitlines() if "submitted array" in line).split()[3]
    checkpoints = results / "jobs" / "stpm__quick__weave__seed0" / "checkpoints"
    deadline = time.time() + 900
    # Training is under way once the first validation (epoch 9) has written best.ckpt.
    while not (checkpoints / "best.ckpt").is_file() and time.time() < deadline:
        time.sleep(0.5)
    assert (checkpoints / "best.ckpt").is_file(), "the task never started training"
    subprocess.run(["scancel", "--signal=USR2", array], check=True)  # what SLURM sends before preempting
    released = False
    while time.time() < deadline:
        state = subprocess.run(["scontrol", "show", "job", array], capture_output=True, text=True).stdout
        if not released and "Restarts=1" in state and "JobState=PENDING" in state:
            # SLURM holds a requeued job for ~2 minutes; the test, as administrator, lets it start now.
            subprocess.run(["scontrol", "update", f"JobId={array}", "StartTime=now"], check=True)
            released = True
        record = next(iter(iter_records(results)), None)
        queued = subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True).stdout.strip()
        if record is not None and not queued:
            break
        time.sleep(1)
    records = iter_records(results)
    assert len(records) == 1 and records[0]["status"] == "ok", records[0].get("error") if records else "no record"
    resumed = records[0]["resumed_from"]
    assert resumed is not None and resumed["epoch"] >= 9, resumed
    assert records[0]["config"]["trainer"]["max_epochs"] == 100
    assert not (checkpoints / "requeue.ckpt").exists(), "the resumed attempt removes its resume file"
    assert released, "the task was never requeued"


@pytest.mark.slow
def test_two_concurrent_submissions_of_one_sweep_run_each_job_once(
    slurm_cluster: None, tmp_path: Path, embedded_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    sweep = _sweep(tmp_path, embedded_root)
    command = ["--sweep", str(sweep), "--results-dir", str(results)]
    # The first submission returns at once; the second, made while the first's tasks wait or run
    # (both arrays at parallelism 1, one CPU each: their first tasks start together), waits for its own.
    assert run.main([*command, "--no-wait"]) == 0
    assert run.main(command) == 0
    out = capsys.readouterr().out
    assert out.count("[slurm] 2 of 2 job(s) to run (0 finished)") == 2, "each submission submitted both jobs"
    arrays = [line.split()[3] for line in out.splitlines() if "submitted array" in line]
    deadline = time.time() + 900
    while any(subprocess.run(["squeue", "-h", "-j", a], capture_output=True, text=True).stdout.strip() for a in arrays):
        assert time.time() < deadline, "the first submission's tasks never ended"
        time.sleep(1)
    records = iter_records(results)
    job_ids = ["stpm__quick__disc__seed0", "stpm__quick__weave__seed0"]
    assert sorted(r["job_id"] for r in records) == job_ids
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    # Every task's own output: across both arrays, each job was fitted once and skipped once.
    logs = [path.read_text() for path in (results / "slurm").rglob("*.out")]
    assert len(logs) == 4, sorted(str(p) for p in (results / "slurm").rglob("*.out"))
    for job_id in job_ids:
        fitted = sum(f"[job] {job_id}: ok" in log for log in logs)
        skipped = sum(f"[job] {job_id}: skipped" in log for log in logs)
        assert (fitted, skipped) == (1, 1), (job_id, fitted, skipped)
    assert not list((results / "runs" / ".locks").glob("*.lock")), "every lock released"
