"""DRAEM: a discriminatively trained reconstruction embedding.

Zavrtanik, Kristan, Skocaj. "DRAEM - A discriminatively trained reconstruction
embedding for surface anomaly detection", ICCV 2021 (arXiv 2108.07610).

Two networks trained jointly on normal images carrying synthetic anomalies
(Perlin-noise masks filled with blended DTD textures; the DataModule makes them,
see ``datamodules/synthesis.py``):

* Reconstructive sub-network: an encoder-decoder WITHOUT skip connections
  (stage widths ``b, 2b, 4b, 8b, 8b``, paper ``b = 128``) maps the image with the
  synthetic anomaly back to the clean image. Loss: ``L2 + (1 - SSIM)`` between its
  output and ``clean_image``.
* Discriminative sub-network: a U-Net WITH skip connections (stage widths
  ``b, 2b, 4b, 8b, 8b, 8b``, paper ``b = 64``) on the channel concatenation
  ``[reconstruction, input]`` (6 channels) predicts the anomaly mask. Loss: focal
  loss (gamma 2) against ``mask``.
* Total loss: ``L2 + SSIM + focal`` (equal weights), Adam lr 1e-4 over both
  networks, lr x0.2 at 80 % and 90 % of training; 700 epochs, batch 8, 256 px.
* Anomaly map: the discriminator's per-pixel anomaly probability.
  Image score: the maximum of the map average-pooled with a 21 x 21 window,
  stride 1 (the pooling suppresses isolated single-pixel responses).

Choices the paper leaves open (constructor arguments; defaults follow the
authors' public code where the paper is silent):

* ``detach_reconstruction`` (default ``False``): the reference implementation
  feeds the reconstruction to the discriminator without ``detach``, so the focal
  loss also trains the reconstructive network (end-to-end, as the paper's
  "jointly trained" suggests). ``True`` stops that gradient, so the
  reconstructive network only learns to reconstruct.
* Segmentation head: one logit per pixel with a sigmoid instead of the
  reference's 2-class softmax; a softmax over two logits is a sigmoid of their
  difference, so the model class and the focal loss are the same (see
  :func:`adbench.models.losses.focal_loss`), with no class weighting (the reference's
  ``alpha=None``).
* Input order of the discriminator: ``[reconstruction, input]``, as in the
  reference implementation (the paper only says "concatenated").
* ``weight_init`` (default ``"normal"``): the reference initialises every
  convolution with N(0, 0.02) and BatchNorm scales with N(1, 0.02), biases 0;
  ``"default"`` keeps PyTorch's initialisation.
* ``pool_size`` 21 with zero padding counted in the average
  (``count_include_pad``, as ``F.avg_pool2d`` in the reference), so a response at
  the border is pooled with zeros; the pixel-level map is NOT smoothed.
* The lr milestones are computed on optimiser steps
  (``trainer.estimated_stepping_batches``), which equals the paper's 80 %/90 % of
  the epochs and also works for runs bounded by ``max_steps``; runs bounded only
  by time (no finite step count) keep a constant learning rate.
* ``decoder_layout`` (default ``"draem"``): the decoders follow the reference
  implementation's widths, one stage narrower than the encoder at each resolution
  (see :class:`adbench.models.unet.Decoder`); ``"symmetric"`` mirrors the encoder (about
  1.45x the FLOPs at equal base widths; the suite's results before 2026-11-22
  used it). The blocks are the suite's shared ones (``models/unet.py``: two 3x3
  conv-BN-ReLU per stage, max-pool down, bilinear up + conv); the reference's
  convolutions carry a bias before BatchNorm, which BatchNorm cancels, so ours
  have none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import AnomalyModule, AnomalyOutput
from .losses import focal_loss, reconstruction_loss
from .registry import register_model
from .scoring import pooled_max_score
from .unet import UNet, draem_init, widths_from_base


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
        if weight_init == "normal":
            self.apply(draem_init)

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
        optimizer = torch.optim.Adam(
            [
                {"params": self.reconstructive.parameters(), "lr": hp.lr},
                {"params": self.discriminative.parameters(), "lr": hp.lr},
            ]
        )
        total = self.trainer.estimated_stepping_batches
        if not 0 < total < float("inf"):
            return {"optimizer": optimizer}  # time-bounded run: no known end, constant lr
        milestones = sorted({max(1, int(round(total * fraction))) for fraction in hp.lr_milestones})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
