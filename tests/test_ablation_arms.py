"""One idea per arm: every arm of the ablation sweep beside the method it ablates.

Built from ``configs/sweeps/ablations.yaml``, so a new arm is checked as soon as it is listed: its
job config is the method's but for ONE constructor switch (same trainer, data, epochs, batch size,
learning rates); both models, built under the same seed, have the same modules and the same initial
weights outside the part the switch declares (``SWITCHED``); the same optimisers and schedules step
the same parameters; and the anomaly-map rule stays the full method's, unless the switch is the map
itself or the arm names a ``partner`` row with its map rule.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch
import yaml

from adbench.benchmark.orchestration.sweep import config_path
from adbench.cli import job_config
from adbench.models import get_model_class

from .conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

SWEEP = yaml.safe_load((REPO / "configs" / "sweeps" / "ablations.yaml").read_text())
#: Baseline variants (another footing for a whole method, not one of its ideas) are not arms.
BASELINE_ROWS = set((SWEEP.get("baselines") or {}).values())
ARMS = {name: v for name, v in SWEEP["variants"].items() if name not in BASELINE_ROWS}

#: (method, constructor switch) -> the state-dict prefixes the switch may add, remove or change.
#: Empty: the switch changes no weight (a map rule or a loss term). A new switch must be declared here.
SWITCHED: dict[tuple[str, str], tuple[str, ...]] = {
    ("tsdn", "use_fne"): ("fne.",),
    ("tsdn", "two_stream"): ("abnormal_decoder.", "abnormal_head."),
    ("tsdn", "anomaly_map"): (),
    ("pouta", "disc_input"): ("disc_encoder.",),
    ("pouta", "calibration"): ("hsg.",),
    ("pouta", "level_supervision"): (),
    ("pouta", "fusion"): ("fusion.",),
    # Teacher1 also computes its deepest stage (Student2's input) only with the second pair.
    ("rstpm", "second_pair"): ("teacher2.", "student2.", "pair1.teacher."),
    ("rstpm", "attention"): ("student2.attention.",),
    ("rstpm", "teacher2"): ("teacher2.", "student2."),
    ("rstpm", "final_map"): (),
}
#: Switches that ARE the anomaly-map rule.
MAP_SWITCHES = {"anomaly_map", "fusion", "final_map"}
#: The attribute holding a method's resolved map rule (``"auto"`` resolved by the constructor).
MAP_RULE = {"tsdn": "map_mode", "rstpm": "final_map"}


def _config(name: str) -> dict[str, Any]:
    """The job config of a method or arm (the sweep's profile, its YAML, the arm's overrides)."""
    variant = ARMS.get(name, {"method": name})
    return job_config(config_path(variant["method"], SWEEP["profile"]), "mvtec", {}, variant.get("overrides"))


class _Trainer:
    """What ``configure_optimizers`` reads from a trainer: the step budget."""

    estimated_stepping_batches = 100
    max_epochs = 16
    num_training_batches = 10


@cache
def _built(name: str) -> dict[str, Any]:
    """The model of ``name`` built under seed 0: its initial state, optimisers, map rule."""
    config = _config(name)
    torch.manual_seed(0)
    model = get_model_class(ARMS.get(name, {"method": name})["method"])(**config["model"]["init_args"])
    model.trainer = _Trainer()
    names = {id(p): n for n, p in model.named_parameters()}
    configured = model.configure_optimizers()
    if isinstance(configured, dict):  # {"optimizer": ..., "lr_scheduler": {"scheduler": ...}}
        optimizers, scheduler = [configured["optimizer"]], configured.get("lr_scheduler")
        scheduler = scheduler.get("scheduler") if isinstance(scheduler, dict) else scheduler
    else:
        optimizers, scheduler = list(configured) if isinstance(configured, list | tuple) else [configured], None
    groups = [
        [({k: v for k, v in g.items() if k != "params"}, {names[id(p)] for p in g["params"]}) for g in o.param_groups]
        for o in optimizers
    ]
    schedule = None if scheduler is None else (type(scheduler).__name__, {
        k: v for k, v in scheduler.state_dict().items() if k not in ("_get_lr_called_within_step",)})  # fmt: skip
    return {
        "model": model,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizers": [type(o).__name__ for o in optimizers],
        "groups": groups,
        "schedule": schedule,
        "map_rule": getattr(model, MAP_RULE.get(config["model"]["class_path"].rsplit(".", 1)[-1].lower(), ""), None),
    }


def _switch(arm: str) -> tuple[str, str]:
    """The arm's method and its one constructor switch; everything else of the job config is the method's."""
    method = ARMS[arm]["method"]
    full, ablated = _config(method), _config(arm)
    full_args, arm_args = full["model"].pop("init_args"), ablated["model"].pop("init_args")
    assert ablated == full, f"{arm}: the job differs from {method}'s outside the model's arguments (budget, data)"
    changed = sorted(k for k in set(full_args) | set(arm_args) if full_args.get(k) != arm_args.get(k))
    assert len(changed) == 1, f"{arm} changes {changed}: one switch per arm"
    assert (method, changed[0]) in SWITCHED, f"declare what {method}'s {changed[0]!r} switches in SWITCHED"
    return method, changed[0]


def _outside(keys: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {k for k in keys if not k.startswith(prefixes)}


def test_every_arm_is_listed_and_names_a_method_of_the_sweep() -> None:
    listed = set(SWEEP["methods"])
    for name, variant in ARMS.items():
        assert name in listed and variant["method"] in listed, name
        assert set(variant) <= {"method", "overrides", "partner", "note"}, name
        if "partner" in variant:
            assert variant["partner"] in listed and ARMS[variant["partner"]]["method"] == variant["method"], name


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_arm_differs_from_its_method_in_its_switched_part_only(arm: str) -> None:
    method, switch = _switch(arm)
    prefixes = SWITCHED[(method, switch)]
    full, ablated = _built(method), _built(arm)
    # Same modules and parameter tensors, with the same initial values under the same seed, outside the part.
    common = _outside(set(full["state"]), prefixes)
    assert common == _outside(set(ablated["state"]), prefixes), f"{arm}: modules outside {prefixes} differ"
    moved = sorted(k for k in common if full["state"][k].shape != ablated["state"][k].shape
                   or not torch.equal(full["state"][k], ablated["state"][k]))  # fmt: skip
    assert not moved, f"{arm}: initial weights outside {prefixes} differ: {moved[:5]}"
    inside = {k for k in set(full["state"]) | set(ablated["state"]) if k.startswith(prefixes)} if prefixes else set()
    differing = {k for k in inside if k not in full["state"] or k not in ablated["state"]
                 or full["state"][k].shape != ablated["state"][k].shape}  # fmt: skip
    assert bool(differing) == bool(prefixes), f"{arm}: the switched part {prefixes} is the same network"
    # Same optimisers, hyperparameters (lr, momentum, weight decay ...) and schedule, over the same parameters.
    assert ablated["optimizers"] == full["optimizers"] and ablated["schedule"] == full["schedule"], arm
    for full_groups, arm_groups in zip(full["groups"], ablated["groups"], strict=True):
        for (full_hp, full_params), (arm_hp, arm_params) in zip(full_groups, arm_groups, strict=True):
            assert arm_hp == full_hp, arm
            assert _outside(arm_params, prefixes) == _outside(full_params, prefixes), arm
    # The map rule is the full method's, unless it is the switch, or the arm is read against a partner.
    if switch not in MAP_SWITCHES and ablated["map_rule"] != full["map_rule"]:
        partner = ARMS[arm].get("partner")
        assert partner, f"{arm} also changes the map rule ({full['map_rule']} -> {ablated['map_rule']}): name a partner"
        assert _built(partner)["map_rule"] == ablated["map_rule"], f"{arm}'s partner {partner} has another map rule"


@pytest.mark.parametrize("arm", sorted(name for name in ARMS if SWITCHED[_switch(name)] == ()))
def test_a_switch_without_weights_changes_the_map_or_the_loss(arm: str) -> None:
    """Same weights in both: the arm's map or its training loss differs from the full method's."""
    full = _built(ARMS[arm]["method"])["model"].eval()
    ablated = _built(arm)["model"].eval()
    ablated.load_state_dict(full.state_dict())
    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        maps = full(images).anomaly_map, ablated(images).anomaly_map
        if torch.allclose(*maps):
            batch = {"image": images, "clean_image": torch.rand_like(images),
                     "mask": (torch.rand(2, 1, 64, 64) > 0.8).float()}  # fmt: skip
            assert not torch.allclose(full.losses(batch)["loss"], ablated.losses(batch)["loss"]), arm
