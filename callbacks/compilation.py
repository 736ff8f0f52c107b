"""torch.compile for any method, from a config: ``trainer.callbacks: [{class_path: adbench.callbacks.compilation.CompileModules}]``."""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer


class CompileModules(Callback):
    """Compile each top-level submodule of the method in place (``nn.Module.compile``).

    A method's steps call its submodules (backbone, student, decoder, ...) rather than its own
    ``forward``, so compiling those covers training, validation and test alike. In place, the
    state dict keeps its keys: checkpoints load with or without compilation. Submodules without
    parameters or buffers are left alone (nothing to gain).

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
        for name, child in pl_module.named_children():
            if (
                next(child.parameters(), None) is not None
                or next(child.buffers(), None) is not None
            ):
                child.compile(**options)
                self.compiled.append(name)
