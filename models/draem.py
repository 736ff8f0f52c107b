"""DRAEM: a discriminatively trained reconstruction embedding.

Zavrtanik, Kristan, Skocaj. "DRAEM - A discriminatively trained reconstruction
embedding for surface anomaly detection", ICCV 2021 (arXiv 2108.07610).

Two networks are trained jointly on normal images carrying synthetic anomalies
(Perlin-noise masks filled with blended DTD textures, made by the DataModule:
``datamodules/synthesis.py``). A reconstructive encoder-decoder without skip
connections maps the image back to the clean one (loss ``L2 + (1 - SSIM)``); a
discriminative U-Net reads ``[reconstruction, input]`` and predicts the anomaly
mask (focal loss). The anomaly map is the discriminator's per-pixel probability;
the image score is the maximum of that map average-pooled over 21 x 21 pixels.

``encoder`` (not the paper's): ``"scratch"`` (default) is the paper's reconstructive
encoder; a backbone name (e.g. ``tf_efficientnet_lite0``) replaces it by that frozen
ImageNet backbone, plugged in as the quick POUTA and TSDN profiles plug theirs
(``unet.BackboneEncoder``), so DRAEM is their baseline on the same encoder. The decoder
and the discriminative network stay DRAEM's.

Readings, open choices and ablations: docs/methods/draem.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import AnomalyModule, AnomalyOutput
from .losses import focal_loss, reconstruction_loss
from .registry import register_model
from .schedules import draem_schedule
from .scoring import pooled_max_score
from .unet import BackboneEncoder, UNet, draem_init, widths_from_base

#: ``encoder`` value of the paper's reconstructive encoder, trained from scratch.
SCRATCH = "scratch"


@register_model("draem")
class DRAEM(AnomalyModule):
    needs_pseudo_anomalies = True
    paper_results = {"image_auroc": 0.980, "pixel_auroc": 0.973}

    def __init__(
        self,
        recon_base_width: int = 128,
        disc_base_width: int = 64,
        recon_depth: int = 5,
        disc_depth: int = 6,
        lr: float = 1e-4,
        lr_milestones: tuple[float, float] = (0.8, 0.9),
        lr_gamma: float = 0.2,
        focal_gamma: float = 2.0,
        pool_size: int = 21,
        detach_reconstruction: bool = False,
        weight_init: str = "normal",
        decoder_layout: str = "draem",
        encoder: str = SCRATCH,
        encoder_weights: str = "auto",
        encoder_weights_sha256: str | None = None,
    ) -> None:
        super().__init__()
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be a positive odd number (same-size pooling), got {pool_size}")
        if weight_init not in ("normal", "default"):
            raise ValueError(f"weight_init must be 'normal' or 'default', got {weight_init!r}")
        self.save_hyperparameters()
        recon_widths = widths_from_base(recon_base_width, recon_depth)
        disc_widths = widths_from_base(disc_base_width, disc_depth)
        self.reconstructive = UNet(3, 3, recon_widths, skip=False, layout=decoder_layout)
        self.discriminative = UNet(6, 1, disc_widths, skip=True, layout=decoder_layout)
        if encoder != SCRATCH:
            # Baseline on the same encoder as the quick POUTA/TSDN: frozen ImageNet stages, projected to the widths.
            self.reconstructive.encoder = BackboneEncoder(recon_widths, encoder, encoder_weights, True,
                                                          encoder_weights_sha256)
        if weight_init == "normal":
            for name, module in self.named_modules():
                if ".backbone." not in f".{name}.":  # keep the pretrained weights
                    draem_init(module)

    def _logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruction of ``images`` and the discriminator's per-pixel anomaly logits."""
        reconstruction = self.reconstructive(images)
        joined = reconstruction.detach() if self.hparams.detach_reconstruction else reconstruction
        logits = self.discriminative(torch.cat([joined, images], dim=1))
        return reconstruction, logits

    def forward(self, images: Tensor) -> AnomalyOutput:
        _, logits = self._logits(images)
        anomaly_map = torch.sigmoid(logits.float())
        return AnomalyOutput(anomaly_map, pooled_max_score(anomaly_map, self.hparams.pool_size))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        reconstruction, logits = self._logits(batch["image"])
        recon = reconstruction_loss(reconstruction, batch["clean_image"])
        segmentation = focal_loss(logits, batch["mask"], gamma=self.hparams.focal_gamma)
        loss = recon + segmentation
        batch_size = len(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/reconstruction", recon, batch_size=batch_size)
        self.log("train/focal", segmentation, batch_size=batch_size)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # A frozen pretrained encoder contributes no trainable parameters.
        optimizer = torch.optim.Adam(
            [
                {"params": [p for p in self.reconstructive.parameters() if p.requires_grad], "lr": hp.lr},
                {"params": self.discriminative.parameters(), "lr": hp.lr},
            ]
        )
        return draem_schedule(optimizer, self.trainer.estimated_stepping_batches, hp.lr_milestones, hp.lr_gamma)
