"""POUTA: Produce Once, Utilize Twice for anomaly detection.

Wang, Li, Luo, Lv, Zhang. "Produce Once, Utilize Twice for Anomaly Detection",
IEEE TCSVT 2024 (arXiv 2312.12913).

A DRAEM-like pair of networks trained jointly on normal images carrying synthetic
anomalies, with one difference that gives the method its name: the discriminative
network has NO encoder of its own. The features the reconstructive network (DRAEM's
widths and no skips, but the suite's "symmetric" decoder layout of ``models/unet.py``,
not DRAEM's narrower reference layout: decoder stage ``D_i`` has encoder stage ``E_i``'s
shape; loss ``L2 + (1 - SSIM)``) produces once are used twice: at each level ``E_i``
(standing for the input) and ``D_i`` (standing for the reconstruction) are compared by a feature comparison module
(FCM); coarse to fine, each level is calibrated by the next coarser one (HSG); every
level predicts a map supervised by the mask, and a multi-scale fusion (MSS) gives
the final map. Loss: reconstruction + focal on the final map + weighted focal on
the level maps. Anomaly map ``sigmoid(M_p)``; image score: DRAEM's pooled maximum.

Readings, open choices and ablations: docs/methods/pouta.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AnomalyModule, AnomalyOutput
from .losses import focal_loss, reconstruction_loss
from .registry import register_model
from .schedules import draem_schedule
from .scoring import pooled_max_score
from .unet import BackboneEncoder, Encoder, UNet, conv_bn_relu, draem_init, widths_from_base


class FeatureComparison(nn.Module):
    """FCM: one level's discrepancy features from the encoder and decoder features."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce = conv_bn_relu(in_channels, out_channels, kernel_size=1)
        self.refine = conv_bn_relu(out_channels, out_channels)

    def forward(self, features: Tensor) -> Tensor:
        return self.refine(self.reduce(features))


class HighLevelGuidance(nn.Module):
    """HSG: calibrate a level's features by the (upsampled) next coarser representation."""

    def __init__(self, high_channels: int, channels: int) -> None:
        super().__init__()
        self.lift = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_bn_relu(high_channels, channels),
        )
        self.spatial = nn.Conv2d(channels, 1, 1)
        self.channel = nn.Conv2d(channels, channels, 1)

    def forward(self, features: Tensor, high: Tensor) -> Tensor:
        guidance = self.lift(high)
        if guidance.shape[-2:] != features.shape[-2:]:  # odd sizes: align to the finer level
            guidance = F.interpolate(guidance, size=features.shape[-2:], mode="bilinear", align_corners=False)
        spatial_weight = torch.sigmoid(self.spatial(guidance))  # (B, 1, h, w)
        channel_weight = torch.sigmoid(self.channel(guidance.mean(dim=(2, 3), keepdim=True)))  # (B, c, 1, 1)
        return features * spatial_weight * channel_weight + guidance


class MultiScaleFusion(nn.Module):
    """MSS output: fuse the finest representation with every level's map into the final map."""

    def __init__(self, channels: int, levels: int) -> None:
        super().__init__()
        self.fuse = nn.Sequential(conv_bn_relu(channels + levels, channels), nn.Conv2d(channels, 1, 1))

    def forward(self, finest: Tensor, level_logits: Sequence[Tensor]) -> Tensor:
        size = finest.shape[-2:]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in level_logits]  # fmt: skip
        return self.fuse(torch.cat([finest, *maps], dim=1))


