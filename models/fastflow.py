"""FastFlow: 2D normalizing flows on frozen CNN features.

Yu, Zheng, Wang, Li, Wu, Zhao, Wu. "FastFlow: Unsupervised Anomaly Detection and
Localization via 2D Normalizing Flows", arXiv 2111.07677 (2021).

A frozen ImageNet backbone gives one feature map per level; each map is
layer-normalised with a learned scale and shift per position (ResNet-like backbones, as
the reproductions do) and fed to its own 2D
normalizing flow: a stack of affine-coupling steps whose subnetworks are small
convolutional networks (3x3 and 1x1 kernels alternating), so the flow keeps the
feature map's layout and each position's transform sees its neighbourhood. Trained
on normal images to map their features to a standard normal, the flow gives
anomalous positions a low likelihood. Loss: the negative log-likelihood
``0.5 ||z||^2 - log|det J|`` per position. Map: per level the negated probability
``-exp(-0.5 * mean_c z^2)``, upsampled to the input and averaged over levels; the
image score is its maximum.

The coupling steps are FrEIA's ``AllInOneBlock`` (soft-clamped affine coupling, a
fixed random channel permutation and a learned global affine scaling) chained by its
``SequenceINN``, as the field's implementations build them. The flows run in
float32 whatever the autocast context.

Readings, open choices and ablations: docs/methods/fastflow.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import FeatureExtractor
from .base import AnomalyModule, AnomalyOutput
from .registry import register_model
from .scoring import max_score

MAP_KINDS = ("probability", "nll")
LAYER_NORMS = ("position", "channel", "none")


class PositionLayerNorm(nn.Module):
    """LayerNorm over (C, H, W) with a learned scale and shift per position and channel.

    At the ``grid`` it was built for this is ``nn.LayerNorm([C, H, W])``, the reproductions' norm. For
    feature maps of another size the scale and shift are resampled (bilinear), so one model serves
    every image size, as the flows do.
    """

    def __init__(self, channels: int, grid: tuple[int, int], eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, *grid))
        self.bias = nn.Parameter(torch.zeros(1, channels, *grid))

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if weight.shape[-2:] != x.shape[-2:]:
            weight, bias = (F.interpolate(p, size=x.shape[-2:], mode="bilinear", align_corners=False)
                            for p in (weight, bias))  # fmt: skip
        return F.group_norm(x, 1, eps=self.eps) * weight + bias  # one group: LayerNorm over (C, H, W)


def level_norm(kind: str, channels: int, grid: tuple[int, int]) -> nn.Module:
    """Per level: ``position`` (scale and shift per position), ``channel`` (per channel), ``none``."""
    if kind == "position":
        return PositionLayerNorm(channels, grid)
    # GroupNorm with one group is LayerNorm over (C, H, W) with a per-channel scale and shift.
    return nn.GroupNorm(1, channels) if kind == "channel" else nn.Identity()


def subnet_constructor(kernel_size: int, hidden_ratio: float) -> Callable[[int, int], nn.Module]:
    """FrEIA's subnet factory: ``(in, out) -> conv(k) -> ReLU -> conv(k)``, ``hidden = ratio * in``.

    The subnet predicts the coupling's log-scale and shift for the other half of the channels
    from this half; "same" padding keeps the feature map's size.
    """

    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden = max(1, int(in_channels * hidden_ratio))
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size, padding=kernel_size // 2),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, kernel_size, padding=kernel_size // 2),
        )

    return build


def build_flow(
    channels: int, steps: int, conv3x3_only: bool, hidden_ratio: float, clamp: float
) -> Ff.SequenceINN:
    """One level's 2D flow: ``steps`` AllInOneBlocks, subnet kernels 3, 1, 3, 1, ... (3 only if asked).

    FrEIA is given spatial dimensions (1, 1): its blocks use only the channel count and the
    tensor rank (the convolutions are size-agnostic), so one flow serves any input size.
    """
    flow = Ff.SequenceINN(channels, 1, 1)
    for step in range(steps):
        kernel_size = 1 if step % 2 == 1 and not conv3x3_only else 3
        flow.append(
            Fm.AllInOneBlock,
            subnet_constructor=subnet_constructor(kernel_size, hidden_ratio),
            affine_clamping=clamp,
            permute_soft=False,
        )
    return flow


def negative_log_likelihood(z: Tensor, log_det: Tensor) -> Tensor:
    """Mean over images and positions of ``0.5 * sum_c z^2 - log|det J| / (H W)`` (constant dropped).

    ``z``: (B, C, H, W) flow output; ``log_det``: (B,), summed over the image's positions.
    """
    positions = z.shape[-2] * z.shape[-1]
    return (0.5 * z.pow(2).sum(dim=1).flatten(1).mean(dim=1) - log_det / positions).mean()


def level_map(z: Tensor, kind: str) -> Tensor:
    """(B, 1, h, w), larger = more anomalous: ``-exp(-0.5 mean_c z^2)`` or ``0.5 mean_c z^2``."""
    half_mean_square = 0.5 * z.pow(2).mean(dim=1, keepdim=True)
    return -torch.exp(-half_mean_square) if kind == "probability" else half_mean_square


@register_model("fastflow")
class FastFlow(AnomalyModule):
    # MVTec AD 15-category mean, WideResNet-50 row (see docs/methods/fastflow.md for the source).
    paper_results = {"pixel_auroc": 0.981}

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] = (1, 2, 3),
        weights: str = "auto",
        weights_sha256: str | None = None,
        flow_steps: int = 8,
        conv3x3_only: bool = False,
        hidden_ratio: float = 1.0,
        clamp: float = 2.0,
        layer_norm: str = "position",
        norm_image_size: int = 256,
        map_kind: str = "probability",
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
    ) -> None:
        super().__init__()
        if map_kind not in MAP_KINDS:
            raise ValueError(f"map_kind must be one of {MAP_KINDS}, got {map_kind!r}")
        if layer_norm not in LAYER_NORMS:  # not a bool: before 2026-12-07, True meant "channel"
            raise ValueError(f"layer_norm must be one of {LAYER_NORMS}, got {layer_norm!r}")
        if flow_steps < 1 or hidden_ratio <= 0:
            raise ValueError(f"need flow_steps >= 1 and hidden_ratio > 0, got {flow_steps}, {hidden_ratio}")
        self.save_hyperparameters()
        self.feature_extractor = FeatureExtractor(backbone, layers, weights, weights_sha256, frozen=True)
        channels = self.feature_extractor.channels
        # The per-position scale and shift live on the feature grids of a norm_image_size image.
        grids = [(norm_image_size // r, norm_image_size // r) for r in self.feature_extractor.reductions]
        if min(min(g) for g in grids) < 1:
            raise ValueError(f"norm_image_size {norm_image_size} is smaller than the backbone's largest stride "
                             f"{max(self.feature_extractor.reductions)}")  # fmt: skip
        self.norms = nn.ModuleList(level_norm(layer_norm, c, g) for c, g in zip(channels, grids, strict=True))
        self.flows = nn.ModuleList(
            build_flow(c, flow_steps, conv3x3_only, hidden_ratio, clamp) for c in channels
        )

    def _flow_outputs(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per level ``(z, log|det J|)``: z (B, C, h, w), log-determinant (B,), both float32."""
        with torch.no_grad():
            features = self.feature_extractor(images)
        outputs = []
        # Coupling exponentials and log-determinants summed over thousands of positions: float32.
        with torch.autocast(device_type=images.device.type, enabled=False):
            for feature, norm, flow in zip(features, self.norms, self.flows, strict=True):
                z, log_det = flow(norm(feature.float()))
                outputs.append((z, log_det))
        return outputs

    def forward(self, images: Tensor) -> AnomalyOutput:
        maps = [level_map(z, self.hparams.map_kind) for z, _ in self._flow_outputs(images)]
        size = images.shape[-2:]
        anomaly_map = torch.stack(
            [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
        ).mean(dim=0)
        return AnomalyOutput(anomaly_map, max_score(anomaly_map))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = sum(negative_log_likelihood(z, log_det) for z, log_det in self._flow_outputs(batch["image"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The flows' fixed permutation matrices are parameters without gradients: left out.
        params = [p for p in [*self.norms.parameters(), *self.flows.parameters()] if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
