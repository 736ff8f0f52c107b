"""``adbench``: the Lightning CLI of the suite.

    adbench fit      --config configs/stpm/quick.yaml --data.category bottle --data.root $MVTEC_ROOT
    adbench test     --config configs/stpm/quick.yaml --ckpt_path last
    adbench validate / predict (same arguments)
    adbench models   (list the registered methods)

Any registered method can be named by class path (``models.stpm.STPM``) or by
class name (``--model STPM``). The evaluation callback is always attached, so
``test`` logs image/pixel AUROC, PRO and F1-max whatever the config says.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from lightning import Callback
from lightning.pytorch.cli import LightningCLI

import models
from callbacks.allocator import ReuseFreedMemory
from callbacks.evaluation import AnomalyEvaluator
from callbacks.guards import NonFiniteLossGuard
from datamodules import MVTecDataModule
from models.base import AnomalyModule


class AnomalyCLI(LightningCLI):
    """LightningCLI with the suite's defaults: any AnomalyModule, the MVTec DataModule."""

    def __init__(
        self,
        args: Sequence[str] | None = None,
        run: bool = True,
        extra_callbacks: Sequence[Callback] = (),
        trainer_defaults: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            AnomalyModule,
            MVTecDataModule,
            subclass_mode_model=True,
            seed_everything_default=0,
            trainer_defaults={
                **(trainer_defaults or {}),
                "callbacks": [AnomalyEvaluator(), NonFiniteLossGuard(), ReuseFreedMemory(), *extra_callbacks],
            },
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **kwargs,
        )

    @property
    def evaluator(self) -> AnomalyEvaluator:
        return next(c for c in self.trainer.callbacks if isinstance(c, AnomalyEvaluator))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["models"]:
        print("\n".join(models.list_models()))
        return
    AnomalyCLI(args=argv)


if __name__ == "__main__":
    main()
