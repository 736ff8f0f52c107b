"""RSTPM: Reconstructed Student-Teacher and Discriminative Networks.

Yamada, Kamiya, Hotta. "Reconstructed Student-Teacher and Discriminative
Networks for Anomaly Detection", IROS 2022 (arXiv 2210.07548).

STPM's student-teacher pair (``models/distillation.py``, maps ``Omega1..Omega3``)
gets a second pair whose student, a decoder with attention maps, *reconstructs* a
different, larger teacher's levels from the first teacher's deepest feature (maps
``Omega6..Omega4``), and a discriminative network (DRAEM's U-Net), trained with the
focal loss on pseudo-anomalies, that reads both pairs' maps summed per scale; its
output is ``Omega7``. At test time ``Omega7`` multiplies STPM's map; the image score
is the maximum. By default the students train first on clean images (STPM's
recipe), then the discriminator with the students frozen (DRAEM's schedule).

Readings, open choices and ablations: docs/methods/rstpm.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .backbones import FeatureExtractor
from .base import AnomalyModule, AnomalyOutput, eval_mode
from .distillation import (
    StudentTeacherPair,
    check_student_optimizer,
    feature_matching_loss,
    fuse_maps,
    student_optimizer,
)
from .losses import focal_loss
from .registry import register_model
from .schedules import draem_lr_factor
from .scoring import max_score
from .unet import UNet, conv_bn_relu, draem_init, widths_from_base

FINAL_MAPS = ("auto", "product", "discriminator", "stpm", "pairs")
TRAINING = ("two-stage", "joint")


class AttentionMap(nn.Module):
    """Fig. 4's attention from a teacher feature: 3x3 conv -> BN -> ReLU -> 1x1 conv -> sigmoid (1 channel)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = conv_bn_relu(channels, channels)
        self.logit = nn.Conv2d(channels, 1, 1)

    def forward(self, teacher_feature: Tensor) -> Tensor:
        return torch.sigmoid(self.logit(self.body(teacher_feature)))


class DecoderStudent(nn.Module):
    """Student2: upsamples a deep feature through one stage per target level, coarsest first.

    ``target_channels`` are Teacher2's channels fine to coarse; ``forward`` returns
    the stage outputs in the same (fine-to-coarse) order as the teacher's features.
    """

    def __init__(self, in_channels: int, target_channels: Sequence[int], attention: bool = True) -> None:
        super().__init__()
        coarse_to_fine = list(target_channels)[::-1]
        inputs = [in_channels, *coarse_to_fine[:-1]]
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                conv_bn_relu(c_in, c_out),
                nn.Conv2d(c_out, c_out, 3, padding=1),
            )
            for c_in, c_out in zip(inputs, coarse_to_fine, strict=True)
        )
        self.attention = nn.ModuleList(AttentionMap(c) for c in coarse_to_fine) if attention else None

    def forward(self, deep: Tensor, teacher_features: Sequence[Tensor]) -> list[Tensor]:
        x, outputs = deep, []
        for index, (stage, target) in enumerate(zip(self.stages, teacher_features[::-1], strict=True)):
            x = stage(x)
            if x.shape[-2:] != target.shape[-2:]:  # strides that are not exactly 2x apart
                x = F.interpolate(x, size=target.shape[-2:], mode="bilinear", align_corners=False)
            if self.attention is not None:
                x = x * self.attention[index](target)
            outputs.append(x)
        return outputs[::-1]


