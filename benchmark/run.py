"""``make benchmark``: run a sweep and write the leaderboard.

    python -m adbench.benchmark.run --sweep configs/sweeps/default.yaml \
        [--methods stpm,patchcore] [--categories bottle,screw] [--seeds 0,1] [--profile quick] \
        [--root MVTEC_ROOT] [--texture-root DTD_ROOT] [--precision bf16-mixed] \
        [--devices 2] [--parallel 2] [--results-dir results] [--wandb offline] \
        [--set data.image_size=128 --set trainer.max_epochs=2] [--dry-run] \
        [--launcher slurm --slurm partition=gpu --slurm gpus_per_job=1 [--no-wait]] [--leaderboard-only]

Command-line values override the sweep YAML. Finished jobs are skipped, so the
same command resumes an interrupted sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from adbench.benchmark.orchestration.launchers import LAUNCHERS, SlurmSettings
from adbench.benchmark.orchestration.runner import device_slots, execution_of, is_finished
from adbench.benchmark.orchestration.sweep import JobSpec, SweepConfig, SweepConfigError
from adbench.benchmark.reports.leaderboard import build_leaderboard
from adbench.cli import config_error


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a benchmark sweep and build the leaderboard.")
    parser.add_argument("--sweep", default="configs/sweeps/default.yaml", help="sweep YAML")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--methods", help="comma-separated registry names, or 'all'")
    parser.add_argument("--categories", help="comma-separated categories, or 'all'")
    parser.add_argument("--seeds", type=_int_list)
    parser.add_argument("--profile", help="config profile of every method (quick, paper)")
    parser.add_argument("--dataset", help="a registered dataset (mvtec, visa, mvtec3d, btad, mpdd, loco, folder)")
    parser.add_argument("--root", help="dataset root (default: the embedded dataset, MVTec layout)")
    parser.add_argument("--shots", type=_shots_list, help="few-shot: comma-separated, e.g. 1,4,full")
    parser.add_argument("--setting", choices=("per-category", "unified"), help="one model per category, or one for all")
    parser.add_argument("--texture-root", help="DTD-style texture folder for pseudo-anomalies")
    parser.add_argument("--precision", help="32-true, 16-mixed, bf16-mixed")
    parser.add_argument("--cpu-isa", help="CPU jobs: highest instruction set for oneDNN (e.g. AVX2: the same "
                        "numbers on any x86-64 CPU with AVX2); default: the sweep's, else the CPU's best")
    parser.add_argument("--protocol", choices=("selected", "paper"),
                        help="selected: checkpoint chosen on held-out train/good (default); "
                             "paper: all of train/good, last epoch")
    parser.add_argument("--devices", dest="devices_per_job", type=int, help="devices per job (>1: DDP)")
    parser.add_argument("--parallel", type=int, help="jobs at once (default: one per GPU group, else 1)")
    parser.add_argument("--job-timeout-min", type=float,
                        help="local launcher: stop a job after this many minutes and record it as failed")
    parser.add_argument("--wandb", choices=("off", "offline", "online"), help="log jobs to Weights & Biases")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every job (dotted CLI key), repeatable")
    parser.add_argument("--launcher", choices=("local", "slurm"), help="where jobs run (default: the YAML's, local)")
    parser.add_argument("--slurm", dest="slurm_sets", action="append", default=[], metavar="KEY=VALUE",
                        help="slurm setting: partition, account, time_min, gpus_per_job, cpus_per_job, mem_gb, "
                             "array_parallelism; repeatable")
    parser.add_argument("--no-wait", action="store_true", help="slurm: submit and return")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs that would run and those skipped")
    parser.add_argument("--leaderboard-only", action="store_true", help="rebuild the leaderboard from the records")
    return parser.parse_args(argv)


def _shots_list(text: str) -> list[int | str]:
    return [item.strip() if item.strip() == "full" else int(item) for item in text.split(",") if item.strip()]


def _pairs(items: list[str], flag: str) -> dict[str, object]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SweepConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        pairs[key] = yaml.safe_load(value)
    return pairs


def check_job_configs(jobs: list[JobSpec]) -> None:
    """Refuse the sweep before anything runs when a job's config would not parse (an override key no
    class takes, a value of the wrong type): once per distinct config, not once per failed job."""
    checked: set[str] = set()
    for job in jobs:
        config = job.config()
        # Jobs that differ only in seed or categories parse alike.
        same_parse = {**config, "seed_everything": None,
                      "data": {**config["data"], "init_args": {**config["data"]["init_args"], "category": None}}}
        if (key := json.dumps(same_parse, sort_keys=True, default=str)) in checked:
            continue
        checked.add(key)
        if error := config_error(config):
            raise SweepConfigError(f"job {job.job_id} ({job.config_file}, overrides {job.overrides}): {error}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        key: getattr(args, key)
        for key in ("methods", "categories", "seeds", "profile", "dataset", "root", "shots", "setting", "texture_root",
                    "precision", "cpu_isa", "protocol", "devices_per_job", "parallel", "job_timeout_min")
    }  # fmt: skip
    try:
        sweep = SweepConfig.from_yaml(args.sweep, **overrides, launcher=args.launcher)
        if args.wandb:
            sweep.wandb = {**sweep.wandb, "enabled": args.wandb != "off", "mode": args.wandb}
        sweep.overrides = {**sweep.overrides, **_pairs(args.sets, "--set")}
        sweep.slurm = {**sweep.slurm, **_pairs(args.slurm_sets, "--slurm")}
        slurm = SlurmSettings.from_dict(sweep.slurm)  # built (and checked) once, used by the launcher
        jobs = sweep.jobs()
        check_job_configs(jobs)
    except (SweepConfigError, FileNotFoundError, yaml.YAMLError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results_dir = Path(args.results_dir)
    if args.dry_run or args.leaderboard_only:
        execution = (slurm.execution() if sweep.launcher == "slurm"
                     else execution_of(device_slots(sweep.devices_per_job, sweep.parallel, sweep.accelerator)[0]))
        jobs = [replace(j, execution=execution) for j in jobs]
    if args.dry_run:
        for job in jobs:
            print(f"{'skip' if is_finished(results_dir, job, sweep.retry_failed) else 'run '} {job.job_id}")
        return 0
    if not args.leaderboard_only:
        print(f"[sweep] {sweep.name}: {len(jobs)} job(s) = {len(sweep.resolve_methods())} method(s) x "
              f"{len(jobs) // max(1, len(sweep.resolve_methods()) * len(sweep.seeds))} category(ies) x "
              f"{len(sweep.seeds)} seed(s), launcher {sweep.launcher} -> {results_dir}")
        try:
            LAUNCHERS[sweep.launcher](jobs, results_dir, sweep, wait=not args.no_wait, slurm=slurm)
        except KeyboardInterrupt:
            print("\n[sweep] interrupted: finished records are kept; rerun the same command to resume",
                  file=sys.stderr)
        if args.no_wait:
            return 0
    if not list((results_dir / "runs").glob("*.json")):
        print(f"error: no job records under {str(results_dir / 'runs')!r} yet", file=sys.stderr)
        return 1
    tables = build_leaderboard(results_dir, jobs=jobs)
    print((results_dir / "leaderboard.md").read_text())
    if sweep.wandb.get("enabled"):
        from adbench.benchmark.reports.wandb_report import log_leaderboard

        log_leaderboard(results_dir, sweep, tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
