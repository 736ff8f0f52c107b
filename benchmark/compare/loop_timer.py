"""Times the training and predict loops of a worker, for either library's batches.

Not :class:`adbench.callbacks.timing.TimingCallback`, whose quantities differ from the ones the
comparison reports: it times the *test* loop (the comparison predicts, to get raw outputs from
both libraries), counts training batches but not images (PatchCore's row is images/s), starts
its fit clock at ``on_fit_start`` (the comparison's fit time includes data setup: a wall clock
around ``trainer.fit`` in the worker), resets CUDA peak memory at fit and test start (the
comparison reports the whole worker's peak), and reads ``batch["image"]``, which anomalib's
batch objects do not have. Its clock, :func:`~adbench.callbacks.timing.synchronized_now`, is
reused, so both measure after the device's work has finished.
"""

from __future__ import annotations

import math
from typing import Any

from lightning import Callback

from adbench.callbacks.timing import synchronized_now


def _batch_images(batch: Any) -> Any:
    # Ours are dicts; anomalib's are dataclass batches (``ImageBatch``) with an ``image`` field.
    return batch["image"] if isinstance(batch, dict) else batch.image


class LoopTimer(Callback):
    """First batch start to last batch end, images and batches, of the train and predict loops."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, float]] = {}

    def _start(self, stage: str, pl_module: Any) -> None:
        entry = self.stats.setdefault(stage, {"images": 0, "batches": 0})
        if "first" not in entry:
            entry["first"] = synchronized_now(pl_module)

    def _end(self, stage: str, pl_module: Any, batch: Any) -> None:
        entry = self.stats[stage]
        entry["images"] += len(_batch_images(batch))
        entry["batches"] += 1
        entry["last"] = synchronized_now(pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, *args: Any) -> None:
        self._start("train", pl_module)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, *args: Any
    ) -> None:
        self._end("train", pl_module, batch)

    def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, *args: Any) -> None:
        self._start("predict", pl_module)

    def on_predict_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, *args: Any
    ) -> None:
        self._end("predict", pl_module, batch)

    def summary(self, stage: str) -> dict[str, float]:
        entry = self.stats.get(stage, {})
        seconds = entry.get("last", 0.0) - entry.get("first", 0.0)
        images = entry.get("images", 0)
        return {
            "images": images,
            "batches": entry.get("batches", 0),
            "seconds": seconds,
            "images_per_second": images / seconds if seconds > 0 else math.nan,
        }
