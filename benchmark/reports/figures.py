"""The report's figures: heat map, per-category bars with interval whiskers, speed against quality."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import ticker  # noqa: E402

from adbench.callbacks.metrics import METRIC_LABELS as METRICS  # noqa: E402


def heatmap(tables: dict[str, pd.DataFrame], path: Path) -> Path:
    metrics = [m for m in ("image_auroc", "pixel_auroc") if m in tables]
    first = tables[metrics[0]]
    columns = [c[: -len("_low")] for c in first.columns if c.endswith("_low")]
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(2 + 0.9 * len(columns) * len(metrics), 1.5 + 0.45 * len(first)), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        values = tables[metric].loc[first.index, columns].to_numpy(dtype=float) * 100
        image = ax.imshow(values, cmap="RdYlGn", vmin=50, vmax=100, aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
        ax.set_yticks(range(len(first.index)), first.index)
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, "-" if np.isnan(value) else f"{value:.1f}", ha="center", va="center", fontsize=8)
        ax.set_title(METRICS[metric] + " (%)")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def bars(tables: dict[str, pd.DataFrame], path: Path) -> Path:
    """Per-category bars with whiskers: the 95 % bootstrap interval of the test set where the records have
    one (the mean of the seeds' bounds), else the std over seeds."""
    metrics = [m for m in ("image_auroc", "pixel_auroc", "pro") if m in tables]
    first = tables[metrics[0]]
    categories = [c[: -len("_low")] for c in first.columns if c.endswith("_low")]
    rows = list(first.index)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 0.25 * len(categories) * len(rows) + 2),
                                                       2.6 * len(metrics)), squeeze=False)
    width = 0.8 / max(1, len(rows))
    colours = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")  # more rows than colours would repeat
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        table = tables[metric]
        for k, row in enumerate(rows):
            mean = np.array([table.at[row, c] for c in categories], dtype=float) * 100
            std = np.array([table.at[row, f"{c}_std"] for c in categories], dtype=float) * 100
            low = np.array([table.at[row, f"{c}_low"] for c in categories], dtype=float) * 100
            high = np.array([table.at[row, f"{c}_high"] for c in categories], dtype=float) * 100
            interval = ~(np.isnan(low) | np.isnan(high))
            error = np.where(interval, np.stack([mean - low, high - mean]), np.stack([std, std]))
            x = np.arange(len(categories)) + (k - (len(rows) - 1) / 2) * width
            ax.bar(x, mean, width, yerr=np.nan_to_num(np.clip(error, 0, None)), capsize=2, label=row,
                   color=colours(k % colours.N))
        ax.set_xticks(range(len(categories)), categories)
        ax.set_ylim(max(0.0, np.nanmin([table[c].min() for c in categories]) * 100 - 10), 100.5)
        ax.set_ylabel(METRICS[metric] + " (%)", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[0, 0].set_title("mean per category; whiskers: 95 % bootstrap interval of the test set, or the std over seeds where none",
                         fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def speed_quality(tables: dict[str, pd.DataFrame], path: Path) -> Path | None:
    """Test images per second (log scale) against quality, one point per row: image AUROC, and pixel AP
    where the sweep has it (else pixel AUROC). None when no row has both a speed and a mean."""
    quality = [m for m in ("image_auroc", "pixel_ap" if "pixel_ap" in tables else "pixel_auroc") if m in tables]
    speed = tables[quality[0]]["test_images_per_second"]
    if speed.notna().sum() == 0:
        return None
    fig, axes = plt.subplots(1, len(quality), figsize=(5.2 * len(quality), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], quality, strict=True):
        mean = tables[metric]["mean"].fillna(tables[metric]["partial_mean"]) * 100
        both = mean.notna() & speed.reindex(mean.index).notna()
        x, y = speed.reindex(mean.index)[both], mean[both]
        ax.scatter(x, y, s=28, color="tab:blue", zorder=3)
        for name, xi, yi in zip(y.index, x, y, strict=True):
            ax.annotate(name.split(" (")[0], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
        ax.set_xlabel("test images per second (log scale; this sweep's machine)", fontsize=8)
        ax.set_ylabel(METRICS[metric].split(" (")[0] + ", mean over categories (%)", fontsize=8)
        ax.grid(lw=0.3)
    fig.suptitle("speed against quality: up and to the right is better", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
