"""Published MVTec AD figures per category (``benchmark/reports/published/mvtec_ad.csv``) beside ours.

A method's published 15-category mean is never set beside our mean over fewer categories:
the comparison is per category, and a mean is taken over the categories both have, with
their number. Methods whose papers publish means only (``paper_results`` of the model
class) are compared only when the sweep covers all 15 categories.

Each row of the file has a ``kind``: ``paper`` (the paper's own table) or ``reproduction``
(a re-run by someone else). Per category and metric the paper's figure is used where the
file has one, a reproduction's otherwise (``reference``), and a reproduction is marked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from adbench import models
from adbench.datamodules import MVTEC_CATEGORIES

PUBLISHED_FILE = Path(__file__).resolve().parent / "published" / "mvtec_ad.csv"
COMPARED = ("image_auroc", "pixel_auroc", "pro")
#: The kinds of reference, in order of precedence: a paper's own figure beats a reproduction's.
KINDS = ("paper", "reproduction")
#: Appended to a published figure that is a reproduction's, not the paper's.
REPRODUCTION_MARK = "†"
LEGEND = (f"{REPRODUCTION_MARK}: a reproduction's figure (a re-run by others, kind 'reproduction' in the file), "
          "used where the file has no figure from the paper's own table; on a mean, at least one of its figures is.")


def load_published(path: str | Path | None = None) -> pd.DataFrame:
    """One row per (method, category, kind); metrics in 0..1 (the file holds percent as printed)."""
    path = PUBLISHED_FILE if path is None else path
    table = pd.read_csv(path)
    if "kind" not in table:
        raise ValueError(f"{path}: no 'kind' column (one of {list(KINDS)} per row)")
    for row in table.index[~table.kind.isin(KINDS)]:  # file line row + 2: the header is line 1
        raise ValueError(f"{path}, line {row + 2} ({table.at[row, 'method']}, {table.at[row, 'category']}): "
                         f"kind {table.at[row, 'kind']!r} is not one of {list(KINDS)}")
    for row in table.index[table.duplicated(["method", "category", "kind"])]:
        raise ValueError(f"{path}, line {row + 2}: a second {table.at[row, 'kind']!r} row for "
                         f"({table.at[row, 'method']}, {table.at[row, 'category']})")
    for metric in COMPARED:
        table[metric] = table[metric] / 100.0
    return table


def reference(published: pd.DataFrame, method: str, metric: str) -> pd.DataFrame:
    """Per category (index) the figure set beside ours (column ``metric``) and its row's ``kind``,
    ``source``, ``backbone`` and ``resolution``: the paper's where the file has one, else a reproduction's."""
    rows = published[(published.method == method) & published[metric].notna()]
    rows = rows.iloc[rows.kind.map(KINDS.index).argsort(kind="stable")].drop_duplicates("category")
    return rows.set_index("category")[[metric, "kind", "source", "backbone", "resolution"]]


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
        used = reference(published, method, metric)
        ref, kinds = used[metric], used.kind
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
            entry[(category, "mark")] = _mark(kinds.get(category) == "reproduction")
            if not (np.isnan(ours) or np.isnan(theirs)):
                common.append(category)
        entry[("mean", "ours")] = means.loc[row, common].mean() if common else np.nan
        entry[("mean", "published")] = ref[common].mean() if common else np.nan
        entry[("mean", "delta")] = entry[("mean", "ours")] - entry[("mean", "published")]
        entry[("mean", "categories")] = len(common)
        entry[("mean", "mark")] = _mark((kinds[common] == "reproduction").any())
        entry["source"] = _source(used.loc[common] if common else used)
        rows.append(entry)
    return pd.DataFrame(rows), notes


def _paper_mean(method: str, metric: str) -> float | None:
    try:
        return models.get_model_class(method).paper_results.get(metric)
    except KeyError:
        return None


def _mark(reproduction: bool) -> str:
    return REPRODUCTION_MARK if reproduction else ""


def _source(rows: pd.DataFrame) -> str:
    """Each distinct source of ``rows`` (a ``reference`` frame), the reproductions' marked."""
    used = rows.drop_duplicates(["kind", "source", "backbone", "resolution"])
    return " | ".join(f"{_mark(r.kind == 'reproduction')}{r.kind}: {r.source}; {r.backbone}, {r.resolution} px"
                      for r in used.itertuples())
