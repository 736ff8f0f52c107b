"""Paired tests on the same test images: is method A better than method B, and by how much?

Two methods of a sweep score the same test images of a category, and every seed of a method
scores them too. A paired bootstrap over *images* answers the question with that design:

* each resample draws the category's good and anomalous images with replacement (stratified, so
  both classes are always there) and scores every method on the same draw;
* a method's figure in a resample is its metric averaged over its seeds: seeds share the test
  set, so they are never treated as independent samples;
* over several categories each one is resampled on its own and the figure is the mean over
  categories, as in the leaderboard's mean column (categories are fixed, not sampled).

The difference A - B of the resampled figures gives a 95 % percentile interval and a two-sided
p-value from the bootstrap standard error (normal approximation). What it covers is the
test-set sampling of the trained models, not the spread of training itself. (With both methods'
maps in memory, ``callbacks.intervals.paired_bootstrap_deltas`` does the same for every metric of
one run each, as ``make compare`` does; the report works from the files a sweep keeps.)

Image AUROC comes from the per-image score files (``scores/<job>.csv``); pixel AUROC and pixel
AP from the per-image pixel histograms (``scores/<job>.pixels.npz``, written by the evaluator
since 2026-12-06) where a job has them, and PRO (FPR limits 0.3 and 0.05) from the same files'
region-weighted histograms of the anomalous pixels (written since the second half of that day;
earlier jobs have none and their rows are listed as lacking the evidence).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from adbench.benchmark.orchestration.records import FINISHED
from adbench.callbacks.metrics import area_under_polyline
from adbench.callbacks.pixel_histograms import HISTOGRAM_SUFFIX

N_RESAMPLES = 2000
ALPHA = 0.05


@dataclass(frozen=True)
class PairedDifference:
    """A - B on the same images: the point estimate, its interval and the two-sided p-value."""

    a: float
    b: float
    difference: float
    interval: tuple[float, float]
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def stratified_resamples(labels: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n) image indices: anomalous and good images each drawn with replacement."""
    labels = np.asarray(labels).astype(bool)
    parts = [rng.choice(np.flatnonzero(labels == side), size=(n_resamples, int((labels == side).sum())))
             for side in (True, False)]  # fmt: skip
    return np.concatenate(parts, axis=1)


