"""Significance of the differences between methods: Wilcoxon, Friedman, Nemenyi, CD diagram.

The unit of comparison ("block") is a category, each method's figure being its mean over
seeds. Seeds of one category share its test images, so they are never blocks of their own.
Below :data:`MIN_BLOCKS` categories no test across categories is run and the reason is reported
instead of a number (the per-category paired tests of ``paired.py`` answer there).

* Two methods: Wilcoxon signed-rank test of the paired differences (``scipy.stats.wilcoxon``),
  every pair of methods, p-values Holm-adjusted over the pairs.
* All methods: Friedman test (``scipy.stats.friedmanchisquare``), then the Nemenyi post-hoc
  test and the critical-difference diagram of scikit-posthocs.
* Two methods on one category's test images: DeLong's test of the difference of their image
  AUROCs (:func:`delong_test`), paired by image, so seeds and categories play no part.
"""

from __future__ import annotations

import html
import itertools
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scikit_posthocs as sp  # noqa: E402
from scipy import stats  # noqa: E402

#: Fewest blocks for a test: the exact two-sided Wilcoxon p-value cannot go below 0.05 with 5.
MIN_BLOCKS = 6
ALPHA = 0.05


@dataclass
class Blocks:
    """Rows = categories, columns = methods (only methods with a figure in every category)."""

    values: pd.DataFrame
    unit: str  # "category"
    left_out: list[str]  # methods missing a block, not tested

    @property
    def note(self) -> str:
        text = f"{len(self.values)} blocks ({self.unit}, each method's mean over its seeds)"
        if self.left_out:
            text += f"; not tested (a block missing): {', '.join(self.left_out)}"
        return text


def blocks(runs: pd.DataFrame, metric: str, row: str = "row") -> Blocks:
    """The per-category figures (mean over seeds) of every method."""
    finished = runs.dropna(subset=[metric])
    table = finished.groupby([row, "category"])[metric].mean().unstack(row)
    complete = [c for c in table.columns if table[c].notna().all()]
    return Blocks(table[complete], "category", sorted(set(table.columns) - set(complete)))


def _absent(block: Blocks, methods: int) -> str | None:
    if block.values.shape[1] < methods:
        return f"needs >= {methods} methods with a figure in every block, has {block.values.shape[1]}"
    if len(block.values) < MIN_BLOCKS:
        return f"needs >= {MIN_BLOCKS} categories as blocks, has {len(block.values)}"
    return None


def wilcoxon_table(block: Blocks) -> tuple[pd.DataFrame | None, str]:
    """Every pair of methods: median difference, W, p and Holm-adjusted p; or the reason it is absent."""
    reason = _absent(block, 2)
    if reason:
        return None, f"Wilcoxon signed-rank test not run: {reason}."
    rows = []
    for a, b in itertools.combinations(block.values.columns, 2):
        diff = block.values[a] - block.values[b]
        if np.allclose(diff, 0):
            w, p = np.nan, 1.0
        else:
            result = stats.wilcoxon(block.values[a], block.values[b], zero_method="wilcox")
            w, p = float(result.statistic), float(result.pvalue)
        rows.append({"A": a, "B": b, "n": int((diff != 0).sum()), "median A-B": float(diff.median()),
                     "W": w, "p": p})
    table = pd.DataFrame(rows)
    table["p (Holm)"] = _holm(table["p"].to_numpy())
    table[f"A != B at {ALPHA}"] = table["p (Holm)"] < ALPHA
    return table, f"Wilcoxon signed-rank, two-sided, {block.note}."


def _holm(p: np.ndarray) -> np.ndarray:
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def friedman_nemenyi(block: Blocks) -> tuple[dict | None, str]:
    """Friedman chi-square and p, average ranks (1 = best) and Nemenyi p-values; or why absent."""
    reason = _absent(block, 3)
    if reason:
        return None, f"Friedman test and critical-difference diagram not drawn: {reason}."
    values = block.values
    statistic, p = stats.friedmanchisquare(*(values[c] for c in values.columns))
    ranks = values.rank(axis=1, ascending=False).mean()  # higher metric = better = rank 1
    nemenyi = sp.posthoc_nemenyi_friedman(values.to_numpy())
    nemenyi.index = nemenyi.columns = values.columns
    return (
        {"statistic": float(statistic), "p": float(p), "ranks": ranks.sort_values(), "nemenyi": nemenyi},
        f"Friedman chi2 = {statistic:.2f}, p = {p:.3g}; Nemenyi post-hoc; {block.note}.",
    )


