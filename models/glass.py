"""GLASS and SimpleNet: a feature adaptor and a patch discriminator trained on synthetic anomalies.

Chen, Luo, Lv, Zhang, Zhong, Huang, Zhou. "A Unified Anomaly Synthesis Strategy with
Gradient Ascent for Industrial Anomaly Detection and Localization", ECCV 2024 (arXiv 2407.09359).
Liu, Zhang, Li, Ding, Wu, Zheng. "SimpleNet: A Simple Network for Image Anomaly Detection and
Localization", CVPR 2023 (arXiv 2303.15140).

A frozen ImageNet CNN gives locally aware patch features (PatchCore's embedding); a
linear adaptor maps them to a space where a small MLP discriminator tells normal patches
(label 0) from synthetic anomalous ones (label 1). GLASS synthesises anomalies twice:
*globally* in feature space (Gaussian noise on the adapted normal features, pushed by a
few gradient-ascent steps towards what the discriminator calls normal, its displacement
kept within a shell by a truncated projection) and *locally* in image space (DTD textures
under Perlin masks from the DataModule, labelled at the masked patches, focal loss on the
hardest half). SimpleNet is the same network with Gaussian feature noise only: here it is
``GLASS(gradient_ascent=False, local_synthesis=False)``, registered as ``simplenet``. At
test time the discriminator's probability per patch, upsampled and Gaussian-smoothed
(sigma 4), is the map; its largest patch probability is the image score.

Readings, open choices and ablations: docs/methods/glass.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import FeatureExtractor
from .base import AnomalyModule, AnomalyOutput
from .losses import focal_loss, gaussian_blur
from .patch_features import locally_aware_patches
from .registry import register_model
from .scoring import max_score


def _xavier(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)


class Discriminator(nn.Sequential):
    """``layers - 1`` blocks of Linear -> BatchNorm -> LeakyReLU(0.2), then one logit per feature."""

    def __init__(self, dim: int, layers: int = 2, hidden: int = 1024) -> None:
        blocks: list[nn.Module] = []
        for index in range(layers - 1):
            blocks += [nn.Linear(dim if index == 0 else hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2)]
        blocks.append(nn.Linear(hidden if layers > 1 else dim, 1, bias=False))
        super().__init__(*blocks)
        self.apply(_xavier)


@register_model("glass")
class GLASS(AnomalyModule):
    needs_pseudo_anomalies = True
    paper_results = {"image_auroc": 0.999, "pixel_auroc": 0.993}

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] = (2, 3),
        weights: str = "auto",
        weights_sha256: str | None = None,
        pretrain_embed_dimension: int = 1536,
        target_embed_dimension: int = 1536,
        discriminator_layers: int = 2,
        discriminator_hidden: int = 1024,
        global_synthesis: bool = True,
        gradient_ascent: bool = True,
        local_synthesis: bool = True,
        noise_std: float = 0.015,
        ascent_steps: int = 20,
        ascent_step_size: float = 0.001,
        projection_every: int = 5,
        projection_radius: float = 0.5,
        mining_fraction: float = 0.5,
        focal_gamma: float = 2.0,
        mask_threshold: float = 0.5,
        adaptor_lr: float = 1e-4,
        adaptor_weight_decay: float = 1e-5,
        discriminator_lr: float = 2e-4,
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        if not (global_synthesis or local_synthesis):
            raise ValueError("GLASS needs an anomaly synthesis: global_synthesis, local_synthesis or both")
        if gradient_ascent and not global_synthesis:
            raise ValueError("gradient_ascent moves the global (feature-space) anomalies: it needs global_synthesis")
        if discriminator_layers < 1 or ascent_steps < 0 or projection_every < 1:
            raise ValueError("discriminator_layers and projection_every must be >= 1, ascent_steps >= 0")
        if not 0.0 <= mining_fraction < 1.0:
            raise ValueError(f"mining_fraction must be in [0, 1), got {mining_fraction}")
        self.save_hyperparameters()
        self.automatic_optimization = False  # two optimisers (adaptor, discriminator) stepped together
        self.backbone = FeatureExtractor(backbone, layers, weights, weights_sha256, frozen=True)
        self.adaptor = nn.Linear(target_embed_dimension, target_embed_dimension)
        self.adaptor.apply(_xavier)
        self.discriminator = Discriminator(target_embed_dimension, discriminator_layers, discriminator_hidden)

    # ------------------------------------------------------------------ features and map

    def patch_features(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Adapted patch features (B * h * w, D) and their grid (h, w)."""
        hp = self.hparams
        with torch.no_grad():
            features, grid = locally_aware_patches(self.backbone(images), hp.pretrain_embed_dimension,
                                                   hp.target_embed_dimension)
        return self.adaptor(features.flatten(0, 1)), grid

    def forward(self, images: Tensor) -> AnomalyOutput:
        features, (h, w) = self.patch_features(images)
        patch_scores = torch.sigmoid(self.discriminator(features).float()).view(len(images), 1, h, w)
        anomaly_map = F.interpolate(patch_scores, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return AnomalyOutput(gaussian_blur(anomaly_map, self.hparams.sigma), max_score(patch_scores))

    # ------------------------------------------------------------------ synthesis

    def logits(self, features: Tensor) -> Tensor:
        """The discriminator's logit per feature, (N,), in float32."""
        return self.discriminator(features).float().flatten()

    def global_anomalies(self, normal: Tensor) -> Tensor:
        """GAS: ``normal`` + Gaussian noise, moved by gradient ascent on the discriminator's loss
        (towards what it calls normal) with the displacement's norm kept in ``[r, 2r]``."""
        hp = self.hparams
        offset = torch.randn(normal.shape, device=normal.device) * hp.noise_std
        if hp.gradient_ascent:
            anchor = normal.detach()
            for step in range(hp.ascent_steps):
                moved = (anchor + offset).requires_grad_(True)
                # Normal and moved features in one batch, as in training (BatchNorm sees both).
                scores = self.logits(torch.cat([anchor, moved]))[len(anchor):]
                loss = F.binary_cross_entropy_with_logits(scores, torch.ones_like(scores))
                (grad,) = torch.autograd.grad(loss, moved)
                offset = offset + hp.ascent_step_size * F.normalize(grad.float(), dim=1)
                if (step + 1) % hp.projection_every == 0:  # truncated projection onto the shell r <= |offset| <= 2r
                    norm = offset.norm(dim=1, keepdim=True)
                    r = hp.projection_radius
                    offset = offset * (norm.clamp(r, 2 * r) / (norm + 1e-10))
        return normal + offset.to(normal.dtype)

    def local_targets(self, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        """LAS labels per patch: 1 where at least ``mask_threshold`` of the patch's pixels are masked."""
        return (F.adaptive_avg_pool2d(mask.float(), grid) >= self.hparams.mask_threshold).float().flatten()

    # ------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        hp = self.hparams
        adaptor_optimizer, discriminator_optimizer = self.optimizers()
        clean = batch.get("clean_image", batch["image"])
        normal, grid = self.patch_features(clean)
        losses = {}
        if hp.global_synthesis:
            scores = self.logits(torch.cat([normal, self.global_anomalies(normal)]))
            labels = torch.cat([torch.zeros(len(normal)), torch.ones(len(normal))]).to(scores.device)
            losses["normal"] = F.binary_cross_entropy_with_logits(scores[: len(normal)], labels[: len(normal)])
            losses["global"] = F.binary_cross_entropy_with_logits(scores[len(normal):], labels[len(normal):])
        else:
            scores = self.logits(normal)
            losses["normal"] = F.binary_cross_entropy_with_logits(scores, torch.zeros_like(scores))
        if hp.local_synthesis:
            local, _ = self.patch_features(batch["image"])
            targets = self.local_targets(batch["mask"], grid)
            logits = self.logits(local)
            if hp.mining_fraction > 0:  # the hardest patches: largest squared error of the probability
                error = (torch.sigmoid(logits) - targets).pow(2).detach()
                hard = error >= torch.quantile(error, hp.mining_fraction)
                logits, targets = logits[hard], targets[hard]
            losses["local"] = focal_loss(logits, targets, gamma=hp.focal_gamma)
        total = sum(losses.values())
        adaptor_optimizer.zero_grad()
        discriminator_optimizer.zero_grad()
        self.manual_backward(total)
        adaptor_optimizer.step()
        discriminator_optimizer.step()
        size = len(clean)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=size)
        self.log("train/loss", total, prog_bar=True, batch_size=size)
        return total

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        return [
            torch.optim.Adam(self.adaptor.parameters(), lr=hp.adaptor_lr, weight_decay=hp.adaptor_weight_decay),
            torch.optim.AdamW(self.discriminator.parameters(), lr=hp.discriminator_lr),
        ]


@register_model("simplenet")
class SimpleNet(GLASS):
    """SimpleNet: GLASS with Gaussian feature noise as its only synthesis (see the module docstring)."""

    needs_pseudo_anomalies = False
    paper_results = {"image_auroc": 0.996, "pixel_auroc": 0.981}

    def __init__(self, gradient_ascent: bool = False, local_synthesis: bool = False, **kwargs: Any) -> None:
        if local_synthesis:  # its batches carry no synthetic images (needs_pseudo_anomalies is False)
            raise ValueError("simplenet has no local synthesis; use the glass method for it")
        super().__init__(gradient_ascent=gradient_ascent, local_synthesis=local_synthesis, **kwargs)