@register_model("pouta")
class POUTA(AnomalyModule):
    needs_pseudo_anomalies = True
    paper_results = {"image_auroc": 0.995, "pixel_auroc": 0.988}

    def __init__(
        self,
        recon_base_width: int = 128,
        recon_depth: int = 5,
        disc_base_width: int = 64,
        disc_input: str = "features",
        calibration: bool = True,
        level_supervision: bool = True,
        fusion: str = "mss",
        fcm_difference: bool = True,
        level_weights: Sequence[float] = (0.4, 0.3, 0.2, 0.1),
        final_weight: float = 1.0,
        recon_weight: float = 1.0,
        focal_gamma: float = 2.0,
        focal_alpha: float | None = None,
        detach_features: bool = False,
        lr: float = 1e-4,
        lr_milestones: tuple[float, float] = (0.8, 0.9),
        lr_gamma: float = 0.2,
        pool_size: int = 21,
        weight_init: str = "normal",
        head_prior: float | None = None,
        encoder: str = "unet",
        encoder_weights: str = "auto",
        encoder_weights_sha256: str | None = None,
        encoder_frozen: bool = True,
    ) -> None:
        super().__init__()
        if disc_input not in ("features", "image"):
            raise ValueError(f"disc_input must be 'features' or 'image', got {disc_input!r}")
        if fusion not in ("mss", "finest"):
            raise ValueError(f"fusion must be 'mss' or 'finest', got {fusion!r}")
        if recon_depth < 3:
            raise ValueError(f"recon_depth must be at least 3 (two discriminative levels), got {recon_depth}")
        levels = recon_depth - 1
        if len(level_weights) != levels:
            raise ValueError(f"level_weights needs one weight per level ({levels}), got {len(level_weights)}")
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be a positive odd number (same-size pooling), got {pool_size}")
        if weight_init not in ("normal", "default"):
            raise ValueError(f"weight_init must be 'normal' or 'default', got {weight_init!r}")
        if head_prior is not None and not 0.0 < head_prior < 1.0:
            raise ValueError(f"head_prior must be in (0, 1), got {head_prior}")
        self.save_hyperparameters()
        self.levels = levels
        recon_widths = widths_from_base(recon_base_width, recon_depth)
        disc_widths = widths_from_base(disc_base_width, levels)
        self.reconstructive = UNet(3, 3, recon_widths, skip=False)

        def make_encoder() -> nn.Module:
            if encoder == "unet":
                return Encoder(3, recon_widths)
            # Short-budget option: ImageNet features (projected to the stage widths) as the encoder.
            return BackboneEncoder(recon_widths, encoder, encoder_weights, encoder_frozen, encoder_weights_sha256)

        if encoder != "unet":
            self.reconstructive.encoder = make_encoder()
        factor = 3 if fcm_difference else 2
        in_channels = [factor * recon_widths[i] for i in range(levels)]
        self.fcm = nn.ModuleList(FeatureComparison(in_channels[i], disc_widths[i]) for i in range(levels))
        # The ablation switches' modules are built and initialised whether they are used or not, and the
        # image-input arm's extra encoder after all the rest: an arm differs from the full model in its
        # switched part only, every other weight starts the same under the same seed.
        # hsg[i] calibrates level i by level i + 1 (the last level is the coarsest, uncalibrated).
        hsg = nn.ModuleList(HighLevelGuidance(disc_widths[i + 1], disc_widths[i]) for i in range(levels - 1))
        self.level_heads = nn.ModuleList(nn.Conv2d(disc_widths[i], 1, 1) for i in range(levels))
        mss = MultiScaleFusion(disc_widths[0], levels)
        self.hsg = hsg if calibration else None
        self.fusion = mss if fusion == "mss" else None

        def initialise(*parts: nn.Module) -> None:
            for part in parts if weight_init == "normal" else ():
                for name, module in part.named_modules():
                    if ".backbone." not in f".{name}.":  # keep the pretrained weights
                        draem_init(module)

        initialise(self.reconstructive, self.fcm, hsg, self.level_heads, mss)
        # Ablation: the discriminative part extracts features from the input and the reconstruction
        # again, with an encoder of its own of the reconstructive encoder's kind (same widths, same
        # pretrained backbone if any), instead of reusing the reconstructive network's features.
        self.disc_encoder = make_encoder() if disc_input == "image" else None
        if self.disc_encoder is not None:
            initialise(self.disc_encoder)
        if head_prior is not None:
            # Focal-loss prior (Lin et al.): every map starts at P(anomaly) = head_prior, not 0.5.
            bias = math.log(head_prior / (1.0 - head_prior))
            for head in [*self.level_heads, *([self.fusion.fuse[-1]] if self.fusion is not None else [])]:
                nn.init.constant_(head.bias, bias)

    # ------------------------------------------------------------------ networks

    def _discriminative_inputs(self, images: Tensor, encoded: list[Tensor], decoded: list[Tensor],
                               reconstruction: Tensor) -> list[Tensor]:  # fmt: skip
        """What each level's FCM compares: [E_i, D_i(, |E_i - D_i|)], the features standing for the input
        and for the reconstruction: the reconstructive network's own, or (ablation) extracted again."""
        if self.disc_encoder is not None:
            joined = reconstruction.detach() if self.hparams.detach_features else reconstruction
            of_input, of_reconstruction = self.disc_encoder(images), self.disc_encoder(joined)
        else:
            of_input, of_reconstruction = encoded, decoded[::-1]  # decoder level i has stage i's shape
        inputs = []
        for i in range(self.levels):
            enc, dec = of_input[i], of_reconstruction[i]
            if self.hparams.detach_features:
                enc, dec = enc.detach(), dec.detach()
            parts = [enc, dec, (enc - dec).abs()] if self.hparams.fcm_difference else [enc, dec]
            inputs.append(torch.cat(parts, dim=1))
        return inputs

    def _predict(self, images: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Reconstruction, per-level logits (fine to coarse, at their own resolution), final logits."""
        encoded = self.reconstructive.encoder(images)
        decoded = self.reconstructive.decoder(encoded)
        reconstruction = self.reconstructive.head(decoded[-1])
        inputs = self._discriminative_inputs(images, encoded, decoded, reconstruction)
        compared = [fcm(x) for fcm, x in zip(self.fcm, inputs, strict=True)]
        calibrated = list(compared)
        if self.hsg is not None:
            for i in range(self.levels - 2, -1, -1):  # coarse to fine
                calibrated[i] = self.hsg[i](compared[i], calibrated[i + 1])
        level_logits = [head(f) for head, f in zip(self.level_heads, calibrated, strict=True)]
        final = self.fusion(calibrated[0], level_logits) if self.fusion is not None else level_logits[0]
        if final.shape[-2:] != images.shape[-2:]:
            final = F.interpolate(final, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return reconstruction, level_logits, final

    def forward(self, images: Tensor) -> AnomalyOutput:
        _, _, logits = self._predict(images)
        anomaly_map = torch.sigmoid(logits.float())
        return AnomalyOutput(anomaly_map, pooled_max_score(anomaly_map, self.hparams.pool_size))

    # ------------------------------------------------------------------ training

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Every term of the objective (unweighted) and the weighted total ``loss``."""
        hp = self.hparams
        mask = batch["mask"]
        reconstruction, level_logits, final = self._predict(batch["image"])
        terms = {
            "reconstruction": reconstruction_loss(reconstruction, batch["clean_image"]),
            "final": focal_loss(final, mask, gamma=hp.focal_gamma, alpha=hp.focal_alpha),
        }
        for i, logits in enumerate(level_logits):
            upsampled = F.interpolate(logits.float(), size=mask.shape[-2:], mode="bilinear", align_corners=False)
            terms[f"level{i}"] = focal_loss(upsampled, mask, gamma=hp.focal_gamma, alpha=hp.focal_alpha)
        terms["loss"] = hp.recon_weight * terms["reconstruction"] + hp.final_weight * terms["final"]
        if hp.level_supervision:  # L_MSS
            # Without the fusion the final map IS the finest level's: L_pre already supervises that head
            # (weight final_weight, as the full model's final map), so L_MSS does not count it twice.
            first = 1 if self.fusion is None else 0
            terms["loss"] = terms["loss"] + sum(
                w * terms[f"level{i}"] for i, w in enumerate(hp.level_weights) if i >= first
            )
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        terms = self.losses(batch)
        batch_size = len(batch["image"])
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            if name != "loss":
                self.log(f"train/{name}", value, batch_size=batch_size)
        return terms["loss"]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr)
        return draem_schedule(optimizer, self.trainer.estimated_stepping_batches, hp.lr_milestones, hp.lr_gamma)
