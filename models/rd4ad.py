"""RD4AD: reverse distillation from a one-class embedding.

Deng, Li. "Anomaly Detection via Reverse Distillation from One-Class Embedding",
CVPR 2022 (arXiv 2201.10703).

A frozen ImageNet teacher encoder E and a student decoder D that runs the other
way: D does not see the image, only a compact one-class embedding of the teacher's
features (the one-class bottleneck, OCBE: multi-scale feature fusion, then a
ResNet-stage-like embedding), and must rebuild the teacher's multi-scale features
from it. On normal images it learns to; an anomaly's features are not carried
through the compact embedding, so the student's rebuilt features disagree with the
teacher's there. Loss and map: per level ``1 - cos(t, s)``; the map sums the levels
upsampled to the input size and is Gaussian-smoothed (sigma 4); the image score is
its maximum.

Readings, open choices and ablations: docs/methods/rd4ad.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import FeatureExtractor
from .base import AnomalyModule, AnomalyOutput
from .distillation import cosine_distance, fuse_maps
from .losses import gaussian_blur
from .registry import register_model


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1 -> 3x3 -> 1x1, BN after each, residual shortcut).

    ``resample``: ``"down"`` halves the resolution (stride-2 3x3 conv, stride-2 1x1
    shortcut), ``"up"`` doubles it (2x2 stride-2 transposed convs in place of both:
    the student decoder's blocks), ``"none"`` keeps it. The shortcut is projected
    (conv + BN) whenever the shape changes. ``final_relu=False`` leaves the output
    linear (signed), for students of teachers with linear outputs.
    """

    def __init__(
        self, in_channels: int, out_channels: int, width: int, resample: str = "none", final_relu: bool = True
    ) -> None:
        super().__init__()
        if resample not in ("none", "down", "up"):
            raise ValueError(f"resample must be 'none', 'down' or 'up', got {resample!r}")
        width = max(1, width)
        if resample == "up":
            middle: nn.Module = nn.ConvTranspose2d(width, width, 2, stride=2, bias=False)
        else:
            middle = nn.Conv2d(width, width, 3, stride=2 if resample == "down" else 1, padding=1, bias=False)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            middle, nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )  # fmt: skip
        if resample == "up":
            shortcut: nn.Module = nn.Sequential(
                nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        elif resample == "down" or in_channels != out_channels:
            shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=2 if resample == "down" else 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            shortcut = nn.Identity()
        self.shortcut = shortcut
        self.final_relu = final_relu

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x) + self.shortcut(x)
        return F.relu(out) if self.final_relu else out


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale feature fusion to the deepest level, then the one-class embedding stage."""

    def __init__(self, channels: Sequence[int], num_blocks: int = 3) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"the one-class embedding needs at least one block, got {num_blocks}")
        channels = list(channels)
        levels, deepest = len(channels), channels[-1]
        # Level i reaches the deepest resolution through (levels - 1 - i) stride-2 convs.
        self.fuse = nn.ModuleList(
            nn.Sequential(*[_conv_bn_relu(channels[j], channels[j + 1], stride=2) for j in range(i, levels - 1)])
            for i in range(levels)
        )
        self.out_channels = 2 * deepest
        blocks = [Bottleneck(levels * deepest, self.out_channels, deepest, resample="down")]
        blocks += [Bottleneck(self.out_channels, self.out_channels, deepest) for _ in range(num_blocks - 1)]
        self.embed = nn.Sequential(*blocks)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        fused = [fuse(f) for fuse, f in zip(self.fuse, features, strict=True)]
        size = fused[-1].shape[-2:]
        # Odd sizes round differently along the chains; align to the deepest level.
        fused = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear") for f in fused]
        return self.embed(torch.cat(fused, dim=1))


class ReverseDecoder(nn.Module):
    """Student decoder: one upsampling stage per teacher level, deepest first."""

    def __init__(
        self, channels: Sequence[int], in_channels: int, blocks: Sequence[int], output_relu: bool
    ) -> None:
        super().__init__()
        channels = list(channels)
        if len(blocks) != len(channels) or min(blocks) < 1:
            raise ValueError(f"decoder_blocks needs one positive count per level ({len(channels)}), got {list(blocks)}")
        stages = []
        for k, count in enumerate(blocks):
            out = channels[len(channels) - 1 - k]
            width = out // 2
            stage = [
                Bottleneck(
                    in_channels if i == 0 else out, out, width,
                    resample="up" if i == 0 else "none",
                    final_relu=output_relu or i < count - 1,  # the stage's output: see output_relu
                )
                for i in range(count)
            ]  # fmt: skip
            stages.append(nn.Sequential(*stage))
            in_channels = out
        self.stages = nn.ModuleList(stages)

    def forward(self, embedding: Tensor, sizes: Sequence[torch.Size]) -> list[Tensor]:
        """``sizes``: the teacher levels' (h, w), shallowest first. Returns features in that order."""
        outputs = []
        x = embedding
        for stage, size in zip(self.stages, reversed(list(sizes)), strict=True):
            x = stage(x)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            outputs.append(x)
        return outputs[::-1]


@register_model("rd4ad")
class RD4AD(AnomalyModule):
    paper_results = {"image_auroc": 0.985, "pixel_auroc": 0.978, "pro": 0.939}

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] = (1, 2, 3),
        weights: str = "auto",
        weights_sha256: str | None = None,
        oce_blocks: int = 3,
        decoder_blocks: Sequence[int] = (3, 4, 6),
        student_output_relu: bool | None = None,
        lr: float = 0.005,
        betas: tuple[float, float] = (0.5, 0.999),
        map_fusion: str = "sum",
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        if map_fusion not in ("sum", "product", "mean"):
            raise ValueError(f"map_fusion must be 'sum', 'product' or 'mean', got {map_fusion!r}")
        self.save_hyperparameters()
        self.teacher = FeatureExtractor(backbone, layers, weights, weights_sha256, frozen=True)
        reductions = self.teacher.reductions
        if any(b != 2 * a for a, b in zip(reductions, reductions[1:], strict=False)):
            raise ValueError(f"RD4AD needs levels whose strides double ({reductions} for layers {list(layers)})")
        if student_output_relu is None:
            student_output_relu = backbone.startswith(("resnet", "wide_resnet"))
        self.bottleneck = OneClassBottleneck(self.teacher.channels, oce_blocks)
        self.decoder = ReverseDecoder(
            self.teacher.channels, self.bottleneck.out_channels, decoder_blocks, student_output_relu
        )

    def _features(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        with torch.no_grad():
            teacher = self.teacher(images)
        student = self.decoder(self.bottleneck(teacher), [t.shape[-2:] for t in teacher])
        return teacher, student

    def forward(self, images: Tensor) -> AnomalyOutput:
        teacher, student = self._features(images)
        maps = [cosine_distance(t, s) for t, s in zip(teacher, student, strict=True)]
        anomaly_map = gaussian_blur(fuse_maps(maps, images.shape[-2:], self.hparams.map_fusion), self.hparams.sigma)
        return AnomalyOutput(anomaly_map, anomaly_map.flatten(1).amax(dim=1))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        teacher, student = self._features(batch["image"])
        loss = sum(cosine_distance(t, s).mean() for t, s in zip(teacher, student, strict=True))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [*self.bottleneck.parameters(), *self.decoder.parameters()]
        return torch.optim.Adam(params, lr=self.hparams.lr, betas=tuple(self.hparams.betas))
