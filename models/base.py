"""The one contract every method honours.

A method is a ``LightningModule`` that owns its training step and optimiser and
implements :meth:`AnomalyModule.forward`: a batch of images in ``[0, 1]`` goes in,
an :class:`AnomalyOutput` (a per-pixel anomaly map at input resolution and one
score per image) comes out. Validation, test and predict steps are shared here,
so the evaluation callback, the visualiser and the benchmark runner treat every
method alike and never need to know what is inside one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from adbench.checkpoints import update_metadata


class AnomalyOutput(NamedTuple):
    """What every method returns for a batch of ``B`` images of size ``H x W``."""

    anomaly_map: Tensor  # (B, 1, H, W), larger = more anomalous
    image_score: Tensor  # (B,)


class AnomalyModule(LightningModule):
    """Base class of all methods: shared evaluation steps, one output contract."""

    #: Whether the DataModule must supply DRAEM-style pseudo-anomalies in training
    #: batches (``batch["image"]`` then holds the anomalous image, ``batch["clean_image"]``
    #: the original and ``batch["mask"]`` / ``batch["label"]`` describe the anomaly).
    needs_pseudo_anomalies: ClassVar[bool] = False

    #: Whether the training loader drops an incomplete last batch. Gradient-trained
    #: networks want it (BatchNorm statistics of a 1-sample batch are meaningless and
    #: raise in training mode); methods that only collect features (PatchCore) must
    #: see every training image.
    drop_incomplete_batches: ClassVar[bool] = True

    #: The Lightning strategy of a multi-device (DDP) job. Methods whose steps leave
    #: some parameters out of the graph (staged training) need unused-parameter search.
    ddp_strategy: ClassVar[str] = "ddp"

    #: MVTec AD means (15 categories, 0..1) reported in the method's paper; keys as in the
    #: metrics (image_auroc, ...). The leaderboard compares them only with a 15-category
    #: sweep; per-category figures live in benchmark/reports/published/mvtec_ad.csv.
    paper_results: ClassVar[dict[str, float]] = {}

    #: Memory layout of convolution weights and batch images once a Trainer sets the
    #: module up. oneDNN (CPU) and cuDNN's tensor-core kernels compute in NHWC; with
    #: NCHW tensors every convolution converts its input and output. On the 2-core
    #: CPU this halves STPM's training step (lite0, batch 8, 256 px: 628 -> 284 ms)
    #: and DRAEM's (widths 16/16: 4.9 -> 2.0 s). The numbers computed are the same
    #: up to float rounding (summation order).
    memory_format: ClassVar[torch.memory_format] = torch.channels_last

    def setup(self, stage: str) -> None:
        self.to(memory_format=self.memory_format)

    def on_test_start(self) -> None:
        # A plain Trainer().test(model, dm) has no evaluator: the steps run and nothing is measured.
        if not any(type(c).__name__ == "AnomalyEvaluator" for c in self.trainer.callbacks):
            rank_zero_warn(
                f"{type(self).__name__} is tested without an AnomalyEvaluator: no metric will be computed; "
                "use Trainer(callbacks=[adbench.callbacks.AnomalyEvaluator()]) or the adbench CLI",
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Which registered method this is, so `adbench.load(path)` can rebuild it (see adbench/api.py).
        update_metadata(checkpoint, model=getattr(self, "registry_name", None))

    # Batches are converted in the batch-start hooks, in place, rather than in
    # ``on_after_batch_transfer``: Lightning warns whenever a LightningModule
    # overrides that data hook while a DataModule is in use.
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        _to_memory_format(batch, self.memory_format)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        _to_memory_format(batch, self.memory_format)

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        _to_memory_format(batch, self.memory_format)

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        _to_memory_format(batch, self.memory_format)

    @property
    def ready_for_selection(self) -> bool:
        """Whether this epoch's validation may rank checkpoints.

        ``False`` while a method trains in stages and its final map still has an
        untrained part (RSTPM's student stage): the evaluator then logs a
        selection score of -1, below any real one, so such an epoch is never chosen.
        """
        return True

    def forward(self, images: Tensor) -> AnomalyOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.inference_mode()
    def _anomaly_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        anomaly_map, image_score = self(batch["image"])
        return {"anomaly_map": anomaly_map.float(), "image_score": image_score.float()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return self._anomaly_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return self._anomaly_step(batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {**self._anomaly_step(batch), "path": batch["path"]}


@contextmanager
def eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run ``modules`` in eval mode (BatchNorm on running statistics), then restore their modes:
    a later training stage reads a frozen earlier stage's networks this way."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def _to_memory_format(batch: Any, memory_format: torch.memory_format) -> None:
    """Images, clean images and masks of a dict batch in ``memory_format`` (in place)."""
    if isinstance(batch, dict):
        for key, value in batch.items():
            if isinstance(value, Tensor) and value.dim() == 4:
                batch[key] = value.contiguous(memory_format=memory_format)
