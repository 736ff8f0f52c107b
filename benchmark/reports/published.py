"""Published MVTec AD figures per category (``benchmark/reports/published/mvtec_ad.csv``) beside ours.

A method's published 15-category mean is never set beside our mean over fewer categories:
the comparison is per category, and a mean is taken over the categories both have, with
their number. Methods whose papers publish means only (``paper_results`` of the model
class) are compared only when the sweep covers all 15 categories.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from adbench import models
from adbench.datamodules import MVTEC_CATEGORIES

PUBLISHED_FILE = Path(__file__).resolve().parent / "published" / "mvtec_ad.csv"
COMPARED = ("image_auroc", "pixel_auroc", "pro")


def load_published(path: str | Path = PUBLISHED_FILE) -> pd.DataFrame:
    """One row per (method, category); metrics in 0..1 (the file holds percent as printed)."""
    table = pd.read_csv(path)
    for metric in COMPARED:
        table[metric] = table[metric] / 100.0
    return table


def comparison(means: pd.DataFrame, row_methods: dict[str, str], metric: str,
               published: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Ours vs published per category, and the mean over the categories both have.

    ``means``: rows = leaderboard rows, columns = categories (our mean over seeds);
    ``row_methods``: leaderboard row -> registry name, for rows that are a registered
    method as published (not variants). Returns the table (cells ``ours``, ``published``,
    ``delta`` per category) and notes for methods that publish means only.
    """
    published = load_published() if published is None else published
    categories = [c for c in means.columns if c in MVTEC_CATEGORIES]
    rows, notes = [], []
    for row, method in row_methods.items():
        ref = published[published.method == method].set_index("category")[metric].dropna()
        if ref.empty:
            mean_only = _paper_mean(method, metric)
            if mean_only is not None:
                covered = len(categories) == len(MVTEC_CATEGORIES)
                ours = means.loc[row, categories].mean() if covered else np.nan
                notes.append(
                    f"{row}, {metric}: only the paper's 15-category mean is on file ({100 * mean_only:.1f}); "
                    + (f"ours over the 15: {100 * ours:.1f}." if covered
                       else f"not comparable over {len(categories)} of 15 categories.")
                )
            continue
        entry = {"method": row}
        common = []
        for category in categories:
            ours = means.at[row, category]
            theirs = ref.get(category, np.nan)
            entry[(category, "ours")], entry[(category, "published")] = ours, theirs
            entry[(category, "delta")] = ours - theirs
            if not (np.isnan(ours) or np.isnan(theirs)):
                common.append(category)
        entry[("mean", "ours")] = means.loc[row, common].mean() if common else np.nan
        entry[("mean", "published")] = ref[common].mean() if common else np.nan
        entry[("mean", "delta")] = entry[("mean", "ours")] - entry[("mean", "published")]
        entry[("mean", "categories")] = len(common)
        entry["source"] = _source(published, method, metric)
        rows.append(entry)
    return pd.DataFrame(rows), notes


def _paper_mean(method: str, metric: str) -> float | None:
    try:
        return models.get_model_class(method).paper_results.get(metric)
    except KeyError:
        return None


def _source(published: pd.DataFrame, method: str, metric: str) -> str:
    rows = published[(published.method == method) & published[metric].notna()]
    first = rows.iloc[0]
    return f"{first.source}; {first.backbone}, {first.resolution} px"
