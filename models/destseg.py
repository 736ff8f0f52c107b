"""DeSTSeg: Segmentation Guided Denoising Student-Teacher.

Zhang, Li, Li, Huang, Shan, Chen. "DeSTSeg: Segmentation Guided Denoising
Student-Teacher for Anomaly Detection", CVPR 2023 (arXiv 2211.11317); official
code: github.com/apple/ml-destseg.

A frozen ImageNet teacher (ResNet-18, levels 1-3) and a *denoising* student: an
encoder of the teacher's architecture trained from scratch, one stage deeper,
and a decoder of residual blocks back up to the teacher's three levels. The
student is fed a synthetically corrupted image (DRAEM-style pseudo-anomaly) and
learns to output the teacher's features of the CLEAN image (per level
``1 - cos(t, s)``, mean over positions, summed over levels). A segmentation
network (residual blocks + ASPP) then reads, per level, the element-wise product
of the channel-normalised teacher and student features of the same image,
upsampled to the finest level and concatenated, and is trained on the synthetic
masks (focal + L1 loss) with the student frozen. At test time the anomaly map is
its sigmoid output upsampled to the input size; the image score is the mean of
the map's ``top_k`` largest values. Training is staged: the student first, then
the segmentation network.

Readings, open choices and ablations: docs/methods/destseg.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .backbones import FeatureExtractor
from .base import AnomalyModule, AnomalyOutput, eval_mode
from .distillation import check_student_optimizer, cosine_distance, fuse_maps, student_optimizer
from .losses import focal_loss
from .registry import register_model
from .scoring import top_k_mean_score
from .unet import conv_bn_relu

REDUCTIONS = ("sum", "mean")


class BasicBlock(nn.Module):
    """ResNet's basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, plus the input (projected by a 1x1 conv-BN
    when the width changes), then ReLU unless ``final_relu=False`` (a signed output)."""

    def __init__(self, in_channels: int, out_channels: int, final_relu: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(in_channels, out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                          nn.BatchNorm2d(out_channels))  # fmt: skip
        self.final_relu = final_relu

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x) + self.shortcut(x)
        return F.relu(out) if self.final_relu else out


def residual_stage(in_channels: int, out_channels: int, blocks: int = 2, final_relu: bool = True) -> nn.Sequential:
    """``blocks`` basic blocks, the first changing the width; only the last one's ReLU is optional."""
    return nn.Sequential(*(
        BasicBlock(in_channels if i == 0 else out_channels, out_channels, final_relu or i < blocks - 1)
        for i in range(blocks)
    ))  # fmt: skip


