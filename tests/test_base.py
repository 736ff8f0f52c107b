"""The shared LightningModule base: channels-last weights and batches under a Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning import seed_everything

from adbench.models.base import AnomalyModule
from adbench.models.draem import DRAEM

from .helpers import SIZE, small_datamodule, step_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _is_channels_last(tensor: torch.Tensor) -> bool:
    # With one channel (masks) the two layouts coincide; otherwise NCHW must be ruled out.
    return tensor.is_contiguous(memory_format=torch.channels_last) and (
        tensor.shape[1] == 1 or not tensor.is_contiguous()
    )


class _RecordingDRAEM(DRAEM):
    """DRAEM that notes the memory layout of every batch its steps receive."""

    def __init__(self) -> None:
        super().__init__(recon_base_width=4, disc_base_width=4, recon_depth=3, disc_depth=3)
        self.seen: list[tuple[str, bool]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen += [(f"train/{key}", _is_channels_last(batch[key])) for key in ("image", "clean_image", "mask")]
        return super().training_step(batch, batch_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        self.seen.append(("predict/image", _is_channels_last(batch["image"])))
        return super().predict_step(batch, batch_idx)


def test_weights_and_batches_are_channels_last_and_predictions_unchanged(embedded_root: Path) -> None:
    assert AnomalyModule.memory_format == torch.channels_last
    seed_everything(0, verbose=False)
    model = _RecordingDRAEM()
    data = small_datamodule(embedded_root, pseudo_anomalies=True)
    trainer = step_trainer(2)
    trainer.fit(model, datamodule=data)
    convolutions = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convolutions and all(_is_channels_last(w) for w in convolutions)
    predictions = trainer.predict(model, datamodule=data)
    assert model.seen and all(layout for _, layout in model.seen), model.seen
    assert {name for name, _ in model.seen} == {"train/image", "train/clean_image", "train/mask", "predict/image"}

    # The same weights in the default NCHW layout give the same maps, up to float rounding.
    images = torch.cat([batch["image"] for batch in data.predict_dataloader()])
    model.to(memory_format=torch.contiguous_format).eval()
    with torch.inference_mode():
        reference = model(images.contiguous()).anomaly_map
    ours = torch.cat([p["anomaly_map"] for p in predictions])
    assert ours.shape == reference.shape == (len(images), 1, SIZE, SIZE)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
