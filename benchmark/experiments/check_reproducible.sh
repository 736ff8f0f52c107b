#!/usr/bin/env bash
# Does `make benchmark` give the same numbers again, from nothing? Two fresh clones of this
# commit, each with its own venv built from the lock and its own empty HOME (so its own copy of
# the embedded dataset), run `make benchmark` one after the other; then every job's per-image
# scores, metrics, intervals, threshold and training loss, and the leaderboard CSVs (less their
# speed and memory columns), are compared bit for bit.
#
#   benchmark/experiments/check_reproducible.sh [WORKDIR]
#   SECOND_ENV='NPY_DISABLE_CPU_FEATURES=X86_V4 AVX512_ICL AVX512_SPR' benchmark/experiments/check_reproducible.sh
#       runs the second clone as a machine whose numpy has no AVX-512 would (see results/reproducibility.md)
# Exit status 0: identical; 1: something differs (listed).
set -euo pipefail
repo=$(git rev-parse --show-toplevel)
commit=$(git -C "$repo" rev-parse HEAD)
work=${1:-$(mktemp -d /tmp/adbench-reproduce.XXXX)}
echo "[reproduce] commit $commit in $work${SECOND_ENV:+ (second clone with $SECOND_ENV)}"
for side in first second; do
  extra=()
  if [ "$side" = second ] && [ -n "${SECOND_ENV:-}" ]; then extra=("$SECOND_ENV"); fi
  rm -rf "${work:?}/$side" "$work/$side-home"
  git clone -q "$repo" "$work/$side" && git -C "$work/$side" -c advice.detachedHead=false checkout -q "$commit"
  mkdir -p "$work/$side-home"
  start=$(date +%s)
  (cd "$work/$side" && env HOME="$work/$side-home" "${extra[@]}" make venv >"$work/$side-venv.log" 2>&1 \
     && env HOME="$work/$side-home" "${extra[@]}" make benchmark >"$work/$side-benchmark.log" 2>&1)
  echo "[reproduce] $side: make venv + make benchmark in $(( $(date +%s) - start )) s"
done
"$work/first/.venv/bin/python" - "$work/first/results" "$work/second/results" <<'PY'
import json, sys
from pathlib import Path

import pandas as pd

first, second = map(Path, sys.argv[1:3])
keys = ("status", "metrics", "metrics_by_category", "intervals", "val_image_threshold", "training_loss")
differences, jobs = [], sorted(p.name for p in (first / "runs").glob("*.json"))
if not jobs:
    sys.exit(f"no job records under {first / 'runs'}")
for name in jobs:
    other = second / "runs" / name
    if not other.is_file():
        differences.append(f"{name}: missing in the second run")
        continue
    a, b = json.loads((first / "runs" / name).read_text()), json.loads(other.read_text())
    differences += [f"{name}: {key} differs" for key in keys if a.get(key) != b.get(key)]
    # Scores name each image by path: under each clone's own HOME for the embedded dataset.
    scores = Path(name).with_suffix(".csv").name
    a, b = ((side / "scores" / scores).read_text().replace(str(side.parent.parent / f"{side.parent.name}-home"), "HOME")
            for side in (first, second))
    if a != b:
        differences.append(f"{name}: per-image scores differ")
# The leaderboard CSVs, byte for byte once the measured speed and memory columns are set aside.
timing = ("test_images_per_second", "fit_seconds", "peak_memory_mb")
for table in sorted(p.name for p in first.glob("leaderboard_*.csv")):
    a, b = (pd.read_csv(side / table) for side in (first, second))
    a, b = (t.drop(columns=[c for c in timing if c in t.columns]).to_csv(index=False) for t in (a, b))
    if a != b:
        differences.append(f"{table}: differs")
print(f"[reproduce] {len(jobs)} jobs and {len(list(first.glob('leaderboard_*.csv')))} leaderboard CSVs compared: " + ("identical" if not differences else f"{len(differences)} differences"))
print("\n".join(differences))
sys.exit(1 if differences else 0)
PY
