"""torch.compile for any method, from a config: ``trainer.callbacks: [{class_path: adbench.callbacks.compilation.CompileModules}]``."""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

#: What is compiled: ``forward`` (which validation, test and predict steps call) and the training step.
COMPILED_STEPS = ("forward", "training_step")


class CompileModules(Callback):
    """Compile the method's ``forward`` and ``training_step`` with ``torch.compile``.

    A method's training step calls its parts' own methods (``self.pair.loss(...)``), not its
    ``forward``, so compiling submodules' ``__call__`` would miss most of it; the two steps
    cover all of it. What dynamo cannot trace (``self.log``) runs eagerly between compiled
    graphs. The compiled functions are instance attributes: the state dict and checkpoints are
    those of the uncompiled method.

    Args:
        mode: ``torch.compile``'s mode (``default``, ``reduce-overhead``, ``max-autotune``).
        backend: its backend (``inductor``; ``eager`` only traces, for tests).
    """

    def __init__(self, mode: str | None = None, backend: str = "inductor") -> None:
        self.mode, self.backend = mode, backend
        self.compiled: list[str] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.compiled:  # fit, then test in the same process: compiled once
            return
        options: dict[str, Any] = {"backend": self.backend}
        if self.mode is not None:
            options["mode"] = self.mode
        for name in COMPILED_STEPS:
            setattr(pl_module, name, torch.compile(getattr(pl_module, name), **options))
            self.compiled.append(name)