def auroc_of_resamples(scores: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """AUROC (Mann-Whitney, ties count 1/2) of ``scores`` on each row of ``indices`` (one per resample)."""
    drawn, positive = np.asarray(scores, dtype=float)[indices], np.asarray(labels).astype(bool)[indices]
    m = positive.sum(axis=1)
    ranks = stats.rankdata(drawn, axis=1)
    u = np.where(positive, ranks, 0).sum(axis=1) - m * (m + 1) / 2
    return u / (m * (indices.shape[1] - m))


def _weights(indices: np.ndarray, n: int) -> np.ndarray:
    """How often each image is drawn in each resample: (n_resamples, n)."""
    counts = np.zeros((len(indices), n))
    np.add.at(counts, (np.arange(len(indices))[:, None], indices), 1.0)
    return counts


def histogram_auroc(normal: np.ndarray, anomalous: np.ndarray) -> np.ndarray:
    """Pixel AUROC from pixel counts per score bin (last axis, ascending bins; ties within a bin count 1/2)."""
    below = np.cumsum(normal, axis=-1) - normal
    total = normal.sum(axis=-1) * anomalous.sum(axis=-1)
    return (anomalous * (below + 0.5 * normal)).sum(axis=-1) / total


def histogram_ap(normal: np.ndarray, anomalous: np.ndarray) -> np.ndarray:
    """Pixel average precision from pixel counts per score bin, thresholds at the bins' lower edges."""
    tp = np.cumsum(anomalous[..., ::-1], axis=-1)
    fp = np.cumsum(normal[..., ::-1], axis=-1)
    precision = np.divide(tp, tp + fp, out=np.ones_like(tp, dtype=float), where=(tp + fp) > 0)
    recall_step = anomalous[..., ::-1] / anomalous.sum(axis=-1, keepdims=True)
    return (recall_step * precision).sum(axis=-1)


def histogram_pro(normal: np.ndarray, regions: np.ndarray, fpr_limit: float = 0.3) -> np.ndarray:
    """Normalised PRO area over FPR in ``[0, fpr_limit]`` from normal-pixel counts and region-weighted
    anomalous counts per score bin (last axis, ascending bins): the curve's vertices are the bins' lower
    edges, joined by straight lines (within a bin the exact curve's steps are not known)."""
    fpr = np.cumsum(normal[..., ::-1], axis=-1) / normal.sum(axis=-1, keepdims=True)
    overlap = np.cumsum(regions[..., ::-1], axis=-1) / regions.sum(axis=-1, keepdims=True)
    start = np.zeros((*fpr.shape[:-1], 1))
    x, y = np.concatenate([start, fpr], axis=-1), np.concatenate([start, overlap], axis=-1)
    # The evaluator's area rule (trapezoids, the segment crossing fpr_limit cut there), one curve per row.
    area = [area_under_polyline(xs, ys, fpr_limit) for xs, ys in zip(x.reshape(-1, x.shape[-1]),
                                                                     y.reshape(-1, y.shape[-1]), strict=True)]
    return np.minimum(np.reshape(area, x.shape[:-1]) / fpr_limit, 1.0)


def _pixel_metric(function: Callable[[np.ndarray, np.ndarray], np.ndarray], second: int = 1):
    """A metric of the per-image histograms summed over each resample: the normal counts (channel 0)
    and channel ``second`` (1: anomalous counts, 2: region-weighted anomalous counts)."""
    def of_resamples(histograms: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
        weights = _weights(indices, len(histograms))
        return function(weights @ histograms[:, 0], weights @ histograms[:, second])

    return of_resamples


#: metric -> (what the evidence of one job is, its metric on each resample of the images)
RESAMPLED = {
    "image_auroc": ("scores", auroc_of_resamples),
    "pixel_auroc": ("pixels", _pixel_metric(histogram_auroc)),
    "pixel_ap": ("pixels", _pixel_metric(histogram_ap)),
    "pro": ("regions", _pixel_metric(partial(histogram_pro, fpr_limit=0.3), second=2)),
    "pro_fpr05": ("regions", _pixel_metric(partial(histogram_pro, fpr_limit=0.05), second=2)),
}


@dataclass
class Evidence:
    """One metric's per-image evidence: per category the labels and, per row, one array per seed."""

    metric: str
    labels: dict[str, np.ndarray]
    jobs: dict[str, dict[str, list[np.ndarray]]]  # category -> row -> per-seed evidence
    missing: list[str]  # rows with a finished job lacking the evidence
    coverage: dict[str, tuple[int, int]] = field(default_factory=dict)  # row -> (jobs with evidence, finished jobs)

    def rows(self) -> list[str]:
        """Rows with evidence in every category."""
        sets = [set(by_row) for by_row in self.jobs.values()]
        return sorted(set.intersection(*sets)) if sets else []


def _read_job(results_dir: Path, scores: str, kind: str) -> tuple[pd.Series, np.ndarray] | None:
    path = results_dir / scores
    if kind != "scores":
        path = path.with_suffix(HISTOGRAM_SUFFIX)
    if not path.is_file():
        return None
    if kind == "scores":
        frame = pd.read_csv(path)
        return frame.set_index("path").label, frame.score.to_numpy(dtype=float)
    with np.load(path) as data:
        if kind == "regions" and "region_histograms" not in data:
            return None
        histograms = data["histograms"].astype(float)
        if kind == "regions":  # (n, 3, bins): normal, anomalous, region-weighted anomalous
            histograms = np.concatenate([histograms, data["region_histograms"][:, None].astype(float)], axis=1)
        return pd.Series(data["labels"], index=data["paths"]), histograms


def gather(runs: pd.DataFrame, results_dir: Path, metric: str) -> Evidence:
    """The evidence of every finished job of ``runs`` for ``metric``, aligned by image path per category.

    A row counts in a category with the seeds whose jobs have the evidence (``coverage`` says how
    many of its finished jobs that is); ``missing`` lists the rows with a job lacking it."""
    kind = RESAMPLED[metric][0]
    done = runs[runs.status.isin(FINISHED)]
    labels: dict[str, np.ndarray] = {}
    jobs: dict[str, dict[str, list[np.ndarray]]] = {}
    missing: set[str] = set()
    coverage: dict[str, tuple[int, int]] = {}
    for category, frame in done.groupby("category", sort=False):
        read: dict[str, list[tuple[pd.Series, np.ndarray]]] = {}
        for row, part in frame.groupby("row", sort=False):
            found = [None if pd.isna(s) else _read_job(results_dir, str(s), kind) for s in part.image_scores]
            have = [f for f in found if f is not None]
            if len(have) < len(found):
                missing.add(str(row))
            if have:
                read[str(row)] = have
            previous = coverage.get(str(row), (0, 0))
            coverage[str(row)] = (previous[0] + len(have), previous[1] + len(found))
        if not read:
            continue
        common = sorted(set.intersection(*(set(f[0].index) for fs in read.values() for f in fs)))
        if not common:
            continue
        first = next(iter(read.values()))[0][0]
        labels[str(category)] = first.loc[common].to_numpy().astype(int)
        jobs[str(category)] = {
            row: [values[pd.Index(paths.index).get_indexer(common)] for paths, values in found]
            for row, found in read.items()
        }
    return Evidence(metric, labels, jobs, sorted(missing), coverage)


def resampled_figures(evidence: Evidence, n_resamples: int = N_RESAMPLES, seed: int = 0
                      ) -> tuple[pd.Series, pd.DataFrame]:
    """Per row (with evidence in every category): its figure (mean over categories of the mean over
    seeds) and its figure on each of the same ``n_resamples`` image resamples (columns = rows)."""
    rng = np.random.default_rng(seed)
    of_resamples = RESAMPLED[evidence.metric][1]
    rows = evidence.rows()
    point = pd.Series(0.0, index=rows)
    replicates = pd.DataFrame(0.0, index=range(n_resamples), columns=rows)
    for category, by_row in evidence.jobs.items():
        labels = evidence.labels[category]
        if labels.all() or not labels.any():
            continue
        indices = stratified_resamples(labels, n_resamples, rng)
        for row in rows:
            point[row] += np.mean([of_resamples(x, labels, np.arange(len(labels))[None])[0] for x in by_row[row]])
            replicates[row] += np.mean([of_resamples(x, labels, indices) for x in by_row[row]], axis=0)
    used = sum(1 for c in evidence.jobs if evidence.labels[c].any() and not evidence.labels[c].all())
    return point / max(used, 1), replicates / max(used, 1)


def compare(point: pd.Series, replicates: pd.DataFrame, a: str, b: str) -> PairedDifference:
    """A - B from :func:`resampled_figures`: percentile interval, p from the bootstrap standard error."""
    differences = (replicates[a] - replicates[b]).to_numpy()
    estimate = float(point[a] - point[b])
    low, high = np.quantile(differences, [ALPHA / 2, 1 - ALPHA / 2])
    sd = float(differences.std(ddof=1))
    p_value = (1.0 if estimate == 0 else 0.0) if sd == 0 else float(2 * stats.norm.sf(abs(estimate) / sd))
    return PairedDifference(float(point[a]), float(point[b]), estimate, (float(low), float(high)), p_value)


def paired_bootstrap(a: list[np.ndarray], b: list[np.ndarray], labels: np.ndarray, metric: str = "image_auroc",
                     n_resamples: int = N_RESAMPLES, seed: int = 0) -> PairedDifference:
    """Two methods on one category's images, each with one evidence array per seed (scores, or
    per-image pixel histograms, (n, 3, bins) with the region-weighted ones for PRO): the paired
    bootstrap of the difference of their seed-averaged metric."""
    labels = np.asarray(labels).astype(int)
    if labels.all() or not labels.any():
        raise ValueError(f"paired_bootstrap needs both good and anomalous images, got {int(labels.sum())} "
                         f"anomalous of {len(labels)}")
    for side in (*a, *b):
        if len(side) != len(labels):
            raise ValueError(f"paired_bootstrap needs one value per image: {len(side)} for {len(labels)} labels")
    evidence = Evidence(metric, {"c": labels}, {"c": {"a": list(a), "b": list(b)}}, [])
    return compare(*resampled_figures(evidence, n_resamples, seed), "a", "b")
