"""PaDiM: one multivariate Gaussian per patch position over frozen multi-level CNN features.

Defard, Setkov, Loesch, Audigier. "PaDiM: a Patch Distribution Modeling Framework for
Anomaly Detection and Localization", ICPR 2020 Workshops (2021), arXiv 2011.08785.

No network is trained. The feature maps of the first three levels of a frozen ImageNet
CNN (paper: WideResNet-50 or ResNet-18 layers 1-3) are brought to the first level's grid
(nearest upsampling) and concatenated, and a random subset of ``channels`` of them is
kept (paper: 550 of 1792 for WRN-50, 100 of 448 for ResNet-18). One pass over the
normal training images estimates, at every grid position, the mean and the covariance
(+ 0.01 I) of these vectors. A test patch is as anomalous as its Mahalanobis distance
to its position's Gaussian: the distances, upsampled (bilinear) and Gaussian-smoothed
(sigma 4), are the anomaly map; its maximum is the image score.

The statistics are accumulated per batch (sums and outer-product sums in float64; the
features themselves are never kept), summed over DDP processes, and turned into the
mean and inverse covariance (float32 buffers, saved with checkpoints) once the training
epoch's features are complete. Scoring is then pure tensor algebra (ONNX-exportable).

Readings, open choices and ablations: docs/methods/padim.md.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from .backbones import FeatureExtractor
from .base import AnomalyModule, AnomalyOutput
from .losses import gaussian_blur
from .registry import register_model
from .scoring import max_score

#: Grid positions whose covariances are reduced, regularised and inverted at once. WRN-50 with
#: d = 550: 128 x 550 x 550 float64 = 310 MB per chunk, beside the full accumulator.
_POSITIONS_PER_CHUNK = 128


def random_channel_subset(total: int, size: int, seed: int) -> Tensor:
    """``size`` distinct channel indices of ``total``, drawn by Python's ``random`` seeded with ``seed``.

    The same draw as the widely used re-implementation of the paper
    (xiahaifeng1995/PaDiM-Anomaly-Detection-Localization-master: ``random.seed(1024)``, then
    ``random.sample(range(total), size)``), so ``seed=1024`` reproduces its subset for the same
    layer order. The order of the indices does not change a Mahalanobis distance.
    """
    if not 0 < size <= total:
        raise ValueError(f"channels must be in [1, {total}] (the backbone's concatenated channels), got {size}")
    return torch.tensor(random.Random(seed).sample(range(total), size), dtype=torch.long)


@register_model("padim")
class PaDiM(AnomalyModule):
    # PaDiM-WR50-Rd550, the paper's 15-category means: pixel AUROC / PRO from Tab. III ("all classes"),
    # image AUROC from Tab. V. The paper prints no per-category image AUROC.
    paper_results = {"image_auroc": 0.953, "pixel_auroc": 0.975, "pro": 0.921}
    drop_incomplete_batches = False  # every training image belongs in the statistics

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] = (1, 2, 3),
        weights: str = "auto",
        weights_sha256: str | None = None,
        channels: int = 550,
        random_channels: bool = True,
        seed: int = 0,
        epsilon: float = 0.01,
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        if epsilon <= 0:
            raise ValueError(f"epsilon must be positive (it makes every covariance invertible), got {epsilon}")
        self.save_hyperparameters()
        self.automatic_optimization = False  # nothing is trained
        self.backbone = FeatureExtractor(backbone, layers, weights, weights_sha256, frozen=True)
        total = sum(self.backbone.channels)
        # Ablation `random_channels=False`: no reduction, all `total` channels (`channels` is ignored).
        index = random_channel_subset(total, channels, seed) if random_channels else torch.arange(total)
        dim = index.numel()
        # Buffers, so that they travel with the checkpoint and with .to(device). The statistics'
        # first axis (grid positions, h * w) depends on the image size: empty until fitted.
        self.register_buffer("channel_index", index)
        self.register_buffer("mean", torch.empty(0, dim))
        self.register_buffer("inv_covariance", torch.empty(0, dim, dim))
        # A parameter with no elements that takes part in no computation: DDP refuses to wrap a
        # module without a trainable parameter, and Lightning counts steps by optimiser steps.
        self._step_anchor = nn.Parameter(torch.empty(0))
        self._reset_accumulators()
        self._statistics_are_current = True  # no features accumulated since the statistics were built
        self._warned_unfitted = False

    # ------------------------------------------------------------------ features

    def embed(self, images: Tensor) -> Tensor:
        """Patch embeddings (B, d, h, w) in float32 at the first layer's grid (h, w)."""
        with torch.no_grad():
            maps = self.backbone(images)  # under autocast when running mixed-precision
        grid = maps[0].shape[-2:]
        # Each coarser cell is repeated over the finer cells it covers (nearest), as in the paper.
        levels = [maps[0]] + [F.interpolate(m, size=grid, mode="nearest") for m in maps[1:]]
        return torch.cat(levels, dim=1).index_select(1, self.channel_index).float()

    # ------------------------------------------------------------------ statistics

    def _reset_accumulators(self) -> None:
        self._count = 0
        self._sum: Tensor | None = None  # (P, d) float64: sum of the embeddings at each position
        self._outer: Tensor | None = None  # (P, d, d) float64: sum of their outer products
        self._grid: tuple[int, int] | None = None

    @torch.no_grad()
    def update_statistics(self, features: Tensor) -> None:
        """Add a batch of embeddings (B, d, h, w) to the running sums (float64, on their device)."""
        b, d, h, w = features.shape
        if self._grid is None:
            self._grid = (h, w)
            self._sum = features.new_zeros(h * w, d, dtype=torch.float64)
            self._outer = features.new_zeros(h * w, d, d, dtype=torch.float64)
        elif self._grid != (h, w):
            raise ValueError(f"PaDiM needs one image size per fit: grid {(h, w)} after {self._grid}")
        x = features.detach().flatten(2).permute(2, 0, 1).double()  # (P, B, d)
        with torch.autocast(device_type=x.device.type, enabled=False):
            self._sum += x.sum(dim=1)
            self._outer.baddbmm_(x.transpose(1, 2), x)  # += x^T x per position
        self._count += b
        self._statistics_are_current = False

    @torch.no_grad()
    def compute_statistics(self) -> None:
        """Mean and inverse of ``covariance + epsilon I`` at every position from the running sums.

        The covariance is the unbiased sample covariance, ``(sum x x^T - N mu mu^T) / (N - 1)``
        (``N - 1`` floored at 1: a single image gives ``epsilon I``), in float64 and chunked over
        positions; under DDP each chunk of the sums is added over all processes first, so every
        process ends with the same statistics. The running sums are left untouched.
        """
        if self._outer is None:
            raise RuntimeError("PaDiM has no accumulated features: fit it (one epoch) first")
        positions, dim = self._sum.shape
        count = _sum_over_processes(torch.tensor(float(self._count), dtype=torch.float64, device=self._sum.device))
        n = float(count.item())
        mean = _sum_over_processes(self._sum.clone()) / n
        regulariser = self.hparams.epsilon * torch.eye(dim, dtype=torch.float64, device=mean.device)
        inverse = torch.empty(positions, dim, dim, dtype=torch.float32, device=mean.device)
        for start in range(0, positions, _POSITIONS_PER_CHUNK):
            part = slice(start, start + _POSITIONS_PER_CHUNK)
            outer = _sum_over_processes(self._outer[part].clone())
            mu = mean[part]
            covariance = (outer - n * mu[:, :, None] * mu[:, None, :]) / max(n - 1.0, 1.0) + regulariser
            # Symmetric positive definite: the inverse through its Cholesky factor.
            inverse[part] = torch.cholesky_inverse(torch.linalg.cholesky(covariance)).float()
        self.mean = mean.float()
        self.inv_covariance = inverse
        self._statistics_are_current = True
        rank_zero_info(f"PaDiM: Gaussians at {positions} positions from {int(n)} images, d = {dim}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The statistics' shape depends on the training image size: take the checkpoint's before the copy.
        for name in ("mean", "inv_covariance"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ scoring

    def mahalanobis(self, features: Tensor) -> Tensor:
        """Mahalanobis distance (B, h, w) of each embedding (B, d, h, w) to its position's Gaussian."""
        b, _, h, w = features.shape
        x = features.float().flatten(2).permute(2, 0, 1)  # (P, B, d)
        if self.mean.shape[0] == 0:
            # Unfitted (sanity-check validation, an export of an untrained model): the standard normal
            # at every position, so the distance is the embedding's norm. Deterministic, meaningless.
            self._warn_unfitted()
            squared = x.pow(2).sum(dim=-1)
        else:
            if self.mean.shape[0] != h * w:
                raise ValueError(f"PaDiM was fitted on a grid of {self.mean.shape[0]} positions; these images "
                                 f"give {h} x {w}: score them at the training image size")
            delta = x - self.mean[:, None, :]
            squared = (torch.einsum("pbi,pij->pbj", delta, self.inv_covariance) * delta).sum(dim=-1)
        return squared.clamp(min=0.0).sqrt().transpose(0, 1).reshape(b, h, w)

    def _warn_unfitted(self) -> None:
        sanity = self._trainer is not None and self.trainer.sanity_checking
        if not (sanity or self._warned_unfitted):
            rank_zero_warn("PaDiM has no statistics (fit it for one epoch or load a checkpoint): "
                           "scoring with a standard normal at every position")
            self._warned_unfitted = True

    def forward(self, images: Tensor) -> AnomalyOutput:
        features = self.embed(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            distances = self.mahalanobis(features)
        anomaly_map = F.interpolate(distances[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
        anomaly_map = gaussian_blur(anomaly_map, self.hparams.sigma)
        return AnomalyOutput(anomaly_map, max_score(anomaly_map))

    # ------------------------------------------------------------------ training = accumulation
    # One epoch of accumulation; the Gaussians are built once the epoch's features are complete:
    # before its validation (so the metrics and the selected checkpoint see them), or at the
    # epoch's end without validation; under DDP from every process's sums.

    def on_train_epoch_start(self) -> None:
        self._reset_accumulators()  # the statistics come from one pass (the latest epoch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.update_statistics(self.embed(batch["image"]))
        self.optimizers().step()  # no-op (see _step_anchor): counts the step
        return None

    def _finish_statistics(self) -> None:
        if not self._statistics_are_current and self._outer is not None:
            self.compute_statistics()

    def on_train_epoch_end(self) -> None:
        self._finish_statistics()
        self._reset_accumulators()  # free the sums (P x d x d float64); the Gaussians are kept

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._finish_statistics()

    def on_test_epoch_start(self) -> None:
        self._finish_statistics()

    def on_predict_epoch_start(self) -> None:
        self._finish_statistics()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Nothing learns: lr 0 over an empty parameter; it exists to count steps.
        return torch.optim.SGD([self._step_anchor], lr=0.0)


def _sum_over_processes(tensor: Tensor) -> Tensor:
    """``tensor`` summed over all DDP processes (in place); itself when running alone."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
