"""PaDiM: shapes, statistics and distances against brute force, seeded channels, the no-reduction arm,
checkpoints, bf16, detection."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning import Trainer, seed_everything

from adbench.datamodules import MVTecDataModule
from adbench.models.losses import gaussian_blur
from adbench.models.padim import PaDiM, random_channel_subset

from .helpers import TEST_SEED, fit_and_test

SIZE = 64  # lite0 level 1 (stride 4) -> a 16 x 16 grid
LITE0_CHANNELS = 24 + 40 + 112


def _model(**kwargs: object) -> PaDiM:
    return PaDiM(**{"backbone": "tf_efficientnet_lite0", "layers": (1, 2, 3), "channels": 100, **kwargs})


def _fit_on_random_images(model: PaDiM, seed: int = 0, batches: tuple[int, ...] = (5, 3, 7)) -> None:
    generator = torch.Generator().manual_seed(seed)
    for size in batches:
        model.update_statistics(model.embed(torch.rand(size, 3, SIZE, SIZE, generator=generator)))
    model.compute_statistics()


def _brute_force(features: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-position mean (P, d) and inverse of np.cov + epsilon I (P, d, d) of features (N, d, h, w)."""
    n, d = features.shape[:2]
    vectors = features.reshape(n, d, -1).astype(np.float64)
    means = vectors.mean(axis=0).T
    inverses = np.stack([np.linalg.inv(np.cov(vectors[:, :, p], rowvar=False) + epsilon * np.eye(d))
                         for p in range(vectors.shape[2])])  # fmt: skip
    return means, inverses


# --------------------------------------------------------------------------- contract and features


