"""Learning-rate schedules shared by the methods (one implementation each).

DRAEM's schedule (Zavrtanik et al., ICCV 2021), which the methods trained on its
pseudo-anomalies take over with its recipe (DRAEM, POUTA, TSDN, RSTPM's
discriminator): the learning rate is multiplied by ``gamma`` (0.2) at each of the
``milestones``, fractions of training (80 % and 90 %).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def draem_schedule(optimizer: torch.optim.Optimizer, total_steps: float, milestones: Sequence[float],
                   gamma: float) -> dict[str, Any]:  # fmt: skip
    """DRAEM's schedule over ``total_steps`` optimiser steps, as ``configure_optimizers``' return value.

    The milestones are counted in optimiser steps (Lightning's
    ``trainer.estimated_stepping_batches``): the same 80 %/90 % of the epochs as the
    paper's, and runs bounded by ``max_steps`` follow it too. With no finite step
    count (a run bounded only by time) or no milestones the learning rate is constant.
    """
    if not 0 < total_steps < float("inf") or not milestones:
        return {"optimizer": optimizer}
    steps = sorted({max(1, int(round(total_steps * fraction))) for fraction in milestones})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=gamma)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def draem_lr_factor(progress: float, milestones: Sequence[float], gamma: float) -> float:
    """DRAEM's schedule as a factor of the base learning rate at ``progress`` (0..1) of training.

    For loops that set the learning rate themselves (manual optimisation, a schedule
    over part of a run): ``gamma`` to the number of milestones already reached.
    """
    return gamma ** sum(progress >= m for m in milestones)
