#!/usr/bin/env bash
# The spread of the learned-quality tests ("separates embedded defects after brief training"),
# from which their bounds are set: seeds 0-2 on this CPU's best instruction set and seed 0
# with torch pinned to AVX2 (as an AVX2-only machine runs). Appends to results/test_quality.jsonl.
#   tests/measure_quality.sh [SEEDS...]
set -euo pipefail
cd "$(dirname "$0")/.."
log=${ADBENCH_QUALITY_LOG:-results/test_quality.jsonl}
select=separates  # the six "...separates embedded defects..." tests
seeds=("$@"); [ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
for seed in "${seeds[@]}"; do
  ADBENCH_QUALITY_LOG="$log" ADBENCH_TEST_SEED="$seed" .venv/bin/pytest -q -n 2 -k "$select" tests -p no:cacheprovider
done
ADBENCH_QUALITY_LOG="$log" ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/pytest -q -n 2 -k "$select" tests \
  -p no:cacheprovider
.venv/bin/python - "$log" <<'PY'
import sys
import pandas as pd
frame = pd.read_json(sys.argv[1], lines=True)
frame["cpu_isa"] = frame["cpu_isa"].fillna("best")
print(frame.groupby(["test", "cpu_isa"])[["image_auroc", "pixel_auroc"]].agg(["min", "max", "count"]).round(3)
      .to_string())
PY
