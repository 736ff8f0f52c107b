"""TSDN: Two-stream Decoder Feature Normality Estimating Network.

Park, Lee, Cho, Kim, Lee. "Two-stream Decoder Feature Normality Estimating
Network for Industrial Anomaly Detection", ICASSP 2023 (arXiv 2302.09794).

A U-Net-like autoencoder whose skips would pass abnormal features straight to the
decoder gets a two-stream decoder, trained on DRAEM-style synthetic anomalies: a
normal stream reconstructs the anomaly-free image (``L2 + (1 - SSIM)``) and an
abnormal stream learns the abnormal features (here: predicts the anomaly mask,
focal loss). A feature normality estimator (FNE) on every skip level gates the
encoder features the normal stream receives, so abnormal regions are not
reconstructed well; it is supervised by the mask at the level's resolution. The
anomaly map is the reconstruction error, the abnormal stream's probability, or
both (``anomaly_map``); the image score is DRAEM's pooled maximum.

Only the abstract and the opening of the introduction could be read and no
official code exists: every architectural detail here is this suite's reading,
labelled so wherever TSDN's numbers are shown.

Readings, open choices and ablations: docs/methods/tsdn.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from .base import AnomalyModule, AnomalyOutput
from .losses import focal_loss, reconstruction_loss
from .registry import register_model
from .schedules import draem_schedule
from .scoring import pooled_max_score
from .unet import BackboneEncoder, Decoder, Encoder, conv_bn_relu, widths_from_base

ANOMALY_MAPS = ("auto", "abnormal", "reconstruction", "fused")


class FeatureNormalityEstimator(nn.Module):
    """Per-position normality logit of one encoder level: conv3x3-BN-ReLU, conv1x1 -> (B, 1, h, w)."""

    def __init__(self, channels: int, init_bias: float = 2.0) -> None:
        super().__init__()
        hidden = max(channels // 2, 8)
        self.body = conv_bn_relu(channels, hidden)
        self.logit = nn.Conv2d(hidden, 1, 1)
        nn.init.constant_(self.logit.bias, init_bias)

    def forward(self, feature: Tensor) -> Tensor:
        return self.logit(self.body(feature))


def reconstruction_error_map(images: Tensor, reconstruction: Tensor, kernel_size: int = 11) -> Tensor:
    """Per-pixel structural dissimilarity ``(1 - SSIM) / 2`` in [0, 1], mean over channels -> (B, 1, H, W).

    SSIM rather than the squared error because the squared error of a blurry
    reconstruction is dominated by edges of normal structure; computed in float32.
    """
    with torch.autocast(device_type=images.device.type, enabled=False):
        _, ssim_map = structural_similarity_index_measure(
            reconstruction.float().clamp(0, 1), images.float(), data_range=1.0,
            kernel_size=kernel_size, reduction="none", return_full_image=True,
        )  # fmt: skip
    return ((1.0 - ssim_map.mean(dim=1, keepdim=True)) / 2.0).clamp(0.0, 1.0)


@register_model("tsdn")
class TSDN(AnomalyModule):
    needs_pseudo_anomalies = True
    #: methods.md states no MVTec numbers for TSDN ("no official numbers are at hand").
    paper_results: dict[str, float] = {}

    def __init__(
        self,
        base_width: int = 64,
        depth: int = 5,
        encoder: str = "unet",
        encoder_weights: str = "auto",
        encoder_weights_sha256: str | None = None,
        encoder_frozen: bool = True,
        use_fne: bool = True,
        two_stream: bool = True,
        abnormal_skips: str = "full",
        fne_target: str = "max",
        fne_init_bias: float = 2.0,
        anomaly_map: str = "auto",
        lambda_rec: float = 1.0,
        lambda_abn: float = 1.0,
        lambda_fne: float = 1.0,
        focal_gamma: float = 2.0,
        lr: float = 1e-4,
        lr_milestones: tuple[float, ...] = (0.8, 0.9),
        lr_gamma: float = 0.2,
        pool_size: int = 21,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be at least 2 (one skip level), got {depth}")
        if abnormal_skips not in ("full", "complement"):
            raise ValueError(f"abnormal_skips must be 'full' or 'complement', got {abnormal_skips!r}")
        if fne_target not in ("max", "area"):
            raise ValueError(f"fne_target must be 'max' or 'area', got {fne_target!r}")
        if anomaly_map not in ANOMALY_MAPS:
            raise ValueError(f"anomaly_map must be one of {ANOMALY_MAPS}, got {anomaly_map!r}")
        if not two_stream and anomaly_map in ("abnormal", "fused"):
            raise ValueError(f"anomaly_map={anomaly_map!r} needs the abnormal stream (two_stream=True)")
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be a positive odd number (same-size pooling), got {pool_size}")
        self.save_hyperparameters()
        self.map_mode = ("fused" if two_stream else "reconstruction") if anomaly_map == "auto" else anomaly_map

        widths = widths_from_base(base_width, depth)
        if encoder == "unet":
            self.encoder: nn.Module = Encoder(3, widths)
        else:
            self.encoder = BackboneEncoder(widths, encoder, encoder_weights, frozen=encoder_frozen,
                                           weights_sha256=encoder_weights_sha256)
        # One estimator per skip level (all encoder stages but the bottleneck). Built either way, so that
        # switching it off leaves every other module's initial weights as they are (one idea per arm).
        fne = nn.ModuleList(FeatureNormalityEstimator(w, fne_init_bias) for w in widths[:-1])
        self.fne = fne if use_fne else None
        self.normal_decoder = Decoder(widths, skip=True)
        self.normal_head = nn.Conv2d(widths[0], 3, 3, padding=1)
        # Built last: without it (the one-stream arm) nothing else changes.
        self.abnormal_decoder = Decoder(widths, skip=True) if two_stream else None
        self.abnormal_head = nn.Conv2d(widths[0], 1, 3, padding=1) if two_stream else None

    # ------------------------------------------------------------------ network

    def streams(self, images: Tensor) -> dict[str, Any]:
        """Run both streams: ``reconstruction`` (B, 3, H, W), ``abnormal_logits`` (B, 1, H, W) or None,
        ``normality_logits`` (one (B, 1, h_l, w_l) per skip level; empty without FNE),
        ``encoder`` features and the ``normal_skips`` / ``abnormal_skips`` the decoders received."""
        features = self.encoder(images)
        skips = features[:-1]
        normality_logits: list[Tensor] = []
        normal_skips = list(skips)
        abnormal_skips = list(skips)
        if self.fne is not None:
            normality_logits = [estimator(f) for estimator, f in zip(self.fne, skips, strict=True)]
            gates = [torch.sigmoid(n) for n in normality_logits]
            normal_skips = [g * f for g, f in zip(gates, skips, strict=True)]
            if self.hparams.abnormal_skips == "complement":
                abnormal_skips = [(1.0 - g) * f for g, f in zip(gates, skips, strict=True)]
        # The decoders take skips for levels 0..d-2 and start from the bottleneck features[-1].
        reconstruction = self.normal_head(self.normal_decoder(features, [*normal_skips, features[-1]])[-1])
        abnormal_logits = None
        if self.abnormal_decoder is not None:
            decoded = self.abnormal_decoder(features, [*abnormal_skips, features[-1]])
            abnormal_logits = self.abnormal_head(decoded[-1])
        return {
            "reconstruction": reconstruction,
            "abnormal_logits": abnormal_logits,
            "normality_logits": normality_logits,
            "encoder": features,
            "normal_skips": normal_skips,
            "abnormal_skips": abnormal_skips,
        }

    def anomaly_maps(self, images: Tensor, out: dict[str, Any]) -> dict[str, Tensor]:
        """Every map this model can produce, (B, 1, H, W) in [0, 1], float32."""
        maps = {"reconstruction": reconstruction_error_map(images, out["reconstruction"])}
        if out["abnormal_logits"] is not None:
            maps["abnormal"] = torch.sigmoid(out["abnormal_logits"].float())
            maps["fused"] = 0.5 * (maps["abnormal"] + maps["reconstruction"])
        return maps

    def forward(self, images: Tensor) -> AnomalyOutput:
        anomaly_map = self.anomaly_maps(images, self.streams(images))[self.map_mode]
        return AnomalyOutput(anomaly_map, pooled_max_score(anomaly_map, self.hparams.pool_size))

    # ------------------------------------------------------------------ training

    def fne_targets(self, mask: Tensor, sizes: list[torch.Size]) -> list[Tensor]:
        """The mask at each level's resolution: max-pooled (any anomalous pixel) or area fraction."""
        if self.hparams.fne_target == "max":
            return [F.adaptive_max_pool2d(mask.float(), tuple(s)) for s in sizes]
        return [F.adaptive_avg_pool2d(mask.float(), tuple(s)) for s in sizes]

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        hp = self.hparams
        out = self.streams(batch["image"])
        losses = {"reconstruction": reconstruction_loss(out["reconstruction"], batch["clean_image"])}
        total = hp.lambda_rec * losses["reconstruction"]
        if out["abnormal_logits"] is not None:
            losses["abnormal"] = focal_loss(out["abnormal_logits"], batch["mask"], gamma=hp.focal_gamma)
            total = total + hp.lambda_abn * losses["abnormal"]
        if out["normality_logits"]:
            targets = self.fne_targets(batch["mask"], [n.shape[-2:] for n in out["normality_logits"]])
            # The abnormality logit is the negated normality logit.
            per_level = [
                focal_loss(-n, t, gamma=hp.focal_gamma)
                for n, t in zip(out["normality_logits"], targets, strict=True)
            ]
            losses["fne"] = torch.stack(per_level).mean()
            total = total + hp.lambda_fne * losses["fne"]
        losses["loss"] = total
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.losses(batch)
        batch_size = len(batch["image"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
        for name in ("reconstruction", "abnormal", "fne"):
            if name in losses:
                self.log(f"train/{name}", losses[name], batch_size=batch_size)
        return losses["loss"]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # A frozen pretrained encoder contributes no trainable parameters.
        optimizer = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=hp.lr)
        return draem_schedule(optimizer, self.trainer.estimated_stepping_batches, hp.lr_milestones, hp.lr_gamma)