@register_model("rstpm")
class RSTPM(AnomalyModule):
    needs_pseudo_anomalies = True
    # Two-stage training leaves one optimiser's networks out of each step's graph.
    ddp_strategy = "ddp_find_unused_parameters_true"
    paper_results = {"image_auroc": 0.987, "pixel_auroc": 0.985, "pro": 0.951}

    def __init__(
        self,
        teacher1: str = "resnet18",
        teacher2: str = "resnet50",
        layers: Sequence[int] = (1, 2, 3),
        weights1: str = "auto",
        weights2: str = "auto",
        weights1_sha256: str | None = None,
        weights2_sha256: str | None = None,
        second_pair: bool = True,
        attention: bool = True,
        discriminator: bool = True,
        final_map: str = "auto",
        training: str = "two-stage",
        student_epochs: int = 100,
        student_optimizer: str = "sgd",
        student_lr: float = 0.4,
        student_momentum: float = 0.9,
        student_weight_decay: float = 1e-4,
        disc_base_width: int = 64,
        disc_depth: int = 6,
        disc_lr: float = 1e-4,
        disc_lr_milestones: Sequence[float] = (0.8, 0.9),
        disc_lr_gamma: float = 0.2,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if final_map not in FINAL_MAPS:
            raise ValueError(f"final_map must be one of {FINAL_MAPS}, got {final_map!r}")
        if training not in TRAINING:
            raise ValueError(f"training must be one of {TRAINING}, got {training!r}")
        if not discriminator and final_map in ("product", "discriminator"):
            raise ValueError(f"final_map={final_map!r} needs the discriminator (discriminator=True)")
        if student_epochs < 0:
            raise ValueError(f"student_epochs must be >= 0, got {student_epochs}")
        check_student_optimizer(student_optimizer)
        self.save_hyperparameters()
        self.automatic_optimization = False  # one optimiser per stage
        self.final_map = ("product" if discriminator else "pairs") if final_map == "auto" else final_map

        deepest = (max(layers) + 1,) if second_pair else ()
        self.pair1 = StudentTeacherPair(teacher1, layers, weights1, extra_teacher_layers=deepest,
                                        weights_sha256=weights1_sha256)
        # The discriminator before pair 2, and the attention maps last: the arms that remove or change pair 2
        # or its attention leave the discriminator's and the students' initial weights as they are.
        self.discriminative: UNet | None = None
        if discriminator:
            widths = widths_from_base(disc_base_width, disc_depth)
            self.discriminative = UNet(len(self.pair1.layers), 1, widths, skip=True, layout="draem")
            self.discriminative.apply(draem_init)
        self.teacher2: FeatureExtractor | None = None
        self.student2: DecoderStudent | None = None
        if second_pair:
            self.teacher2 = FeatureExtractor(teacher2, layers, weights2, weights2_sha256, frozen=True)
            self.student2 = DecoderStudent(self.pair1.teacher.channels[-1], self.teacher2.channels, attention)

    # ------------------------------------------------------------------ maps

    def _students(self) -> list[nn.Module]:
        return [self.pair1.student] + ([self.student2] if self.student2 is not None else [])

    def _pair2_features(self, images: Tensor, deep: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Teacher2's levels (no gradient) and Student2's reconstruction of them from Teacher1's deepest."""
        with torch.no_grad():
            teacher = self.teacher2(images)
        return teacher, self.student2(deep[0], teacher)

    def level_maps(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``Omega1..Omega3`` (pair 1) and ``Omega6..Omega4`` (pair 2), both fine to coarse."""
        teacher1, deep = self.pair1.teacher_features(images)
        maps1 = StudentTeacherPair.level_maps(teacher1, self.pair1.student(images))
        if self.student2 is None:
            return maps1, []
        return maps1, StudentTeacherPair.level_maps(*self._pair2_features(images, deep))

    @staticmethod
    def scale_maps(maps1: Sequence[Tensor], maps2: Sequence[Tensor], size: torch.Size) -> Tensor:
        """The discriminator's input: per scale, pair 1's map plus pair 2's, at ``size`` -> (B, L, H, W)."""
        per_scale = [maps1] if not maps2 else [maps1, maps2]
        channels = [fuse_maps(list(same_scale), size, "sum") for same_scale in zip(*per_scale, strict=True)]
        return torch.cat(channels, dim=1)

    def forward(self, images: Tensor) -> AnomalyOutput:
        size = images.shape[-2:]
        maps1, maps2 = self.level_maps(images)
        if self.final_map == "stpm":
            final = fuse_maps(maps1, size, "product")
        elif self.final_map == "pairs":
            final = self.scale_maps(maps1, maps2, size).prod(dim=1, keepdim=True)
        else:
            discriminated = torch.sigmoid(self.discriminative(self.scale_maps(maps1, maps2, size)).float())
            final = discriminated if self.final_map == "discriminator" else fuse_maps(maps1, size) * discriminated
        return AnomalyOutput(final, max_score(final))

    # ------------------------------------------------------------------ training

    @property
    def stage(self) -> str:
        """``"students"``, ``"discriminator"`` or ``"joint"``: what the current epoch trains."""
        if self.hparams.training == "joint":
            return "joint"
        if self.discriminative is None or self.current_epoch < self.hparams.student_epochs:
            return "students"
        return "discriminator"

    @property
    def ready_for_selection(self) -> bool:
        """Validation ranks checkpoints only once the final map no longer has an untrained part."""
        return self.stage != "students" or self.final_map in ("stpm", "pairs")

    def student_losses(self, clean: Tensor) -> dict[str, Tensor]:
        """STPM's loss for each pair, on clean images."""
        teacher1, deep = self.pair1.teacher_features(clean)
        losses = {"stpm": feature_matching_loss(teacher1, self.pair1.student(clean))}
        if self.student2 is not None:
            losses["reconstruction"] = feature_matching_loss(*self._pair2_features(clean, deep))
        return losses

    def discriminator_loss(self, images: Tensor, mask: Tensor) -> Tensor:
        """Focal loss of the discriminator on the maps that eval-mode students give for ``images``."""
        with eval_mode(self._students()), torch.no_grad():
            scale_maps = self.scale_maps(*self.level_maps(images), images.shape[-2:])
        return focal_loss(self.discriminative(scale_maps), mask, gamma=self.hparams.focal_gamma)

    def on_fit_start(self) -> None:
        epochs = self.trainer.max_epochs
        staged = self.hparams.training == "two-stage" and self.discriminative is not None
        if staged and epochs is not None and 0 <= epochs <= self.hparams.student_epochs:
            rank_zero_warn(
                f"RSTPM trains its discriminator after student_epochs={self.hparams.student_epochs} epochs, "
                f"but trainer.max_epochs={epochs}: the discriminator stays untrained"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        stage, size = self.stage, len(batch["image"])
        total = None
        if stage in ("students", "joint"):
            losses = self.student_losses(batch["clean_image"])
            total = sum(losses.values())
            optimizers[0].zero_grad()
            self.manual_backward(total)
            optimizers[0].step()
            for name, value in losses.items():
                self.log(f"train/{name}", value, batch_size=size)
        if stage in ("discriminator", "joint") and self.discriminative is not None:
            disc = optimizers[1]
            for group in disc.param_groups:
                group["lr"] = self.hparams.disc_lr * self._disc_lr_factor(batch_idx)
            focal = self.discriminator_loss(batch["image"], batch["mask"])
            disc.zero_grad()
            self.manual_backward(focal)
            disc.step()
            self.log("train/focal", focal, batch_size=size)
            total = focal if total is None else total + focal
        self.log("train/loss", total, prog_bar=True, batch_size=size)
        return total

    def _disc_lr_factor(self, batch_idx: int) -> float:
        """DRAEM's step schedule over the discriminator's epochs (constant when their number is unknown)."""
        hp, trainer = self.hparams, self.trainer
        first = 0 if hp.training == "joint" else hp.student_epochs
        epochs, batches = trainer.max_epochs, trainer.num_training_batches
        if epochs is None or epochs <= first or not math.isfinite(batches) or batches < 1:
            return 1.0
        progress = (self.current_epoch - first + batch_idx / batches) / (epochs - first)
        return draem_lr_factor(progress, hp.disc_lr_milestones, hp.disc_lr_gamma)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        students = [p for s in self._students() for p in s.parameters()]
        optimizers = [
            student_optimizer(students, hp.student_optimizer, hp.student_lr, hp.student_momentum,
                              hp.student_weight_decay)
        ]  # fmt: skip
        if self.discriminative is not None:
            optimizers.append(torch.optim.Adam(self.discriminative.parameters(), lr=hp.disc_lr))
        return optimizers
