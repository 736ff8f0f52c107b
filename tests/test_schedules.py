"""DRAEM's learning-rate schedule, the one helper DRAEM, POUTA, TSDN and RSTPM's discriminator use."""

from __future__ import annotations

import math

import pytest
import torch

from adbench.models.schedules import draem_lr_factor, draem_schedule


def _adam(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(config: dict, steps: int) -> list[float]:
    """The learning rate of each of ``steps`` optimiser steps, stepping the scheduler as Lightning does."""
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_milestones_at_80_and_90_percent_of_the_optimiser_steps() -> None:
    config = draem_schedule(_adam(), 10, (0.8, 0.9), 0.2)
    assert config["lr_scheduler"]["interval"] == "step"
    assert sorted(config["lr_scheduler"]["scheduler"].milestones) == [8, 9]
    assert _lrs(config, 10) == [pytest.approx(1e-3)] * 8 + [pytest.approx(2e-4), pytest.approx(4e-5)]


def test_milestones_are_rounded_at_least_one_and_deduplicated() -> None:
    assert sorted(draem_schedule(_adam(), 7, (0.8, 0.9), 0.2)["lr_scheduler"]["scheduler"].milestones) == [6]
    assert sorted(draem_schedule(_adam(), 1, (0.1, 0.8), 0.2)["lr_scheduler"]["scheduler"].milestones) == [1]
    assert sorted(draem_schedule(_adam(), 1000, (0.9, 0.8), 0.5)["lr_scheduler"]["scheduler"].milestones) == [
        800, 900
    ]


@pytest.mark.parametrize("total", [0, math.inf, -1])
def test_no_known_end_or_no_milestones_keeps_the_lr_constant(total: float) -> None:
    optimizer = _adam()
    assert draem_schedule(optimizer, total, (0.8, 0.9), 0.2) == {"optimizer": optimizer}
    assert draem_schedule(optimizer, 100, (), 0.2) == {"optimizer": optimizer}


def test_lr_factor_counts_the_milestones_reached() -> None:
    milestones = (0.8, 0.9)
    assert draem_lr_factor(0.0, milestones, 0.2) == 1.0
    assert draem_lr_factor(0.7999, milestones, 0.2) == 1.0
    assert draem_lr_factor(0.8, milestones, 0.2) == 0.2
    assert draem_lr_factor(0.85, milestones, 0.2) == 0.2
    assert draem_lr_factor(0.9, milestones, 0.2) == 0.2**2
    assert draem_lr_factor(1.0, milestones, 0.2) == 0.2**2
    assert draem_lr_factor(0.95, (), 0.2) == 1.0


def test_factor_and_scheduler_agree_when_the_milestones_fall_on_whole_steps() -> None:
    total = 20
    by_scheduler = _lrs(draem_schedule(_adam(1.0), total, (0.8, 0.9), 0.2), total)
    by_factor = [draem_lr_factor(step / total, (0.8, 0.9), 0.2) for step in range(total)]
    assert by_scheduler == pytest.approx(by_factor)