def cd_diagram(result: dict, title: str, path: Path) -> Path:
    """scikit-posthocs' critical-difference diagram of a :func:`friedman_nemenyi` result."""
    ranks = result["ranks"]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * len(ranks)))
    sp.critical_difference_diagram(ranks, result["nemenyi"], ax=ax, alpha=ALPHA)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pairwise_matrix(wilcoxon: pd.DataFrame, order: list[str]) -> tuple[str, str]:
    """HTML and Markdown of a :func:`wilcoxon_table` as one colour matrix: cell (row, column) = median
    row - column in points; green: row significantly better (Holm), red: worse, grey: no evidence."""
    cells = {}
    for r in wilcoxon.to_dict("records"):
        median, p = 100 * float(r["median A-B"]), float(r["p (Holm)"])
        cells[(r["A"], r["B"])], cells[(r["B"], r["A"])] = (median, p), (-median, p)
    head = "".join(f"<th title='{html.escape(c)}'>{k + 1}</th>" for k, c in enumerate(order))
    rows, lines = [], []
    for k, a in enumerate(order):
        tds = []
        for b in order:
            if a == b:
                tds.append("<td>·</td>")
                continue
            median, p = cells.get((a, b), (np.nan, np.nan))
            shade = "#b9e4c4" if p < ALPHA and median > 0 else "#f2b8b8" if p < ALPHA and median < 0 else "#eeeeee"
            tds.append(f"<td style='background:{shade}' title='{html.escape(a)} - {html.escape(b)}: "
                       f"median {median:+.1f} points, p (Holm) = {p:.3g}'>{median:+.1f}</td>")
        rows.append(f"<tr><td>{k + 1}. {html.escape(a)}</td>{''.join(tds)}</tr>")
        lines.append(f"{k + 1}. {a}: " + ", ".join(f"vs {order.index(b) + 1} {cells[(a, b)][0]:+.1f} "
                                                   f"(p={cells[(a, b)][1]:.2g})" for b in order if b != a))
    page = (f"<table class='matrix'><thead><tr><th>row - column (median, points)</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")
    return page, "\n".join(lines)


# ----------------------------------------------------------------------------- per category, paired by image


@dataclass(frozen=True)
class PairedAUROC:
    """DeLong's test of AUROC(a) - AUROC(b) on the same images."""

    auroc_a: float
    auroc_b: float
    difference: float
    interval: tuple[float, float]  # 95 % (or 1 - alpha) normal interval of the difference
    p_value: float  # two-sided, H0: equal AUROCs


def _placements(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components from midranks (Sun & Xu, IEEE SPL 2014): per positive, the share
    of negatives it outscores (ties count 1/2); per negative, the share of positives that outscore it."""
    m, n = len(positive), len(negative)
    both = stats.rankdata(np.concatenate([positive, negative]))
    v10 = (both[:m] - stats.rankdata(positive)) / n
    v01 = 1.0 - (both[m:] - stats.rankdata(negative)) / m
    return v10, v01


def delong_test(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray, alpha: float = ALPHA) -> PairedAUROC:
    """DeLong, DeLong & Clarke-Pearson (Biometrics 1988): the two AUROCs of two methods' scores of the
    same images, the difference's variance from the covariance of their placement values, a normal
    test and interval. ``labels``: 1 anomalous, 0 good; both classes needed."""
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    labels = np.asarray(labels).astype(bool)
    if not (a.shape == b.shape == labels.shape) or labels.all() or not labels.any():
        raise ValueError(f"delong_test needs paired scores of the same images with both labels, got shapes "
                         f"{a.shape}, {b.shape}, {labels.shape} and {int(labels.sum())} anomalous")
    components = [_placements(x[labels], x[~labels]) for x in (a, b)]
    aurocs = np.array([v10.mean() for v10, _ in components])
    s10 = np.cov(np.stack([v10 for v10, _ in components]))
    s01 = np.cov(np.stack([v01 for _, v01 in components]))
    variance = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / labels.sum() + \
               (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / (~labels).sum()  # fmt: skip
    difference = float(aurocs[0] - aurocs[1])
    if variance <= 0:  # identical rankings (or perfect both): no evidence of a difference
        return PairedAUROC(float(aurocs[0]), float(aurocs[1]), difference, (difference, difference),
                           1.0 if difference == 0 else 0.0)  # fmt: skip
    sd, z = float(np.sqrt(variance)), stats.norm.ppf(1 - alpha / 2)
    p_value = float(2 * stats.norm.sf(abs(difference) / sd))
    return PairedAUROC(float(aurocs[0]), float(aurocs[1]), difference, (difference - z * sd, difference + z * sd),
                       p_value)  # fmt: skip
