"""``make benchmark``: run a sweep and write the leaderboard.

    python -m benchmark.run --sweep configs/sweeps/default.yaml \
        [--methods stpm,patchcore] [--categories bottle,screw] [--seeds 0,1] [--profile quick] \
        [--root MVTEC_ROOT] [--texture-root DTD_ROOT] [--precision bf16-mixed] \
        [--devices-per-job 2] [--parallel 2] [--results-dir results] [--wandb offline]

Command-line values override the sweep YAML. Finished jobs are skipped, so the
same command resumes an interrupted sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmark.leaderboard import build_leaderboard
from benchmark.runner import device_slots, run_jobs
from benchmark.sweep import SweepConfig, SweepConfigError


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
    parser.add_argument("--root", help="MVTec AD root (default: the embedded dataset)")
    parser.add_argument("--texture-root", help="DTD-style texture folder for pseudo-anomalies")
    parser.add_argument("--precision", help="32-true, 16-mixed, bf16-mixed")
    parser.add_argument("--protocol", choices=("selected", "paper"),
                        help="selected: checkpoint chosen on held-out train/good (default); "
                             "paper: all of train/good, last epoch")
    parser.add_argument("--devices", dest="devices_per_job", type=int, help="devices per job (>1: DDP)")
    parser.add_argument("--parallel", type=int, help="jobs at once (default: one per GPU group, else 1)")
    parser.add_argument("--wandb", choices=("off", "offline", "online"), help="log jobs to Weights & Biases")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        key: getattr(args, key)
        for key in ("methods", "categories", "seeds", "profile", "root", "texture_root",
                    "precision", "protocol", "devices_per_job", "parallel")
    }  # fmt: skip
    try:
        sweep = SweepConfig.from_yaml(args.sweep, **overrides)
        if args.wandb:
            sweep.wandb = {**sweep.wandb, "enabled": args.wandb != "off", "mode": args.wandb}
        jobs = sweep.jobs()
    except (SweepConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results_dir = Path(args.results_dir)
    slots = device_slots(sweep.devices_per_job, sweep.parallel, sweep.accelerator)
    print(f"[sweep] {sweep.name}: {len(jobs)} job(s) = {len(sweep.resolve_methods())} method(s) x "
          f"{len(jobs) // max(1, len(sweep.resolve_methods()) * len(sweep.seeds))} category(ies) x "
          f"{len(sweep.seeds)} seed(s), {len(slots)} at a time -> {results_dir}")
    run_jobs(jobs, results_dir, slots, retry_failed=sweep.retry_failed)
    tables = build_leaderboard(results_dir, jobs=jobs)
    print((results_dir / "leaderboard.md").read_text())
    if sweep.wandb.get("enabled"):
        from benchmark.wandb_report import log_leaderboard

        log_leaderboard(results_dir, sweep, tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