def test_contract_shapes_at_64px() -> None:
    model = _model().eval()
    assert model.backbone.reductions == [4, 8, 16] and sum(model.backbone.channels) == LITE0_CHANNELS
    features = model.embed(torch.rand(2, 3, SIZE, 96))
    assert features.shape == (2, 100, SIZE // 4, 96 // 4) and features.dtype == torch.float32
    _fit_on_random_images(model)
    assert model.mean.shape == (16 * 16, 100) and model.inv_covariance.shape == (16 * 16, 100, 100)
    with torch.no_grad():
        anomaly_map, score = model(torch.rand(3, 3, SIZE, SIZE))
    assert anomaly_map.shape == (3, 1, SIZE, SIZE) and score.shape == (3,)
    assert torch.isfinite(anomaly_map).all() and (anomaly_map >= 0).all()
    torch.testing.assert_close(score, anomaly_map.flatten(1).amax(dim=1))
    with pytest.raises(ValueError, match="training image size"):
        model(torch.rand(1, 3, 2 * SIZE, 2 * SIZE))


def test_levels_are_nearest_upsampled_and_concatenated_before_the_selection() -> None:
    model = _model(random_channels=False).eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        maps = model.backbone(images)
        features = model.embed(images)
    assert features.shape[1] == LITE0_CHANNELS
    # A level-3 cell (stride 16) covers 4 x 4 level-1 cells (stride 4): all carry its vector.
    torch.testing.assert_close(features[:, 64:, 4:8, 8:12], maps[2][:, :, 1:2, 2:3].expand(-1, -1, 4, 4))
    torch.testing.assert_close(features[:, :24], maps[0])


def test_unfitted_model_scores_with_a_standard_normal_and_warns() -> None:
    model = _model().eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with pytest.warns(UserWarning, match="no statistics"), torch.no_grad():
        distances = model.mahalanobis(model.embed(images))
    torch.testing.assert_close(distances, model.embed(images).norm(dim=1))


# --------------------------------------------------------------------------- statistics and distances


def test_statistics_equal_brute_force_mean_and_covariance() -> None:
    model = _model(channels=12)
    generator = torch.Generator().manual_seed(0)
    # Off-centre, unevenly scaled features: sum-of-squares accumulation must not lose the covariance.
    scales = torch.rand(1, 12, 1, 1, generator=generator) * 3.0 + 0.1
    features = 20.0 + scales * torch.randn(37, 12, 3, 4, generator=generator)
    for batch in features.split([10, 1, 26]):  # uneven batches, one of a single image
        model.update_statistics(batch)
    model.compute_statistics()
    means, inverses = _brute_force(features.numpy(), epsilon=0.01)
    assert model.mean.dtype == model.inv_covariance.dtype == torch.float32
    np.testing.assert_allclose(model.mean.numpy(), means, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(model.inv_covariance.numpy(), inverses, rtol=1e-4, atol=1e-5)


def test_distances_and_map_equal_brute_force_mahalanobis() -> None:
    model = _model(channels=12).eval()
    generator = torch.Generator().manual_seed(1)
    training = torch.randn(40, 12, 3, 4, generator=generator) * 2.0 + 1.0
    model.update_statistics(training)
    model.compute_statistics()
    means, inverses = _brute_force(training.numpy(), epsilon=0.01)
    queries = torch.randn(5, 12, 3, 4, generator=generator) * 3.0
    vectors = queries.numpy().reshape(5, 12, 12).astype(np.float64)  # (B, d, P)
    expected = np.empty((5, 12))
    for b in range(5):
        for p in range(12):
            delta = vectors[b, :, p] - means[p]
            expected[b, p] = math.sqrt(delta @ inverses[p] @ delta)
    with torch.no_grad():
        distances = model.mahalanobis(queries)
    np.testing.assert_allclose(distances.numpy().reshape(5, 12), expected, rtol=1e-4)

    # The map: the distances upsampled (bilinear) to the image and smoothed with sigma 4; score = its max.
    images = torch.rand(2, 3, SIZE, SIZE, generator=generator)
    model = _model(channels=12).eval()
    with torch.no_grad():
        model.update_statistics(model.embed(torch.rand(30, 3, SIZE, SIZE, generator=generator)))
        model.compute_statistics()
        features = model.embed(images)
        anomaly_map, score = model(images)
    vectors = features.double().flatten(2)
    mean, inverse = model.mean.double(), model.inv_covariance.double()
    delta = vectors - mean.T[None]  # (B, d, P)
    brute = torch.einsum("bip,pij,bjp->bp", delta, inverse, delta).sqrt().view(2, 1, 16, 16)
    reference = gaussian_blur(F.interpolate(brute.float(), size=(SIZE, SIZE), mode="bilinear"), 4.0)
    torch.testing.assert_close(anomaly_map, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(score, reference.flatten(1).amax(dim=1), rtol=1e-4, atol=1e-4)


def test_single_image_gives_the_regulariser_alone() -> None:
    model = _model(channels=5, epsilon=0.5)
    model.update_statistics(torch.randn(1, 5, 2, 2))
    model.compute_statistics()
    torch.testing.assert_close(model.inv_covariance, torch.eye(5).expand(4, 5, 5) / 0.5)


# --------------------------------------------------------------------------- channel selection


def test_random_channel_subset_is_seeded() -> None:
    subset = random_channel_subset(LITE0_CHANNELS, 100, seed=0)
    assert subset.shape == (100,) and subset.unique().numel() == 100
    assert int(subset.min()) >= 0 and int(subset.max()) < LITE0_CHANNELS
    assert torch.equal(random_channel_subset(LITE0_CHANNELS, 100, seed=0), subset), "same seed, same channels"
    assert not torch.equal(random_channel_subset(LITE0_CHANNELS, 100, seed=1), subset)
    assert torch.equal(_model(seed=3).channel_index, _model(seed=3).channel_index)
    assert torch.equal(_model(seed=3).channel_index, random_channel_subset(LITE0_CHANNELS, 100, seed=3))
    with pytest.raises(ValueError, match="channels must be in"):
        _model(channels=LITE0_CHANNELS + 1)


def test_no_reduction_arm_differs_only_in_the_channel_selection() -> None:
    full, ablation = _model(seed=5), _model(seed=5, random_channels=False)
    assert torch.equal(ablation.channel_index, torch.arange(LITE0_CHANNELS)), "no reduction: every channel"
    assert ablation.mean.shape == (0, LITE0_CHANNELS)
    assert {k: v for k, v in full.hparams.items() if k != "random_channels"} == \
        {k: v for k, v in ablation.hparams.items() if k != "random_channels"}  # fmt: skip
    # Given the full method's channels, the arm computes exactly what the full method computes.
    ablation.channel_index = full.channel_index.clone()
    _fit_on_random_images(full, seed=2)
    _fit_on_random_images(ablation, seed=2)
    torch.testing.assert_close(ablation.mean, full.mean, rtol=0, atol=0)
    torch.testing.assert_close(ablation.inv_covariance, full.inv_covariance, rtol=0, atol=0)
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(ablation.eval()(images).anomaly_map, full.eval()(images).anomaly_map)


# --------------------------------------------------------------------------- training and checkpoints


@pytest.fixture(scope="module")
def fitted(embedded_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[PaDiM, Trainer, MVTecDataModule]:
    seed_everything(0)
    model = _model()
    data = MVTecDataModule(root=str(embedded_root), category="weave", image_size=SIZE, batch_size=8)
    trainer = Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=tmp_path_factory.mktemp("padim"),
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    return model, trainer, data


def test_one_epoch_uses_every_training_image(fitted: tuple[PaDiM, Trainer, MVTecDataModule]) -> None:
    model, trainer, data = fitted
    assert trainer.global_step == math.ceil(len(data.train_set) / 8), "the incomplete last batch is kept"
    assert model.mean.shape == (16 * 16, 100) and torch.isfinite(model.inv_covariance).all()
    assert model._outer is None, "the running sums are freed once the Gaussians exist"


def test_statistics_round_trip_through_a_checkpoint(
    fitted: tuple[PaDiM, Trainer, MVTecDataModule], tmp_path: Path
) -> None:
    model, trainer, _ = fitted
    path = tmp_path / "padim.ckpt"
    trainer.save_checkpoint(path)
    fresh = PaDiM.load_from_checkpoint(path, weights_only=False)
    assert torch.equal(fresh.mean, model.mean) and torch.equal(fresh.inv_covariance, model.inv_covariance)
    assert torch.equal(fresh.channel_index, model.channel_index)
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images).anomaly_map, model.eval()(images).anomaly_map)
    other = _model()
    other.load_state_dict(model.state_dict())  # strict, despite the size-dependent shapes
    assert torch.equal(other.inv_covariance, model.inv_covariance)


def test_bf16_autocast_features_give_float32_statistics_and_maps() -> None:
    model = _model().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _fit_on_random_images(model)
        with torch.no_grad():
            anomaly_map, score = model(torch.rand(2, 3, SIZE, SIZE))
    assert model.mean.dtype == model.inv_covariance.dtype == torch.float32
    assert anomaly_map.dtype == torch.float32 and torch.isfinite(anomaly_map).all() and torch.isfinite(score).all()


@pytest.mark.slow
def test_separates_embedded_defects(embedded_root: Path) -> None:
    _, metrics = fit_and_test(lambda: _model(seed=TEST_SEED), embedded_root, steps=-1, category="weave",
                              max_epochs=1)  # fmt: skip
    # Measured on weave at 64 px (lite0 levels 1-3, d = 100, channel seed = TEST_SEED; 2026-12-05, dataset
    # v2): image AUROC 0.983 / 0.986 / 0.994, pixel AUROC 0.920 / 0.928 / 0.918 for seeds 0 / 1 / 2
    # (seed 0 pinned to AVX2: the same). No training, so the spread is the channel draw's alone.
    assert metrics["image_auroc"] > 0.9 and metrics["pixel_auroc"] > 0.85, metrics