def kaiming_init(module: nn.Module) -> None:
    """The official code's initialisation of the decoder and the segmentation network's residual blocks
    (``module.apply``): convolutions ~ Kaiming normal (fan out, ReLU), BatchNorm scale 1, bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class DenoisingStudent(nn.Module):
    """Encoder (the teacher's architecture, from scratch, down to the stage after the teacher's deepest
    level) and a decoder that climbs back: a residual stage at the deepest feature, then per teacher level,
    coarse to fine, bilinear resizing to the level's size and a residual stage to the level's width.
    ``forward`` returns the decoder's outputs fine to coarse, shaped as the teacher's levels.
    ``decoder=False`` (the official code's ``ed=False``): the encoder's own levels, STPM's student."""

    def __init__(self, teacher: FeatureExtractor, decoder: bool = True, output_relu: bool = True,
                 blocks: int = 2) -> None:  # fmt: skip
        super().__init__()
        deeper = (max(teacher.layers) + 1,) if decoder else ()
        self.encoder = FeatureExtractor.random_like(teacher, layers=(*teacher.layers, *deeper))
        self.bottleneck: nn.Module | None = None
        self.stages: nn.ModuleList | None = None
        if decoder:
            deepest = self.encoder.channels[-1]
            coarse_to_fine = list(teacher.channels)[::-1]
            self.bottleneck = residual_stage(deepest, deepest, blocks)
            self.stages = nn.ModuleList(
                residual_stage(c_in, c_out, blocks, final_relu=output_relu)
                for c_in, c_out in zip([deepest, *coarse_to_fine[:-1]], coarse_to_fine, strict=True)
            )
            self.bottleneck.apply(kaiming_init)
            self.stages.apply(kaiming_init)

    def forward(self, images: Tensor) -> list[Tensor]:
        features = self.encoder(images)
        if self.stages is None:
            return features
        x, outputs = self.bottleneck(features[-1]), []
        for stage, level in zip(self.stages, features[-2::-1], strict=True):
            x = stage(F.interpolate(x, size=level.shape[-2:], mode="bilinear", align_corners=False))
            outputs.append(x)
        return outputs[::-1]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v3) at constant width: a global-average branch (1x1
    conv-BN-ReLU, broadcast back) and one dilated 3x3 conv-BN-ReLU per rate, fused by a 3x3 conv-BN-ReLU."""

    def __init__(self, channels: int, rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        self.pooled = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                    nn.ReLU(inplace=True))  # fmt: skip
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=r, dilation=r, bias=False),
                          nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
            for r in rates
        )  # fmt: skip
        self.fuse = conv_bn_relu((1 + len(rates)) * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pooled(x.mean(dim=(2, 3), keepdim=True)).expand_as(x)  # a 1x1 map upsampled is constant
        return self.fuse([pooled, *(branch(x) for branch in self.branches)])  # no concatenated copy


class SegmentationNet(nn.Module):
    """Residual blocks to ``width`` channels (``res``), then ASPP, a 3x3 conv-BN-ReLU and a 1x1 conv to one
    logit per position (``head``: the official code's second learning-rate group)."""

    def __init__(self, in_channels: int, width: int = 256, blocks: int = 2,
                 rates: Sequence[int] = (6, 12, 18)) -> None:  # fmt: skip
        super().__init__()
        self.res = residual_stage(in_channels, width, blocks)
        self.res.apply(kaiming_init)
        self.head = nn.Sequential(ASPP(width, rates), conv_bn_relu(width, width), nn.Conv2d(width, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.res(x))


@register_model("destseg")
class DeSTSeg(AnomalyModule):
    needs_pseudo_anomalies = True
    # Staged training leaves one optimiser's networks out of each step's graph.
    ddp_strategy = "ddp_find_unused_parameters_true"
    paper_results = {"image_auroc": 0.986}

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[int] = (1, 2, 3),
        weights: str = "auto",
        weights_sha256: str | None = None,
        denoising: bool = True,
        segmentation: bool = True,
        encoder_decoder: bool = True,
        student_output_relu: bool | None = None,
        decoder_blocks: int = 2,
        student_epochs: int | None = None,
        student_steps: int | None = 1000,
        student_optimizer: str = "sgd",
        student_lr: float = 0.4,
        student_momentum: float = 0.9,
        student_weight_decay: float = 1e-4,
        student_loss_reduction: str = "sum",
        seg_width: int = 256,
        seg_blocks: int = 2,
        aspp_rates: Sequence[int] = (6, 12, 18),
        seg_optimizer: str = "sgd",
        seg_lr: float = 0.1,
        seg_head_lr: float = 0.01,
        seg_momentum: float = 0.9,
        seg_weight_decay: float = 1e-4,
        focal_gamma: float = 4.0,
        top_k: int = 100,
    ) -> None:
        super().__init__()
        if (student_epochs is None) == (student_steps is None):
            raise ValueError("set exactly one of student_epochs and student_steps (the other to null), got "
                             f"student_epochs={student_epochs}, student_steps={student_steps}")
        if (student_epochs or 0) < 0 or (student_steps or 0) < 0:
            raise ValueError(f"the student stage's length must be >= 0, got {student_epochs or student_steps}")
        if student_loss_reduction not in REDUCTIONS:
            raise ValueError(f"student_loss_reduction must be one of {REDUCTIONS}, got {student_loss_reduction!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        check_student_optimizer(student_optimizer)
        check_student_optimizer(seg_optimizer)
        self.save_hyperparameters()
        self.automatic_optimization = False  # one optimiser per stage

        self.teacher = FeatureExtractor(backbone, layers, weights, weights_sha256, frozen=True)
        if student_output_relu is None:  # ResNet levels are post-ReLU; EfficientNet-Lite's are signed
            student_output_relu = backbone.startswith(("resnet", "wide_resnet"))
        self.student = DenoisingStudent(self.teacher, encoder_decoder, student_output_relu, decoder_blocks)
        self.segmentation_net: SegmentationNet | None = None
        if segmentation:
            self.segmentation_net = SegmentationNet(sum(self.teacher.channels), seg_width, seg_blocks, aspp_rates)

    # ------------------------------------------------------------------ maps

    def features(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Teacher (no gradient) and student features of the same images, fine to coarse."""
        with torch.no_grad():
            teacher = self.teacher(images)
        return teacher, self.student(images)

    @staticmethod
    def segmentation_input(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
        """Per level ``-(t/|t|) * (s/|s|)`` (channel-normalised, element-wise), upsampled to the finest
        level and concatenated -> (B, sum of widths, h_1, w_1). The sign is the official code's."""
        size = teacher[0].shape[-2:]
        products = [
            F.interpolate(-F.normalize(t.float(), dim=1) * F.normalize(s.float(), dim=1), size=size,
                          mode="bilinear", align_corners=False)
            for t, s in zip(teacher, student, strict=True)
        ]  # fmt: skip
        return torch.cat(products, dim=1)

    def forward(self, images: Tensor) -> AnomalyOutput:
        size = images.shape[-2:]
        teacher, student = self.features(images)
        if self.segmentation_net is None:  # the ablation: DeST's own map
            anomaly_map = fuse_maps([cosine_distance(t, s) for t, s in zip(teacher, student, strict=True)], size)
        else:
            logits = self.segmentation_net(self.segmentation_input(teacher, student))
            anomaly_map = F.interpolate(torch.sigmoid(logits.float()), size=size, mode="bilinear",
                                        align_corners=False)  # fmt: skip
        return AnomalyOutput(anomaly_map, top_k_mean_score(anomaly_map, self.hparams.top_k))

    # ------------------------------------------------------------------ training

    @property
    def stage(self) -> str:
        """``"student"`` or ``"segmentation"``: what the current batch trains."""
        hp = self.hparams
        if self.segmentation_net is None:
            return "student"
        if hp.student_steps is not None:
            return "student" if self.global_step < hp.student_steps else "segmentation"
        return "student" if self.current_epoch < hp.student_epochs else "segmentation"

    @property
    def ready_for_selection(self) -> bool:
        """Validation ranks checkpoints only once the map no longer comes from an untrained network."""
        return self.stage != "student" or self.segmentation_net is None

    def student_loss(self, inputs: Tensor, clean: Tensor) -> Tensor:
        """The student on ``inputs`` against the teacher on ``clean``: per level ``1 - cos``, mean over
        positions (and images), summed over levels."""
        with torch.no_grad():
            teacher = self.teacher(clean)
        return sum(cosine_distance(t, s).mean() for t, s in zip(teacher, self.student(inputs), strict=True))

    def segmentation_logits(self, images: Tensor) -> Tensor:
        """The segmentation network's logits (B, 1, h_1, w_1), the student frozen (eval mode, no gradient)."""
        with eval_mode([self.student]), torch.no_grad():
            seg_input = self.segmentation_input(*self.features(images))
        return self.segmentation_net(seg_input)

    def segmentation_losses(self, images: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Focal and L1 losses of the segmentation output against ``mask`` resized to its size (bilinear,
        then binarised at 0.5)."""
        logits = self.segmentation_logits(images).float()
        target = F.interpolate(mask.float(), size=logits.shape[-2:], mode="bilinear", align_corners=False)
        target = (target >= 0.5).float()
        return {"focal": focal_loss(logits, target, gamma=self.hparams.focal_gamma),
                "l1": F.l1_loss(torch.sigmoid(logits), target)}  # fmt: skip

    def on_fit_start(self) -> None:
        hp, trainer = self.hparams, self.trainer
        if self.segmentation_net is None:
            return
        epochs_short = hp.student_epochs is not None and 0 <= (trainer.max_epochs or -1) <= hp.student_epochs
        steps_short = hp.student_steps is not None and 0 <= trainer.max_steps <= hp.student_steps
        if epochs_short or steps_short:
            stage = f"student_epochs={hp.student_epochs}" if epochs_short else f"student_steps={hp.student_steps}"
            limit = f"max_epochs={trainer.max_epochs}" if epochs_short else f"max_steps={trainer.max_steps}"
            rank_zero_warn(f"DeSTSeg trains its segmentation network after {stage}, but trainer.{limit}: "
                           "the segmentation network stays untrained")  # fmt: skip

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        size = len(batch["image"])
        if self.stage == "student":
            inputs = batch["image"] if self.hparams.denoising else batch["clean_image"]
            cosine = self.student_loss(inputs, batch["clean_image"])
            # "sum": summed over the batch, as the official code's loss (its SGD lr 0.4 is tuned to that scale).
            loss = cosine * size if self.hparams.student_loss_reduction == "sum" else cosine
            optimizer, logged = optimizers[0], {"cosine": cosine}
        else:
            logged = self.segmentation_losses(batch["image"], batch["mask"])
            optimizer, loss = optimizers[1], logged["focal"] + logged["l1"]
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        for name, value in logged.items():
            self.log(f"train/{name}", value, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        optimizers = [student_optimizer(self.student.parameters(), hp.student_optimizer, hp.student_lr,
                                        hp.student_momentum, hp.student_weight_decay)]  # fmt: skip
        if self.segmentation_net is not None:
            groups = [{"params": self.segmentation_net.res.parameters(), "lr": hp.seg_lr},
                      {"params": self.segmentation_net.head.parameters(), "lr": hp.seg_head_lr}]  # fmt: skip
            optimizers.append(student_optimizer(groups, hp.seg_optimizer, hp.seg_lr, hp.seg_momentum,
                                                hp.seg_weight_decay))  # fmt: skip
        return optimizers
