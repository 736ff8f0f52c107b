"""RSTPM: Reconstructed Student-Teacher and Discriminative Networks.

Yamada, Kamiya, Hotta. "Reconstructed Student-Teacher and Discriminative
Networks for Anomaly Detection", IROS 2022 (arXiv 2210.07548).

STPM (``models/stpm.py``) extended by a second student that reconstructs normal
features and by a discriminative network trained on pseudo-anomalies. One frozen
ImageNet teacher ``T`` (the paper's two teachers are the same pretrained network,
so one instance serves both pairs) and, on DRAEM-style training batches (``image``
= ``clean_image`` with a synthetic anomaly in about half the samples, ``mask``):

* Pair 1, the STPM student ``S1``: sees the clean image and matches the teacher's
  feature pyramid (levels 1-3), STPM's loss
  ``sum_l mean_hw 0.5 * || T_l(clean)/|.| - S1_l(clean)/|.| ||^2``.
* Pair 2, the reconstruction student ``S2``: sees the pseudo-anomalous image and
  must output the teacher's features of the CLEAN image (it reconstructs normal
  features, "as in generative models"): the same loss with ``S2_l(image)`` against
  ``T_l(clean)``.
* Per-pair anomaly map of an input ``x``: STPM's per-level discrepancy
  ``0.5 * || T_l(x)/|.| - S_l(x)/|.| ||^2`` upsampled to the input size and fused
  over levels. For pair 2 this is the distance between the input's features and
  the student's reconstruction of their normal version.
* Discriminative network: a U-Net with skip connections (DRAEM's discriminative
  sub-network, ``models/unet.py``) on the channel concatenation
  ``[image, map_pair1, map_pair2]`` predicts the anomaly mask; focal loss
  (gamma 2) against ``mask``. Its per-pixel probability is the final anomaly map,
  and the image score is the maximum of that map average-pooled over 21 x 21
  windows (DRAEM's score, :func:`models.draem.pooled_max_score`).
* Total loss: ``L_pair1 + L_pair2 + L_focal``, one step per batch.

Ablations (constructor switches, selectable from YAML):

* ``reconstruction_pair=False``: no ``S2``; the discriminator sees ``[image, map_pair1]``.
* ``discriminator=False``: no U-Net; the final map is STPM's map (product over
  levels) of each pair, summed over the pairs, and the image score is its
  maximum (STPM's). With both switches off the model is STPM.

What the paper states (abstract; the full text could not be retrieved here):
STPM "does not have the ability to generate normal images", so a student is used
"as in generative models, to reconstruct normal features"; the anomaly maps of
normal images "are not clean because STPM does not use anomaly images for
training, which decreases the accuracy of the image-level anomaly detection", so
"a discriminative network trained with pseudo-anomalies from anomaly maps" is
added; the method "consists of two pairs of student-teacher networks and a
discriminative network". Its input also holds the image, and the pairs use STPM's
levels 1-3 (``../shared/docs/methods.md``). MVTec AD means: image AUROC 98.7,
pixel AUROC 98.5, PRO 95.1.

Choices the paper leaves open, or that we could not read in it (constructor
arguments):

* Training schedule: JOINT, every network from the first step, like DRAEM's
  reconstructive and discriminative networks. The maps given to the
  discriminator are detached: the focal loss never trains the students, so pair 1
  stays a plain STPM student that has seen no anomaly (the abstract's premise) and
  pair 2 learns only to reconstruct. Joint training also keeps every parameter
  in every step's graph, which DDP requires.
* The discriminator's maps are computed with the students in eval mode (as at
  test time) and without gradients, so the discriminator learns on exactly the
  kind of map it will be given at inference, and anomalous images do not move
  the BatchNorm statistics of pair 1's student.
* ``disc_map_form`` (default ``"geometric"``): how a pair's per-level maps become
  the discriminator's input channel. ``"geometric"`` is the geometric mean over
  levels, i.e. STPM's product map raised to ``1/L``: the same ranking as the
  product but on the per-level scale (about 0..1), so the map channels are on the
  image's scale at the U-Net's first convolution (the raw product is ~1e-3).
  ``"product"`` feeds STPM's map unchanged, ``"levels"`` every level's map (L
  channels per pair).
* ``discriminator=False`` with both pairs: the two pairs' STPM maps are summed
  (``pair_fusion``; ``"product"`` is offered).
* Discriminator size: DRAEM's (base width 64, 6 stages, skips); one logit per
  pixel with a sigmoid, no class weighting (:func:`models.losses.focal_loss`);
  PyTorch's default initialisation (DRAEM's N(0, 0.02) is a detail of its code).
* Image score: DRAEM's pooled maximum, as the discriminator is DRAEM's; with
  ``discriminator=False``, STPM's plain maximum.
* Optimiser: one Adam over all networks with per-network learning rates
  (students ``student_lr``, discriminator ``disc_lr`` = DRAEM's 1e-4), lr x0.2
  at 80 % and 90 % of the optimiser steps (DRAEM's schedule). STPM trains its
  student with SGD lr 0.4 and DRAEM uses Adam; two optimisers would need manual
  optimisation, where Lightning counts every optimiser's step in ``global_step``
  (``max_steps`` and the milestones would change meaning), and SGD at lr 0.4
  diverges for depthwise-separable students (see ``models/stpm.py``). Adam at
  1e-3 for the students is the STPM quick profile's setting.
* Backbone: the paper's ResNet-18 (STPM's) needs hub weights; offline machines
  use ``tf_efficientnet_lite0`` (strides 4, 8, 16 like ResNet's levels 1-3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .backbones import FeatureExtractor
from .base import AnomalyModule, AnomalyOutput
from .draem import pooled_max_score
from .losses import feature_matching_loss, focal_loss, fuse_maps, normalized_l2_distance
from .registry import register_model
from .unet import UNet, widths_from_base

_MAP_FORMS = ("geometric", "product", "levels")


@register_model("rstpm")
class RSTPM(AnomalyModule):
    needs_pseudo_anomalies = True
    paper_results = {"image_auroc": 0.987, "pixel_auroc": 0.985, "pro": 0.951}

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[int] = (1, 2, 3),
        weights: str = "auto",
        reconstruction_pair: bool = True,
        discriminator: bool = True,
        disc_base_width: int = 64,
        disc_depth: int = 6,
        disc_map_form: str = "geometric",
        pair_fusion: str = "sum",
        student_lr: float = 1e-3,
        disc_lr: float = 1e-4,
        weight_decay: float = 0.0,
        lr_milestones: Sequence[float] = (0.8, 0.9),
        lr_gamma: float = 0.2,
        focal_gamma: float = 2.0,
        pool_size: int = 21,
    ) -> None:
        super().__init__()
        if disc_map_form not in _MAP_FORMS:
            raise ValueError(f"disc_map_form must be one of {_MAP_FORMS}, got {disc_map_form!r}")
        if pair_fusion not in ("sum", "product"):
            raise ValueError(f"pair_fusion must be 'sum' or 'product', got {pair_fusion!r}")
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be a positive odd number (same-size pooling), got {pool_size}")
        self.save_hyperparameters()
        self.teacher = FeatureExtractor(backbone, layers, weights, frozen=True)
        self.student = FeatureExtractor.random_like(self.teacher)  # pair 1: STPM
        self.recon_student = FeatureExtractor.random_like(self.teacher) if reconstruction_pair else None
        self.discriminative: nn.Module | None = None
        if discriminator:
            n_pairs = 2 if reconstruction_pair else 1
            per_pair = len(self.teacher.layers) if disc_map_form == "levels" else 1
            in_channels = 3 + n_pairs * per_pair  # [image, maps of pair 1, maps of pair 2]
            widths = widths_from_base(disc_base_width, disc_depth)
            self.discriminative = UNet(in_channels, 1, widths, skip=True)

    # ------------------------------------------------------------------ maps

    def _students(self) -> list[FeatureExtractor]:
        return [self.student] if self.recon_student is None else [self.student, self.recon_student]

    def _level_maps(self, images: Tensor) -> list[list[Tensor]]:
        """Per pair, STPM's per-level discrepancy maps (B, 1, h_l, w_l) between T(images) and S(images)."""
        with torch.no_grad():
            teacher = self.teacher(images)
        return [
            [normalized_l2_distance(t, s) for t, s in zip(teacher, student(images), strict=True)]
            for student in self._students()
        ]

    def _disc_input(self, images: Tensor, level_maps: list[list[Tensor]]) -> Tensor:
        """``[image, map(s) of pair 1, map(s) of pair 2]`` at input resolution, without gradient."""
        size = images.shape[-2:]
        form = self.hparams.disc_map_form
        channels = [images.float()]
        for maps in level_maps:
            maps = [m.detach() for m in maps]
            if form == "levels":
                channels += [fuse_maps([m], size, "sum") for m in maps]
            else:
                product = fuse_maps(maps, size, "product")
                channels.append(product.pow(1.0 / len(maps)) if form == "geometric" else product)
        return torch.cat(channels, dim=1)

    def forward(self, images: Tensor) -> AnomalyOutput:
        level_maps = self._level_maps(images)
        if self.discriminative is None:
            pair_maps = [fuse_maps(maps, images.shape[-2:], "product") for maps in level_maps]
            anomaly_map = fuse_maps(pair_maps, images.shape[-2:], self.hparams.pair_fusion)
            return AnomalyOutput(anomaly_map, anomaly_map.flatten(1).amax(dim=1))
        logits = self.discriminative(self._disc_input(images, level_maps))
        anomaly_map = torch.sigmoid(logits.float())
        return AnomalyOutput(anomaly_map, pooled_max_score(anomaly_map, self.hparams.pool_size))

    # ------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image, clean = batch["image"], batch["clean_image"]
        batch_size = len(image)
        with torch.no_grad():
            teacher_clean = self.teacher(clean)
        # Pair 1 (STPM): clean image in, the teacher's features of the clean image out.
        loss_stpm = feature_matching_loss(teacher_clean, self.student(clean))
        loss = loss_stpm
        self.log("train/stpm", loss_stpm, batch_size=batch_size)
        if self.recon_student is not None:
            # Pair 2: pseudo-anomalous image in, the teacher's features of the CLEAN image out.
            loss_recon = feature_matching_loss(teacher_clean, self.recon_student(image))
            loss = loss + loss_recon
            self.log("train/reconstruction", loss_recon, batch_size=batch_size)
        if self.discriminative is not None:
            # The maps the discriminator learns from are the students' inference-time maps
            # (eval mode, no gradient: the focal loss does not train the students).
            students = self._students()
            modes = [s.training for s in students]
            for s in students:
                s.eval()
            with torch.no_grad():
                disc_input = self._disc_input(image, self._level_maps(image))
            for s, mode in zip(students, modes, strict=True):
                s.train(mode)
            logits = self.discriminative(disc_input)
            loss_focal = focal_loss(logits, batch["mask"], gamma=self.hparams.focal_gamma)
            loss = loss + loss_focal
            self.log("train/focal", loss_focal, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        students = [p for s in self._students() for p in s.parameters()]
        groups: list[dict[str, Any]] = [
            {"params": students, "lr": hp.student_lr, "weight_decay": hp.weight_decay}
        ]
        if self.discriminative is not None:
            disc = list(self.discriminative.parameters())
            groups.append({"params": disc, "lr": hp.disc_lr, "weight_decay": 0.0})
        optimizer = torch.optim.Adam(groups)
        total = self.trainer.estimated_stepping_batches
        if not 0 < total < float("inf") or not hp.lr_milestones:
            return {"optimizer": optimizer}  # time-bounded run: no known end, constant lr
        milestones = sorted({max(1, int(round(total * fraction))) for fraction in hp.lr_milestones})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
