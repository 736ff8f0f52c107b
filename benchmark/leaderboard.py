"""Job records -> leaderboard tables (CSV, Markdown, HTML) and a heatmap, with pandas.

    python -m benchmark.leaderboard RESULTS_DIR

Writes into RESULTS_DIR:

* ``runs.csv``: one row per job (metrics in 0..1, times, throughput, memory, parameters);
* ``leaderboard_<metric>.csv``: rows = method (profile), columns = categories, their
  ``_std`` over seeds, the mean over categories, the paper-reported mean and
  speed/memory columns;
* ``leaderboard.md`` / ``leaderboard.html``: every metric table (in %, mean +- std
  over seeds where several), and the failed jobs with their errors;
* ``leaderboard_heatmap.png``: methods x categories for image and pixel AUROC.
"""

from __future__ import annotations

import argparse
import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import models  # noqa: E402
from benchmark.records import iter_records  # noqa: E402

METRICS = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "pro": "PRO (AUPRO, FPR <= 0.3)",
    "image_f1max": "Image F1-max",
    "pixel_f1max": "Pixel F1-max",
}
EFFICIENCY = {
    "test_images_per_second": "img/s",
    "fit_seconds": "fit s",
    "peak_memory_mb": "peak MB",
    "parameters_m": "params M",
}
RUN_COLUMNS = [
    "name", "method", "profile", "category", "seed", "status", *METRICS, "val_saturated",
    "fit_seconds", "test_seconds", "test_images_per_second", "train_steps_per_second",
    "fit_peak_memory_mb", "test_peak_memory_mb", "parameters", "precision", "devices",
    "error", "job_id", "git_commit", "device", "finished",
]  # fmt: skip


def runs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per job, flat."""
    rows = []
    for r in records:
        timing, env = r.get("timing") or {}, r.get("environment") or {}
        rows.append({
            "name": r.get("name") or r.get("method"),
            **{k: r.get(k) for k in ("method", "category", "seed", "status", "precision",
                                     "devices", "error", "job_id", "finished", "parameters")},
            # Which protocol produced the row is part of its name (see benchmark/sweep.py PROTOCOLS).
            "profile": (r.get("profile") or "") + (", paper protocol" if r.get("protocol") == "paper" else ""),
            "val_saturated": ((r.get("selection") or {}).get("saturation") or {}).get("saturated"),
            **{m: (r.get("metrics") or {}).get(m) for m in METRICS},
            **{k: timing.get(k) for k in ("fit_seconds", "test_seconds", "test_images_per_second",
                                          "train_steps_per_second", "fit_peak_memory_mb",
                                          "test_peak_memory_mb")},
            "git_commit": env.get("git_commit"),
            "device": env.get("device"),
        })  # fmt: skip
    frame = pd.DataFrame(rows, columns=RUN_COLUMNS)
    return frame.sort_values(["name", "profile", "category", "seed"], ignore_index=True)


def _row_name(method: str, profile: str) -> str:
    return f"{method} ({profile})"


def metric_table(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows = method (profile); columns: per category mean and std over seeds, mean, paper, efficiency."""
    ok = runs[runs.status == "ok"].copy()
    ok["row"] = [_row_name(m, p) for m, p in zip(ok.name, ok.profile, strict=True)]
    all_rows = sorted({_row_name(m, p) for m, p in zip(runs.name, runs.profile, strict=True)})
    categories = list(dict.fromkeys(runs.category))
    table = pd.DataFrame(index=pd.Index(all_rows, name="method"))
    grouped = ok.groupby(["row", "category"])[metric]
    means, stds = grouped.mean().unstack(), grouped.std(ddof=1).unstack()
    for category in categories:
        table[category] = means.get(category)
        table[f"{category}_std"] = stds.get(category)
    # Mean over categories per seed, then mean/std across seeds: the std is the seed-to-seed spread.
    per_seed = ok.groupby(["row", "seed"])[metric].mean().groupby("row")
    table["mean"] = per_seed.mean()
    table["mean_std"] = per_seed.std(ddof=1)
    table["paper"] = [_paper_value(row, metric) for row in table.index]
    efficiency = ok.assign(
        peak_memory_mb=ok[["fit_peak_memory_mb", "test_peak_memory_mb"]].max(axis=1),
        parameters_m=ok.parameters / 1e6,
    ).groupby("row")[list(EFFICIENCY)].mean()
    return table.join(efficiency)


def _paper_value(row: str, metric: str) -> float:
    """The paper's figure, for rows that are a registered method (not for variants/ablations)."""
    method = row.split(" (")[0]
    try:
        return models.get_model_class(method).paper_results.get(metric, np.nan)
    except KeyError:
        return np.nan


