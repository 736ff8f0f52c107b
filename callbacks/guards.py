"""Fail fast and loudly when training diverges, instead of training on NaNs for hours."""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard(Callback):
    """Raise :class:`NonFiniteLossError` (naming epoch and step) at the first non-finite loss."""

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at epoch {trainer.current_epoch}, "
                f"step {trainer.global_step} of {type(pl_module).__name__}"
            )


class LossHistory(Callback):
    """Per-epoch mean training loss, and whether it diverged to a huge but finite value.

    :class:`NonFiniteLossGuard` stops a run at NaN/inf; a loss that climbs to 1e9 and stays
    finite trains on, and its test figures look like any other. ``diverged`` is set when an
    epoch's mean loss exceeds ``factor`` times the lowest epoch mean so far (and
    ``min_loss``, so tiny losses wobbling near zero never count), or any step's loss
    exceeds ``ceiling``.
    """

    def __init__(self, factor: float = 100.0, min_loss: float = 1.0, ceiling: float = 1e8) -> None:
        self.factor, self.min_loss, self.ceiling = factor, min_loss, ceiling
        self.epoch_means: list[float] = []
        self.max_step_loss = float("-inf")
        self._sum, self._count = 0.0, 0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch_means, self.max_step_loss = [], float("-inf")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            value = float(loss.detach())
            self._sum, self._count = self._sum + value, self._count + 1
            self.max_step_loss = max(self.max_step_loss, value)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._count:
            self.epoch_means.append(self._sum / self._count)
        self._sum, self._count = 0.0, 0

    @property
    def diverged(self) -> str | None:
        """Why the loss counts as diverged, or ``None``."""
        if self.max_step_loss > self.ceiling:
            return f"training loss reached {self.max_step_loss:.3g} (> {self.ceiling:.0e})"
        for epoch, mean in enumerate(self.epoch_means):
            lowest = min(self.epoch_means[: epoch + 1])
            if mean > self.min_loss and mean > self.factor * lowest:
                return f"epoch {epoch} mean training loss {mean:.3g} is over {self.factor:g}x the lowest before it ({lowest:.3g})"
        return None

    @property
    def stats(self) -> dict[str, Any]:
        finite = self.max_step_loss != float("-inf")
        return {"epoch_means": self.epoch_means, "max_step": self.max_step_loss if finite else None}
