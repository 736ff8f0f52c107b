"""Bootstrap confidence intervals of every metric of :mod:`adbench.callbacks.metrics`.

The test images are resampled, stratified by label (``scipy.stats.bootstrap``, percentile
method); each resample is scored by the same sweep and curve functions as the point metrics,
its pixel sweep re-weighted from per-image counts instead of sorting its pixels again
(docs/metrics.md, "Intervals").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import sparse, stats

from .metrics import (
    IMAGE_METRICS,
    PIXEL_METRICS,
    TIGHT_FPR_LIMIT,
    _ap_from,
    _as_bool,
    _auroc_from,
    _check_fpr_limit,
    _f1_from_counts,
    _f1max_from,
    _iou_max_from,
    _mad,
    _pixel_inputs,
    _pixel_sweep,
    _pro_from,
    _region_weights,
    _saturated_defects,
    _saturated_sweep,
    _Sweep,
    _sweep,
    _threshold_counts,
    _to_numpy,
)

__all__ = ["BOOTSTRAP_MAX_THRESHOLDS", "BOOTSTRAP_METHOD", "bootstrap_intervals", "bootstrap_saturated_pro",
           "paired_bootstrap_deltas"]

# --------------------------------------------------------------------------------------

#: How :func:`bootstrap_intervals` resamples; recorded beside every interval.
BOOTSTRAP_METHOD = "percentile bootstrap over test images, stratified by label (scipy.stats.bootstrap)"


#: Thresholds of the pixel sweep a bootstrap resample is evaluated at, at most (see _PerImageCounts).
BOOTSTRAP_MAX_THRESHOLDS = 1 << 16


class _PerImageCounts:
    """Per-image counts at the thresholds of a category's sweep, descending.

    Row ``i`` of ``neg_ge`` holds how many normal pixels of image ``i`` score ``>= u_g``
    for each threshold ``u_g`` of the category's sweep (:func:`_pixel_sweep`); ``pos_ge``
    / ``weight_ge`` the same for anomalous pixels and their region weights
    (``1 / |region|``), for anomalous images only. A weighted sum of the rows is the sweep
    of a category in which image ``i`` appears ``w_i`` times: ``w = 1`` everywhere gives
    back the category's own sweep.

    Every threshold is kept up to ``max_thresholds`` (AP, a sum over all of them, needs
    each). Beyond it they are thinned to evenly spaced ranks (the highest and lowest always
    kept): the resampled curves are then the exact curves through a subset of their
    vertices, a polyline at most one vertex gap below the exact one (checked: intervals
    move by < 1e-4 at 2**16 thresholds), and AP a coarser sum. Memory:
    about ``4 * G * (N + 2 * N_anomalous)`` bytes here and ``4 * G * batch`` per resampled
    array, with ``G <= max_thresholds``: a test split of 7M pixels has ~2.4M thresholds,
    which unthinned took several GB.
    """

    def __init__(self, full: _Sweep, negatives: list[np.ndarray],
                 positives: dict[int, tuple[np.ndarray, np.ndarray, int]],
                 max_thresholds: int = BOOTSTRAP_MAX_THRESHOLDS) -> None:  # fmt: skip
        """``negatives[i]``: image ``i``'s negative pixel scores (empty where none count);
        ``positives[i]``: an anomalous image's positive scores, their weights, and how many
        defects those weights are shared out over (each defect's weights sum to 1)."""
        n = len(negatives)
        keep = np.ones(full.thresholds.size, dtype=bool)
        if keep.size > max_thresholds:
            keep[:] = False
            keep[np.unique(np.linspace(0, keep.size - 1, max_thresholds).round().astype(int))] = True
        self.thresholds = full.thresholds[keep]  # descending
        ascending = self.thresholds[::-1]
        g = ascending.size
        # count(>= u) = size - searchsorted(sorted, u, "left"), evaluated at ascending u, then reversed.
        self.neg_ge = np.empty((n, g), dtype=np.float32)
        ties = []  # normal pixels equal to a threshold (counted in >= but not in >)
        self.neg_count = np.empty(n, dtype=np.float32)
        for i, negative in enumerate(negatives):
            neg = np.sort(negative)
            below = np.searchsorted(neg, ascending, side="left")
            at_most = np.searchsorted(neg, ascending, side="right")
            self.neg_ge[i] = (neg.size - below)[::-1]
            ties.append(sparse.csr_matrix((at_most - below)[::-1].astype(np.float32)))
            self.neg_count[i] = neg.size
        self.neg_ties = sparse.vstack(ties, format="csr")
        self.anomalous = np.array(sorted(positives), dtype=np.int64)
        self.pos_ge = np.empty((self.anomalous.size, g), dtype=np.float32)
        self.weight_ge = np.empty((self.anomalous.size, g), dtype=np.float32)
        self.pos_count = np.empty(self.anomalous.size, dtype=np.float32)
        self.regions = np.empty(self.anomalous.size, dtype=np.float32)
        for row, i in enumerate(self.anomalous):
            scores, weights, n_regions = positives[int(i)]
            order = np.argsort(scores)
            pos, weights = scores[order], weights[order]
            below = np.searchsorted(pos, ascending, side="left")
            suffix = np.append(np.cumsum(weights[::-1])[::-1], 0.0)  # summed weight of pos[k:]
            self.pos_ge[row] = (pos.size - below)[::-1]
            self.weight_ge[row] = suffix[below][::-1]
            self.pos_count[row], self.regions[row] = pos.size, n_regions

    @classmethod
    def of_masks(cls, maps: np.ndarray, masks: np.ndarray, full: _Sweep,
                 max_thresholds: int = BOOTSTRAP_MAX_THRESHOLDS) -> _PerImageCounts:  # fmt: skip
        """PRO's counts: every pixel outside the masks is negative, each region weighs 1."""
        positives = {}
        for i in np.flatnonzero(masks.any(axis=(1, 2))):
            weights, n_regions = _region_weights(masks[i][None])
            positives[int(i)] = (maps[i][masks[i]], weights, n_regions)
        return cls(full, [maps[i][~masks[i]] for i in range(maps.shape[0])], positives, max_thresholds)

    def sweeps(self, image_weights: np.ndarray) -> list[_Sweep]:
        """The sweep of each re-weighted category; ``image_weights`` is (R, N) multiplicities."""
        # float32 products: counts are exact integers up to 2**24 summed pixels, the region
        # weights carry 7 significant digits, far below any interval's width.
        w = image_weights.astype(np.float32)
        w_anomalous = w[:, self.anomalous]
        tp, fp_ge = w_anomalous @ self.pos_ge, w @ self.neg_ge
        fp_gt = fp_ge - np.asarray((self.neg_ties.T @ w.T).T)
        weight_ge = (w_anomalous @ self.weight_ge) / (w_anomalous @ self.regions)[:, None]
        n_pos, n_neg = (w_anomalous @ self.pos_count).astype(float), (w @ self.neg_count).astype(float)
        return [
            _Sweep(tp[r], fp_ge[r], fp_gt[r], weight_ge[r], self.thresholds, n_pos[r], n_neg[r])
            for r in range(w.shape[0])
        ]


def _resampled_metrics(
    scores: np.ndarray, labels: np.ndarray, anomaly_maps: Any | None, masks: Any | None,
    fpr_limit: float, batch: int, max_thresholds: int, segmentation_threshold: float,
) -> tuple[list[str], Callable[..., np.ndarray]]:  # fmt: skip
    """Every metric's key, and the statistic ``(drawn_anomalous, drawn_good) -> (K, R)`` that
    scores each resample of test-image indices by the same sweeps as the point metrics."""
    keys = _metric_keys(anomaly_maps)
    counts, at_threshold = None, None
    if anomaly_maps is not None:
        maps, mask_array = _pixel_inputs(anomaly_maps, masks)
        if maps.shape[0] != scores.size:
            raise ValueError(f"{maps.shape[0]} anomaly maps but {scores.size} image scores")
        full = _pixel_sweep(maps, mask_array)
        if full is not None:
            counts = _PerImageCounts.of_masks(maps, mask_array, full, max_thresholds)
            if not math.isnan(segmentation_threshold):
                at_threshold = _threshold_counts(maps, mask_array, segmentation_threshold)

    def statistic(drawn_anomalous: np.ndarray, drawn_good: np.ndarray, axis: int = -1) -> np.ndarray:
        drawn_anomalous, drawn_good = np.atleast_2d(drawn_anomalous), np.atleast_2d(drawn_good)
        out = np.full((len(keys), drawn_anomalous.shape[0]), np.nan)
        row = {key: k for k, key in enumerate(keys)}
        for r, (a, g) in enumerate(zip(drawn_anomalous, drawn_good, strict=True)):
            image = _sweep(np.sort(scores[g]), scores[a])
            out[[row["image_auroc"], row["image_f1max"], row["image_ap"]], r] = (
                _auroc_from(image), _f1max_from(image), _ap_from(image))  # fmt: skip
        if counts is not None:
            drawn = np.concatenate((drawn_anomalous, drawn_good), axis=1)
            for start in range(0, drawn.shape[0], batch):
                rows = drawn[start : start + batch]
                multiplicity = np.zeros((rows.shape[0], scores.size))
                np.add.at(multiplicity, (np.arange(rows.shape[0])[:, None], rows), 1.0)
                seg = multiplicity @ at_threshold if at_threshold is not None else None
                for r, pixel in enumerate(counts.sweeps(multiplicity), start=start):
                    values = {
                        "pixel_auroc": _auroc_from(pixel), "pro": _pro_from(pixel, fpr_limit),
                        "pixel_f1max": _f1max_from(pixel), "pixel_ap": _ap_from(pixel),
                        "pro_fpr05": _pro_from(pixel, TIGHT_FPR_LIMIT), "pixel_iou_max": _iou_max_from(pixel),
                        "seg_f1": math.nan if seg is None else _f1_from_counts(seg[r - start]),
                    }  # fmt: skip
                    values["mad"] = _mad({**values, **{k: out[row[k], r] for k in IMAGE_METRICS}})
                    for key, value in values.items():
                        out[row[key], r] = value
        return out

    return keys, statistic


def _metric_keys(anomaly_maps: Any | None) -> list[str]:
    return [*IMAGE_METRICS] + ([*PIXEL_METRICS] if anomaly_maps is not None else [])


def _labelled_scores(image_scores: Any, image_labels: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = _to_numpy(image_scores).reshape(-1).astype(np.float64)
    labels = _as_bool(_to_numpy(image_labels).reshape(-1))
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.shape[0]} scores but {labels.shape[0]} labels")
    return scores, labels


def _stratified_intervals(
    keys: list[Any],
    anomalous: np.ndarray,
    good: np.ndarray,
    statistic: Any,
    n_resamples: int,
    confidence_level: float,
    seed: int,
) -> dict[Any, list[float]]:
    """Percentile intervals of ``statistic`` (one row per key) over resamples of the test images
    drawn within each label (``scipy.stats.bootstrap``); ``[nan, nan]`` where a resample was undefined."""
    result = stats.bootstrap(
        (anomalous, good), statistic, n_resamples=n_resamples, confidence_level=confidence_level,
        method="percentile", vectorized=True, random_state=np.random.default_rng(seed),
    )
    low, high = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
    return {key: [math.nan, math.nan] if np.isnan(result.bootstrap_distribution[k]).any()
            else [float(low[k]), float(high[k])] for k, key in enumerate(keys)}  # fmt: skip


def bootstrap_intervals(
    image_scores: Any,
    image_labels: Any,
    anomaly_maps: Any | None = None,
    masks: Any | None = None,
    n_resamples: int = 1000,
    confidence_level: float = 0.95,
    seed: int = 0,
    fpr_limit: float = 0.3,
    batch: int = 50,
    max_thresholds: int = BOOTSTRAP_MAX_THRESHOLDS,
    segmentation_threshold: float = math.nan,
) -> dict[str, list[float]]:
    """Bootstrap confidence intervals ``[low, high]`` of every metric of one category.

    The test images are resampled with replacement, anomalous and good ones separately
    (the split's class balance is part of its design), ``n_resamples`` times from
    ``numpy.random.default_rng(seed)``; image and pixel metrics are read off the same
    resamples (mAD from each resample's seven). A metric that is undefined on the full data
    gets ``[nan, nan]``. Same resamples as ``scipy.stats.bootstrap((anomalous_scores,
    good_scores), ..., random_state=default_rng(seed), method="percentile")``.
    """
    _check_fpr_limit(fpr_limit)
    scores, labels = _labelled_scores(image_scores, image_labels)
    anomalous, good = np.flatnonzero(labels), np.flatnonzero(~labels)
    if anomalous.size < 2 or good.size < 2 or np.isnan(scores).any():
        return {k: [math.nan, math.nan] for k in _metric_keys(anomaly_maps)}
    keys, statistic = _resampled_metrics(scores, labels, anomaly_maps, masks, fpr_limit, batch,
                                         max_thresholds, segmentation_threshold)  # fmt: skip
    return _stratified_intervals(keys, anomalous, good, statistic, n_resamples, confidence_level, seed)


def paired_bootstrap_deltas(
    scores_a: Any,
    scores_b: Any,
    image_labels: Any,
    maps_a: Any | None = None,
    maps_b: Any | None = None,
    masks: Any | None = None,
    n_resamples: int = 1000,
    confidence_level: float = 0.95,
    seed: int = 0,
    fpr_limit: float = 0.3,
    batch: int = 50,
    max_thresholds: int = BOOTSTRAP_MAX_THRESHOLDS,
) -> dict[str, list[float]]:
    """Intervals ``[low, high]`` of every metric's difference ``a - b`` between two methods
    scored on the same test images: each resample draws the images once and scores both
    methods on them (the same stratified resamples as :func:`bootstrap_intervals`), so what
    the two share (a hard image, an easy one) cancels out of the difference."""
    _check_fpr_limit(fpr_limit)
    a, labels = _labelled_scores(scores_a, image_labels)
    b, _ = _labelled_scores(scores_b, image_labels)
    if (maps_a is None) != (maps_b is None):
        raise ValueError("give both methods' anomaly maps, or neither")
    keys = _metric_keys(maps_a)
    rows = [k for k, key in enumerate(keys) if key != "seg_f1"]  # no threshold for either side here
    keys = [keys[k] for k in rows]
    anomalous, good = np.flatnonzero(labels), np.flatnonzero(~labels)
    if anomalous.size < 2 or good.size < 2 or np.isnan(a).any() or np.isnan(b).any():
        return {k: [math.nan, math.nan] for k in keys}
    _, statistic_a = _resampled_metrics(a, labels, maps_a, masks, fpr_limit, batch, max_thresholds, math.nan)
    _, statistic_b = _resampled_metrics(b, labels, maps_b, masks, fpr_limit, batch, max_thresholds, math.nan)

    def difference(drawn_anomalous: np.ndarray, drawn_good: np.ndarray, axis: int = -1) -> np.ndarray:
        return (statistic_a(drawn_anomalous, drawn_good) - statistic_b(drawn_anomalous, drawn_good))[rows]

    return _stratified_intervals(keys, anomalous, good, difference, n_resamples, confidence_level, seed)


def bootstrap_saturated_pro(
    anomaly_maps: Any,
    image_labels: Any,
    regions: dict[int, list[tuple[np.ndarray, float]]],
    n_resamples: int = 1000,
    confidence_level: float = 0.95,
    seed: int = 0,
    fpr_limits: tuple[float, ...] = (TIGHT_FPR_LIMIT, 0.3),
    batch: int = 50,
    max_thresholds: int = BOOTSTRAP_MAX_THRESHOLDS,
) -> list[list[float]]:
    """Bootstrap intervals ``[low, high]`` of :func:`~adbench.callbacks.metrics.saturated_pro` at each
    FPR limit, on the same stratified resamples of the test images as :func:`bootstrap_intervals`
    with the same ``seed``. A resampled image brings its defects, or its defect-free pixels, as
    many times as it is drawn; each resample's sweep is re-weighted from per-image counts."""
    labels = _as_bool(_to_numpy(image_labels).reshape(-1))
    undefined = [[math.nan, math.nan] for _ in fpr_limits]
    negatives, defects = _saturated_defects(anomaly_maps, labels, regions)
    anomalous, good = np.flatnonzero(labels), np.flatnonzero(~labels)
    if not defects or negatives.size == 0 or anomalous.size < 2 or good.size < 2:
        return undefined
    maps = _to_numpy(anomaly_maps)
    maps = maps[:, 0] if maps.ndim == 4 else maps
    full = _saturated_sweep(negatives, defects)
    empty = np.empty(0, dtype=maps.dtype)
    counts = _PerImageCounts(full, [empty if labels[i] else maps[i].reshape(-1) for i in range(labels.size)],
                             defects, max_thresholds)  # fmt: skip

    def statistic(drawn_anomalous: np.ndarray, drawn_good: np.ndarray, axis: int = -1) -> np.ndarray:
        drawn = np.concatenate((np.atleast_2d(drawn_anomalous), np.atleast_2d(drawn_good)), axis=1)
        out = np.full((len(fpr_limits), drawn.shape[0]), np.nan)
        for start in range(0, drawn.shape[0], batch):
            rows = drawn[start : start + batch]
            multiplicity = np.zeros((rows.shape[0], labels.size))
            np.add.at(multiplicity, (np.arange(rows.shape[0])[:, None], rows), 1.0)
            for r, sweep in enumerate(counts.sweeps(multiplicity), start=start):
                if sweep.n_pos > 0:  # a resample without a defect has no sPRO
                    out[:, r] = [_pro_from(sweep, limit) for limit in fpr_limits]
        return out

    limits = list(range(len(fpr_limits)))
    intervals = _stratified_intervals(limits, anomalous, good, statistic, n_resamples, confidence_level, seed)
    return list(intervals.values())