def _cell(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "-"
    return f"{100 * mean:.1f}" + ("" if pd.isna(std) else f" ± {100 * std:.1f}")


def display_table(runs: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Human-readable version: % with 1 decimal, mean ± std, 'failed' where every seed failed."""
    failed = runs[runs.status != "ok"]
    failed_cells = {(_row_name(m, p), c) for m, p, c in zip(failed.name, failed.profile, failed.category, strict=True)}
    categories = [c for c in table.columns if f"{c}_std" in table.columns and c != "mean"]
    shown = pd.DataFrame(index=table.index)
    for category in categories:
        shown[category] = [
            "failed" if pd.isna(table.at[row, category]) and (row, category) in failed_cells
            else _cell(table.at[row, category], table.at[row, f"{category}_std"])
            for row in table.index
        ]
    shown["mean"] = [_cell(m, s) for m, s in zip(table["mean"], table["mean_std"], strict=True)]
    shown["paper (MVTec mean)"] = [_cell(v, np.nan) for v in table["paper"]]
    for column, label in EFFICIENCY.items():
        shown[label] = [("-" if pd.isna(v) else f"{v:.1f}" if v < 100 else f"{v:.0f}") for v in table[column]]
    return shown


def heatmap(tables: dict[str, pd.DataFrame], path: Path) -> Path:
    metrics = [m for m in ("image_auroc", "pixel_auroc") if m in tables]
    first = tables[metrics[0]]
    columns = [c for c in first.columns if f"{c}_std" in first.columns]
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(2 + 0.9 * len(columns) * len(metrics), 1.5 + 0.45 * len(first)), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        values = tables[metric][columns].to_numpy(dtype=float) * 100
        image = ax.imshow(values, cmap="RdYlGn", vmin=50, vmax=100, aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
        ax.set_yticks(range(len(first.index)), first.index)
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, "fail" if np.isnan(value) else f"{value:.1f}", ha="center", va="center", fontsize=8)
        ax.set_title(METRICS[metric] + " (%)")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_leaderboard(results_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Write every leaderboard file into ``results_dir``; return the numeric tables."""
    results_dir = Path(results_dir)
    records = iter_records(results_dir)
    if not records:
        raise FileNotFoundError(f"no job records under {str(results_dir / 'runs')!r}")
    runs = runs_frame(records)
    runs.to_csv(results_dir / "runs.csv", index=False)
    tables = {metric: metric_table(runs, metric) for metric in METRICS}
    markdown, html_parts = ["# Leaderboard", ""], ["<html><head><meta charset='utf-8'><title>Leaderboard</title>",
                                                   "<style>td,th{padding:2px 8px;text-align:right}</style></head><body>"]
    for metric, table in tables.items():
        table.to_csv(results_dir / f"leaderboard_{metric}.csv", float_format="%.6f")
        shown = display_table(runs, table)
        markdown += [f"## {METRICS[metric]} (%)", "", shown.to_markdown(), ""]
        html_parts += [f"<h2>{html.escape(METRICS[metric])} (%)</h2>", shown.to_html(border=0)]
    failed = runs[runs.status != "ok"][["job_id", "error"]]
    if len(failed):
        markdown += ["## Failed jobs", "", failed.to_markdown(index=False), ""]
        html_parts += ["<h2>Failed jobs</h2>", failed.to_html(index=False, border=0)]
    n_ok = int((runs.status == "ok").sum())
    footer = f"{n_ok} of {len(runs)} jobs ok; paper column: MVTec AD mean over 15 categories as published."
    saturated = runs[runs.val_saturated.fillna(False).astype(bool)]
    if len(saturated):
        rows = ", ".join(sorted({f"{n} ({p})" for n, p in zip(saturated.name, saturated.profile, strict=True)}))
        footer += (f" Checkpoint selection saturated in {len(saturated)} of {n_ok} jobs (best validation score"
                   f" >= 0.995 or tied epochs: the synthetic validation anomalies could not rank them): {rows}.")
    markdown.append(footer)
    html_parts += [f"<p>{html.escape(footer)}</p>", "</body></html>"]
    (results_dir / "leaderboard.md").write_text("\n".join(markdown) + "\n")
    (results_dir / "leaderboard.html").write_text("\n".join(html_parts))
    if n_ok:
        heatmap(tables, results_dir / "leaderboard_heatmap.png")
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="results")
    args = parser.parse_args()
    build_leaderboard(args.results_dir)
    print((Path(args.results_dir) / "leaderboard.md").read_text())


if __name__ == "__main__":
    main()
