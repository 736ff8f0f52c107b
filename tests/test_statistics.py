"""Paired tests on the same images (DeLong, the paired bootstrap over images with seeds averaged inside):
against brute force and sklearn, and by simulation with known truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from adbench.benchmark.reports.gallery import choose_images
from adbench.benchmark.reports.paired import (
    histogram_ap,
    histogram_auroc,
    histogram_pro,
    paired_bootstrap,
)
from adbench.benchmark.reports.statistics import delong_test


def _brute_force_delong(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The difference and its variance from the O(m n) kernel matrices, as DeLong et al. define them."""
    labels = labels.astype(bool)
    placements = []
    for x in (a, b):
        psi = (x[labels][:, None] > x[~labels][None, :]) + 0.5 * (x[labels][:, None] == x[~labels][None, :])
        placements.append((psi.mean(axis=1), psi.mean(axis=0)))
    s10 = np.cov(np.stack([p[0] for p in placements]))
    s01 = np.cov(np.stack([p[1] for p in placements]))
    variance = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / labels.sum() + (
        s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]
    ) / (~labels).sum()
    return placements[0][0].mean() - placements[1][0].mean(), variance


def _pair(rng: np.random.Generator, n: int, separation_a: float, separation_b: float) -> tuple[np.ndarray, ...]:
    """Two methods scoring the same images: a shared latent defect signal plus each method's own noise."""
    labels = (np.arange(n) < n // 2).astype(int)
    latent = rng.normal(0, 1, n)
    a = latent + separation_a * labels + rng.normal(0, 1, n)
    b = latent + separation_b * labels + rng.normal(0, 1, n)
    return a, b, labels


@pytest.mark.parametrize("levels", [0, 4])
def test_aurocs_and_variance_equal_sklearn_and_brute_force(levels: int) -> None:
    rng = np.random.default_rng(levels)
    a, b, labels = _pair(rng, 60, 1.0, 0.5)
    if levels:  # ties within and across classes
        a, b = np.round(a * levels) / levels, np.round(b * levels) / levels
    result = delong_test(a, b, labels)
    assert result.auroc_a == pytest.approx(roc_auc_score(labels, a), abs=1e-12)
    assert result.auroc_b == pytest.approx(roc_auc_score(labels, b), abs=1e-12)
    difference, variance = _brute_force_delong(a, b, labels)
    assert result.difference == pytest.approx(difference, abs=1e-12)
    low, high = result.interval
    assert (high - low) / 2 == pytest.approx(1.959964 * np.sqrt(variance), rel=1e-5)


def test_type_one_error_is_near_five_percent_and_power_rises_with_the_difference() -> None:
    rng = np.random.default_rng(0)
    rejected = {}
    for gap in (0.0, 0.4, 0.8):
        p_values = [delong_test(*_pair(rng, 80, 1.0 + gap, 1.0)).p_value for _ in range(400)]
        rejected[gap] = float(np.mean(np.array(p_values) < 0.05))
    # 400 trials under H0: a 5 % rate gives 0.05 +- 0.011 (one standard error); bounds at about 3. Measured
    # with four generator seeds: type-I 0.033-0.060, power 0.17-0.20 at gap 0.4 and 0.58-0.62 at gap 0.8.
    assert 0.02 <= rejected[0.0] <= 0.09, rejected
    assert rejected[0.0] < rejected[0.4] < rejected[0.8] and rejected[0.8] > 0.4, rejected


def test_identical_scores_and_bad_input() -> None:
    a, _, labels = _pair(np.random.default_rng(1), 20, 1.0, 1.0)
    same = delong_test(a, a, labels)
    assert same.difference == 0 and same.p_value == 1.0
    with pytest.raises(ValueError, match="both labels"):
        delong_test(a, a, np.ones_like(labels))
    with pytest.raises(ValueError, match="paired scores"):
        delong_test(a, a[:-1], labels)


# --------------------------------------------------------------------------- paired bootstrap over images


def _design(rng: np.random.Generator, n: int, gap: float, seeds: int) -> tuple[list, list, np.ndarray]:
    """Two methods, ``seeds`` seeds each, on the same images: the latent defect signal is shared by every
    seed and method (the test set), each seed adds its own noise (training)."""
    labels = (np.arange(n) < n // 2).astype(int)
    latent = rng.normal(0, 1, n)
    a = [latent + (1.0 + gap) * labels + rng.normal(0, 1, n) for _ in range(seeds)]
    b = [latent + 1.0 * labels + rng.normal(0, 1, n) for _ in range(seeds)]
    return a, b, labels


def _rejections(gaps: tuple[float, ...], trials: int, seeds: int, n_resamples: int) -> dict[float, float]:
    rng = np.random.default_rng(seeds)
    return {gap: float(np.mean([paired_bootstrap(*_design(rng, 80, gap, seeds), n_resamples=n_resamples,
                                                 seed=k).p_value < 0.05 for k in range(trials)]))
            for gap in gaps}  # fmt: skip


def test_paired_bootstrap_keeps_five_percent_under_the_null_and_finds_a_real_gap() -> None:
    rejected = _rejections((0.0, 1.0), trials=200, seeds=1, n_resamples=100)
    # 200 trials: a 5 % rate gives 0.05 +- 0.015. Measured (300 trials, 300 resamples): 0.03 under H0,
    # 0.59 at gap 0.8 -- DeLong's figures on the same design (test above).
    assert 0.01 <= rejected[0.0] <= 0.10, rejected
    assert rejected[1.0] > 0.5, rejected


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [1, 3])
def test_paired_bootstrap_power_rises_with_the_true_difference(seeds: int) -> None:
    rejected = _rejections((0.0, 0.4, 0.8), trials=400, seeds=seeds, n_resamples=300)
    # Measured (300 trials): one seed 0.03 / 0.18 / 0.59, three seeds 0.05 / 0.48 / 0.97: averaging seeds
    # inside each resample removes training noise, never the shared test-set noise, and keeps the 5 %.
    assert 0.02 <= rejected[0.0] <= 0.09, rejected
    assert rejected[0.0] < rejected[0.4] < rejected[0.8] and rejected[0.8] > 0.4, rejected


def test_paired_bootstrap_agrees_with_delong_and_rejects_bad_input() -> None:
    a, b, labels = _design(np.random.default_rng(3), 120, 0.6, 1)
    boot, delong = paired_bootstrap(a, b, labels, n_resamples=2000), delong_test(a[0], b[0], labels)
    assert boot.difference == pytest.approx(delong.difference, abs=1e-12)
    assert boot.interval[0] == pytest.approx(delong.interval[0], abs=0.03)
    assert boot.interval[1] == pytest.approx(delong.interval[1], abs=0.03)
    with pytest.raises(ValueError, match="both good and anomalous"):
        paired_bootstrap(a, b, np.ones_like(labels))
    with pytest.raises(ValueError, match="one value per image"):
        paired_bootstrap([a[0][:-1]], b, labels)


def test_pixel_metrics_from_per_image_histograms_match_sklearn_on_the_pixels() -> None:
    from sklearn.metrics import average_precision_score

    from adbench.callbacks.pixel_histograms import pixel_histograms

    rng = np.random.default_rng(0)
    masks = np.zeros((12, 32, 32), bool)
    masks[6:, 10:18, 8:20] = True
    maps = rng.normal(0, 1, masks.shape) + 1.5 * masks
    histograms, _, _ = pixel_histograms(maps, masks)
    assert histograms.shape[:2] == (12, 2) and 250 <= histograms.shape[2] <= 257 and histograms.sum() == maps.size
    pixels, truth = maps.ravel(), masks.ravel()
    whole = histograms.sum(axis=0)
    # 256 bins: ties within a bin move AUROC by little and AP (a step per distinct score) by a few thousandths
    # (measured here: AUROC within 0.001, AP 0.3228 against 0.3276); both methods of a pair are binned alike.
    assert histogram_auroc(whole[0], whole[1]) == pytest.approx(roc_auc_score(truth, pixels), abs=0.002)
    assert histogram_ap(whole[0], whole[1]) == pytest.approx(average_precision_score(truth, pixels), abs=0.012)


def test_pro_from_per_image_region_histograms_matches_the_exact_pro() -> None:
    from adbench.callbacks.metrics import compute_anomaly_metrics
    from adbench.callbacks.pixel_histograms import pixel_histograms

    rng = np.random.default_rng(1)
    masks, small = np.zeros((16, 48, 48), bool), np.zeros((16, 48, 48), bool)
    for i in range(8, 16):  # a large defect and a small, fainter one per image: the region weights matter
        masks[i, 4:30, 4:30] = True
        small[i, 40:43, 40 - i: 44 - i] = True
    maps = rng.normal(0, 1, masks.shape) + rng.uniform(1.0, 3.0, (16, 1, 1)) * masks + 0.3 * small
    masks |= small
    histograms, regions, _ = pixel_histograms(maps, masks)
    assert regions.shape == (16, histograms.shape[2])
    # Each region adds 1 in all: per image, its number of regions (two here), none for the good ones.
    np.testing.assert_allclose(regions.sum(axis=1), [0] * 8 + [2] * 8, rtol=1e-5)
    exact = compute_anomaly_metrics(np.zeros(16), np.arange(16) >= 8, maps, masks)
    normal, weighted = histograms[:, 0].sum(axis=0), regions.sum(axis=0)
    # Straight lines between the 256 bins' edges: measured on generator seeds 0-3 within 3e-4 of the exact
    # PRO at both FPR limits (here 0.4248 / 0.2073 against 0.4248 / 0.2074); counting pixels instead of
    # regions (the small defects then weigh nothing) gives 0.656.
    assert histogram_pro(normal, weighted, 0.3) == pytest.approx(exact["pro"], abs=0.003)
    assert histogram_pro(normal, weighted, 0.05) == pytest.approx(exact["pro_fpr05"], abs=0.005)
    unweighted = histogram_pro(normal, histograms[:, 1].sum(axis=0).astype(float), 0.3)
    assert unweighted - exact["pro"] > 0.1  # the test tells the region weighting from none
    # Vectorised over resamples: rows are independent curves.
    both = histogram_pro(np.stack([normal, normal]), np.stack([weighted, histograms[:, 1].sum(axis=0)]), 0.3)
    np.testing.assert_allclose(both, [histogram_pro(normal, weighted, 0.3), unweighted], rtol=1e-6)


def test_gallery_chooses_images_by_name_never_by_look() -> None:
    names = [f"{d}_{i:03d}" for d in ("broken_large", "contamination", "good") for i in (4, 0, 2)]
    assert choose_images(names) == ["broken_large_000", "broken_large_002", "contamination_000",
                                    "contamination_002", "good_000"]


def _pixel_design(rng: np.random.Generator, gap: float) -> tuple[list, list, np.ndarray]:
    """Two methods' per-image pixel histograms (normal, anomalous, region-weighted anomalous) of the
    same 40 images (20 with a defect, one or two regions): a per-image difficulty shared by both
    (the test set), each method's own pixel noise."""
    from adbench.callbacks.pixel_histograms import pixel_histograms

    labels = (np.arange(40) < 20).astype(int)
    masks = np.zeros((40, 8, 8), bool)
    masks[:20, 2:5, 2:6] = True
    masks[:10, 7, 7] = True
    difficulty = rng.normal(0, 1, (40, 1, 1))
    maps = [difficulty * masks + (1.0 + g) * masks + rng.normal(0, 1, masks.shape) for g in (gap, 0.0)]
    evidence = []
    for side in maps:
        histograms, regions, _ = pixel_histograms(side, masks)
        evidence.append([np.concatenate([histograms, regions[:, None]], axis=1).astype(float)])
    return evidence[0], evidence[1], labels


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["pixel_auroc", "pixel_ap", "pro"])
def test_paired_bootstrap_of_pixel_metrics_keeps_five_percent_and_gains_power(metric: str) -> None:
    rng = np.random.default_rng(0)
    rejected = {gap: float(np.mean([paired_bootstrap(*_pixel_design(rng, gap), metric=metric,
                                                     n_resamples=200, seed=k).p_value < 0.05 for k in range(300)]))
                for gap in (0.0, 0.15, 0.3)}  # fmt: skip
    # Measured (300 trials, one defect of 12 pixels in every defective image, a second of one pixel in half of
    # them): pixel AUROC 0.060 / 0.36 / 0.79, pixel AP 0.083 / 0.27 / 0.73, PRO 0.070 / 0.15 / 0.40 (PRO weighs
    # the one-pixel defects as much as the large ones, and they carry little of the gap).
    assert 0.01 <= rejected[0.0] <= 0.10, rejected
    assert rejected[0.0] < rejected[0.15] < rejected[0.3] and rejected[0.3] > 0.25, rejected


def test_a_seed_method_whose_baseline_has_no_complete_row_is_said_not_dropped() -> None:
    from adbench.benchmark.reports.summary import missing_baselines

    table = pd.DataFrame({"mean": [0.9, 0.8, float("nan")]}, index=["pouta (quick)", "draem (quick)", "tsdn (quick)"])
    runs = pd.DataFrame([
        {"name": "pouta", "row": "pouta (quick)", "baseline": "draem-pretrained-encoder"},
        {"name": "tsdn", "row": "tsdn (quick)", "baseline": "draem-pretrained-encoder"},  # incomplete itself: silent
        {"name": "rstpm", "row": "rstpm (quick)", "baseline": "stpm"},  # not in the table at all: silent
    ])
    sentences = missing_baselines({"image_auroc": table}, runs)
    assert sentences == ["pouta (quick) against its baseline draem-pretrained-encoder (quick): not compared, "
                         "the baseline has no finished records in this sweep."]
