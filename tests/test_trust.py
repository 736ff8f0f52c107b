"""Numbers a reviewer can trust: bootstrap intervals, warnings, and fingerprints that rerun exactly
what changed (the report built from them: ``test_report.py``)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from adbench.benchmark.orchestration.job import result_warnings
from adbench.benchmark.orchestration.runner import execution_of
from adbench.benchmark.orchestration.sweep import SweepConfig, code_modules
from adbench.callbacks import intervals as I  # noqa: E741
from adbench.callbacks import metrics as M
from adbench.callbacks.guards import LossHistory

from .conftest import REPO

# --------------------------------------------------------------------------- bootstrap intervals


def _category(n_good: int, n_bad: int, size: int = 32, seed: int = 0):
    """Small synthetic category: blobs as defects, noisy maps that fire on them."""
    rng = np.random.default_rng(seed)
    n = n_good + n_bad
    labels = np.r_[np.zeros(n_good, int), np.ones(n_bad, int)]
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((n, size, size), bool)
    for i in range(n_good, n):
        cy, cx, r = rng.uniform(6, size - 6, 2).tolist() + [rng.uniform(2, 5)]
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    maps = rng.normal(size=masks.shape).astype(np.float32) + 1.5 * masks
    scores = maps.reshape(n, -1).max(axis=1) + rng.normal(0, 0.3, n)
    return scores, labels, maps, masks


@pytest.mark.parametrize("quantised", [False, True], ids=["continuous", "ties"])
def test_reweighted_sweep_is_the_sweep_of_the_resampled_category(quantised: bool) -> None:
    scores, labels, maps, masks = _category(12, 10)
    if quantised:  # heavy ties between normal and anomalous pixels (maps saved as few levels)
        maps = np.round(maps * 2) / 2
    counts = I._PerImageCounts.of_masks(maps, masks, M._pixel_sweep(maps, masks))
    drawn = np.r_[np.arange(22), 3, 15, 15, 21]  # images 3, 15 (twice) and 21 drawn again; none left out
    for index in (np.arange(22), drawn, np.r_[0, 0, 5, 12, 12, 13, 19]):
        weights = np.bincount(index, minlength=22)[None].astype(float)
        sweep = counts.sweeps(weights)[0]
        expected = M.compute_anomaly_metrics(scores[index], labels[index], maps[index], masks[index])
        assert M._auroc_from(sweep) == pytest.approx(expected["pixel_auroc"], abs=1e-6)
        assert M._pro_from(sweep, 0.3) == pytest.approx(expected["pro"], abs=1e-6)
        assert M._f1max_from(sweep) == pytest.approx(expected["pixel_f1max"], abs=1e-6)
        assert M._ap_from(sweep) == pytest.approx(expected["pixel_ap"], abs=1e-6)  # every threshold kept
        assert M._pro_from(sweep, 0.05) == pytest.approx(expected["pro_fpr05"], abs=1e-6)
        assert M._iou_max_from(sweep) == pytest.approx(expected["pixel_iou_max"], abs=1e-6)


def test_image_interval_equals_scipy_bootstrap_of_sklearn_auroc() -> None:
    scores, labels, _, _ = _category(30, 20, seed=1)
    ours = I.bootstrap_intervals(scores, labels, n_resamples=500, seed=7)
    reference = stats.bootstrap(
        (scores[labels == 1], scores[labels == 0]),
        lambda anomalous, good: roc_auc_score(np.r_[np.ones(len(anomalous)), np.zeros(len(good))],
                                              np.r_[anomalous, good]),
        n_resamples=500, method="percentile", vectorized=False, random_state=np.random.default_rng(7),
    ).confidence_interval
    assert ours["image_auroc"] == pytest.approx([reference.low, reference.high], abs=1e-12)
    assert set(ours) == {"image_auroc", "image_f1max", "image_ap"}


def _saturation_regions(masks: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """Each blob a defect with a random saturation area, plus an overlapping 'logical' defect."""
    rng = np.random.default_rng(seed)
    regions = {}
    for i in np.flatnonzero(labels):
        logical = np.zeros_like(masks[i])
        logical[4:12, 5:20] = True
        regions[int(i)] = [
            (masks[i], float(rng.choice([3.0, 0.5 * masks[i].sum(), 1e6]))),
            (logical, 30.0),
        ]
    return regions


def test_spro_interval_equals_scipy_bootstrap_of_brute_force_resamples() -> None:
    _, labels, maps, masks = _category(9, 8, seed=3)
    regions = _saturation_regions(masks, labels, seed=3)

    def resampled_spro(anomalous: np.ndarray, good: np.ndarray) -> np.ndarray:
        index = np.r_[anomalous, good].astype(
            int
        )  # the images drawn, repeats included, as their own copies
        copies = {row: regions[i] for row, i in enumerate(index) if i in regions}
        return np.array(M.saturated_pro(maps[index], labels[index], copies))

    reference = stats.bootstrap(
        (np.flatnonzero(labels), np.flatnonzero(labels == 0)),
        resampled_spro,
        n_resamples=60,
        method="percentile",
        vectorized=False,
        random_state=np.random.default_rng(5),
    ).confidence_interval
    ours = I.bootstrap_saturated_pro(maps, labels, regions, n_resamples=60, seed=5)
    assert np.array(ours) == pytest.approx(np.c_[reference.low, reference.high], abs=1e-6)
    point = M.saturated_pro(maps, labels, regions)
    assert all(low <= value <= high for (low, high), value in zip(ours, point, strict=True))
    assert ours[0][1] - ours[0][0] > 0.01  # a real spread, not a degenerate interval
    assert all(math.isnan(v) for pair in I.bootstrap_saturated_pro(maps, labels, {}) for v in pair)


def test_paired_deltas_equal_scipy_bootstrap_of_both_methods_on_the_same_resamples() -> None:
    scores, labels, maps, masks = _category(10, 8, seed=4)
    rng = np.random.default_rng(4)
    # b: a's maps and scores with noise of its own, so the two share each image's difficulty
    scores_b, maps_b = scores + rng.normal(0, 0.4, scores.size), maps + rng.normal(0, 0.6, maps.shape).astype(np.float32)
    keys = ("image_auroc", "image_ap", "pixel_auroc", "pro", "pixel_ap", "pro_fpr05", "mad")

    def brute_force(anomalous: np.ndarray, good: np.ndarray) -> np.ndarray:
        index = np.r_[anomalous, good].astype(int)
        a = M.compute_anomaly_metrics(scores[index], labels[index], maps[index], masks[index])
        b = M.compute_anomaly_metrics(scores_b[index], labels[index], maps_b[index], masks[index])
        return np.array([a[k] - b[k] for k in keys])

    reference = stats.bootstrap(
        (np.flatnonzero(labels), np.flatnonzero(labels == 0)), brute_force, n_resamples=40,
        method="percentile", vectorized=False, random_state=np.random.default_rng(9),
    ).confidence_interval
    ours = I.paired_bootstrap_deltas(scores, scores_b, labels, maps, maps_b, masks, n_resamples=40, seed=9)
    assert np.array([ours[k] for k in keys]) == pytest.approx(np.c_[reference.low, reference.high], abs=1e-6)
    assert "seg_f1" not in ours
    # Pairing removes what the two share: the difference's interval is narrower than either method's own.
    own = I.bootstrap_intervals(scores, labels, maps, masks, n_resamples=200, seed=9)["pixel_auroc"]
    paired = I.paired_bootstrap_deltas(scores, scores_b, labels, maps, maps_b, masks, n_resamples=200, seed=9)
    assert paired["pixel_auroc"][1] - paired["pixel_auroc"][0] < own[1] - own[0]
    same = I.paired_bootstrap_deltas(scores, scores, labels, maps, maps, masks, n_resamples=50)
    assert all(v == 0.0 for k in keys for v in same[k])
    with pytest.raises(ValueError, match="both methods"):
        I.paired_bootstrap_deltas(scores, scores_b, labels, maps, None, masks)


@pytest.mark.slow
def test_interval_coverage_is_near_95_percent() -> None:
    """Binormal scores with a known AUROC: the interval should hold it in about 95 % of samples."""
    shift = 1.2
    true_auroc = stats.norm.cdf(shift / math.sqrt(2))
    rng = np.random.default_rng(0)
    covered = []
    for trial in range(120):
        good, bad = rng.normal(0, 1, 60), rng.normal(shift, 1, 40)
        low, high = I.bootstrap_intervals(np.r_[good, bad], np.r_[np.zeros(60), np.ones(40)],
                                          n_resamples=400, seed=trial)["image_auroc"]
        covered.append(low <= true_auroc <= high)
    assert 0.88 <= np.mean(covered) <= 0.99, np.mean(covered)


def test_pixel_intervals_hold_the_estimate_and_degenerate_splits_give_nan() -> None:
    scores, labels, maps, masks = _category(12, 10, seed=2)
    threshold = float(np.quantile(maps[~masks], 0.95))
    point = M.compute_anomaly_metrics(scores, labels, maps, masks, segmentation_threshold=threshold)
    intervals = I.bootstrap_intervals(scores, labels, maps, masks, n_resamples=200, segmentation_threshold=threshold)
    assert set(intervals) == set(point)
    for metric, (low, high) in intervals.items():
        assert low <= point[metric] <= high and high - low > 0, metric
    without = I.bootstrap_intervals(scores, labels, maps, masks, n_resamples=20)  # no threshold: no seg_f1
    assert all(math.isnan(v) for v in without["seg_f1"]) and not math.isnan(without["mad"][0])
    one_class = I.bootstrap_intervals(scores[:12], labels[:12], maps[:12], masks[:12], n_resamples=50)
    assert all(math.isnan(v) for bounds in one_class.values() for v in bounds)


def test_thinned_pixel_sweep_bounds_memory_and_barely_moves_the_intervals() -> None:
    scores, labels, maps, masks = _category(12, 10, size=64, seed=3)
    rng = np.random.default_rng(3)
    for i in range(12, 22):  # large defects: thousands of anomalous pixels, as on real categories
        top, left = rng.integers(0, 30, 2)
        masks[i, top : top + 30, left : left + 25] = True
        maps[i][masks[i]] += 1.0
    full = M._pixel_sweep(maps, masks)
    exact_counts = I._PerImageCounts.of_masks(maps, masks, full, max_thresholds=10**9)
    thinned_counts = I._PerImageCounts.of_masks(maps, masks, full, max_thresholds=500)
    assert exact_counts.thresholds.size > 1000 and thinned_counts.thresholds.size <= 500
    assert thinned_counts.thresholds[0] == exact_counts.thresholds[0]
    assert thinned_counts.thresholds[-1] == exact_counts.thresholds[-1]
    exact = I.bootstrap_intervals(scores, labels, maps, masks, n_resamples=100, max_thresholds=10**9)
    thinned = I.bootstrap_intervals(scores, labels, maps, masks, n_resamples=100, max_thresholds=500)
    for metric in set(M.PIXEL_METRICS) - {"seg_f1"}:  # 500 of >1000 vertices: bounds within a few 1e-3
        assert thinned[metric] == pytest.approx(exact[metric], abs=5e-3), metric
        assert thinned[metric] != exact[metric] or metric in ("pixel_f1max", "pixel_iou_max"), "the cap was in effect"
    for metric in M.IMAGE_METRICS:
        assert thinned[metric] == exact[metric]


# --------------------------------------------------------------------------- warnings


def test_diverged_loss_and_one_class_test_split_are_warnings() -> None:
    history = LossHistory()
    for epoch_losses in ([2.0, 1.5], [1.0, 0.9], [5e3, 9e3]):
        for loss in epoch_losses:
            history.on_train_batch_end(None, None, {"loss": torch.tensor(loss)}, None, 0)
        history.on_train_epoch_end(None, None)
    assert "epoch 2" in history.diverged
    calm = LossHistory()
    for loss in (0.01, 0.5, 0.02):  # small losses wobbling near zero are not a divergence
        calm.on_train_batch_end(None, None, {"loss": torch.tensor(loss)}, None, 0)
        calm.on_train_epoch_end(None, None)
    assert calm.diverged is None

    metrics = {"image_auroc": math.nan, "pixel_auroc": 0.9, "pro": 0.8}
    warned = result_warnings(metrics, {"label": [0, 0, 0]}, calm)
    assert warned == ["test split has no anomalous image: image AUROC and F1-max are undefined"]
    assert any("diverged" in w for w in result_warnings({"image_auroc": 0.9}, {"label": [0, 1]}, history))


# --------------------------------------------------------------------------- fingerprints


def test_a_methods_code_is_its_own_files_and_the_pipeline() -> None:
    stpm, rstpm = set(code_modules("stpm")), set(code_modules("rstpm"))
    assert {"adbench.models.stpm", "adbench.models.distillation", "adbench.callbacks.metrics",
            "adbench.benchmark.orchestration.job", "adbench.cli"} <= stpm
    assert "adbench.models.rstpm" not in stpm and "adbench.models.stpm" not in rstpm
    assert "adbench.models.unet" in rstpm and "adbench.models" not in rstpm


def test_execution_kind_is_part_of_the_fingerprint(tmp_path: Path, embedded_root: Path) -> None:
    sweep = SweepConfig(methods=["stpm"], categories=["weave"], root=str(embedded_root))
    job = sweep.jobs()[0]
    one = replace(job, execution=execution_of({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}))
    two = replace(job, execution=execution_of({"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}))
    assert one.execution == {"device": "cpu", "threads": 1}
    assert one.fingerprint() != two.fingerprint() and one.fingerprint() == replace(one).fingerprint()



@pytest.mark.slow
def test_editing_a_methods_file_reruns_its_jobs_only(tmp_path: Path, embedded_root: Path) -> None:
    from .test_benchmark import _run

    results = tmp_path / "results"
    first = _run(tmp_path, embedded_root, results, methods=["stpm", "patchcore"])
    assert sorted(r["status"] for r in first) == ["ok", "ok"]
    assert _run(tmp_path, embedded_root, results, methods=["stpm", "patchcore"]) == []
    source = REPO / "models" / "patchcore.py"
    original = source.read_bytes()
    try:
        source.write_bytes(original + b"\n# an edit that changes nothing but the file\n")
        rerun = _run(tmp_path, embedded_root, results, methods=["stpm", "patchcore"])
    finally:
        source.write_bytes(original)
    assert [r["job_id"] for r in rerun] == ["patchcore__quick__weave__seed0"]
