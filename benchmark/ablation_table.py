"""The ablation study's table: each arm beside its full method, paired by category and seed.

    python -m benchmark.ablation_table results/ablations_quick [--metrics image_auroc,pixel_auroc,pro]

For every row (a method, a variant of it, or a baseline) and category: mean +- std
over seeds of each metric (in %), and for a variant its delta to the full method
it ablates, computed seed by seed (same seed, same category) with the std of
those paired deltas. Baselines (``BASELINES``) get the delta of the method built
on them, so "full minus baseline" reads the same way as "full minus ablation":
positive = the full method is better. Rows come from the records of one results
folder (``runs/*.json``); only ``ok`` records count, and the seeds each mean
covers are printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from benchmark.leaderboard import METRICS, runs_frame
from benchmark.records import iter_records

#: The baseline each seed method builds on (methods.md): its row gets "method minus baseline".
BASELINES = {"rstpm": "stpm", "pouta": "draem", "tsdn": "draem"}


def _cell(values: pd.Series) -> str:
    values = values.dropna() * 100
    if values.empty:
        return "-"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}" if len(values) > 1 else f"{values.mean():.1f}"


def ablation_table(runs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per (category, row name): mean ± std per metric and the paired delta to the full method."""
    ok = runs[runs.status.isin(("ok", "warning"))]
    rows = []
    for (category, name), group in ok.groupby(["category", "name"], sort=True):
        method = group.method.iloc[0]
        # A variant is compared with the full method it ablates (baselines: below).
        full = ok[(ok.name == method) & (ok.category == category)] if name != method else None
        row = {"category": category, "row": name, "seeds": ",".join(str(s) for s in sorted(group.seed))}
        for metric in metrics:
            row[metric] = _cell(group[metric])
            if full is not None and len(full):
                paired = full.set_index("seed")[metric].sub(group.set_index("seed")[metric]).dropna()
                row[f"Δ {metric}"] = _delta(paired)  # full minus arm, seed by seed
                row["vs"] = method
        rows.append(row)
    for method, baseline in BASELINES.items():
        for category in sorted(ok.category.unique()):
            full = ok[(ok.name == method) & (ok.category == category)].set_index("seed")
            base = ok[(ok.name == baseline) & (ok.category == category)].set_index("seed")
            if full.empty or base.empty:
                continue
            for row in rows:
                if row["category"] == category and row["row"] == baseline:
                    row.setdefault("vs", "")
                    row["vs"] = ",".join(filter(None, [row["vs"], method]))
                    for metric in metrics:
                        key = f"Δ {metric}"
                        delta = _delta(full[metric].sub(base[metric]).dropna())
                        row[key] = ", ".join(filter(None, [row.get(key), f"{method}: {delta}"]))
    columns = ["category", "row", "seeds", *metrics, "vs", *(f"Δ {m}" for m in metrics)]
    return pd.DataFrame(rows).reindex(columns=columns).fillna("")


def _delta(paired: pd.Series) -> str:
    paired = paired * 100
    if paired.empty:
        return "-"
    if len(paired) == 1:
        return f"{paired.iloc[0]:+.1f}"
    return f"{paired.mean():+.1f} ± {paired.std(ddof=1):.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir")
    parser.add_argument("--metrics", default="image_auroc,pixel_auroc,pro")
    args = parser.parse_args(argv)
    metrics = [m for m in args.metrics.split(",") if m]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        parser.error(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    runs = runs_frame(iter_records(Path(args.results_dir)))
    table = ablation_table(runs, metrics)
    print(table.to_markdown(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
