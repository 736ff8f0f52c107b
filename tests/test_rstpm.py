"""RSTPM: the modules its paper's figures draw, the test-time product, two-stage training, one-idea ablations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning import Callback, LightningModule, Trainer, seed_everything

from adbench.callbacks.evaluation import NOT_READY_SCORE, AnomalyEvaluator
from adbench.cli import AnomalyCLI
from adbench.models import create_model
from adbench.models.backbones import FeatureExtractor
from adbench.models.distillation import StudentTeacherPair, fuse_maps, normalized_l2_distance
from adbench.models.rstpm import RSTPM, DecoderStudent
from adbench.models.stpm import STPM
from adbench.models.unet import UNet

from .conftest import REPO
from .helpers import (
    SIZE,
    assert_bf16_training_is_finite,
    fit_and_test,
    small_datamodule,
    step_trainer,
)

pytestmark = pytest.mark.usefixtures("one_thread")
LITE0, LITE2 = "tf_efficientnet_lite0", "tf_efficientnet_lite2"  # offline ImageNet weights


def _tiny(**kwargs: Any) -> RSTPM:
    # 64 px, a 4-stage discriminator of width 8: the paper's code path at toy size; one student epoch.
    defaults = dict(teacher1=LITE0, teacher2=LITE2, student_optimizer="adam", student_lr=1e-3,
                    student_weight_decay=0.0, disc_base_width=8, disc_depth=4, disc_lr=1e-3, student_epochs=1)  # fmt: skip
    return RSTPM(**{**defaults, **kwargs})


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _record_inputs(module: torch.nn.Module, seen: list[tuple[torch.Tensor, ...]]) -> None:
    module.register_forward_pre_hook(lambda _, args: seen.append(args))


# ---------------------------------------------------------------------- the architecture


def test_modules_are_those_of_the_paper_figures() -> None:
    model = create_model("rstpm", teacher1=LITE0, teacher2=LITE2)
    assert isinstance(model, RSTPM) and RSTPM.needs_pseudo_anomalies
    assert RSTPM.paper_results == {"image_auroc": 0.987, "pixel_auroc": 0.985, "pro": 0.951}
    defaults = RSTPM.__init__.__defaults__  # the paper's networks are the constructor's defaults
    assert defaults[:2] == ("resnet18", "resnet50")
    # Pair 1: STPM's pair, a frozen pretrained teacher and a random student of its architecture, levels 1-3,
    # the teacher also giving its deepest feature (level 4) for Student2.
    pair1 = model.pair1
    assert isinstance(pair1, StudentTeacherPair) and pair1.layers == (1, 2, 3) and pair1.extra_layers == (4,)
    assert pair1.teacher.name == LITE0 and "package" in pair1.teacher.weights_source
    assert pair1.student.weights_source == "random initialisation" and pair1.student.layers == (1, 2, 3)
    assert not any(p.requires_grad for p in pair1.teacher.parameters())
    # Pair 2: a DIFFERENT, larger pretrained teacher, and a decoder student (not an encoder copy).
    assert model.teacher2.name == LITE2 and "package" in model.teacher2.weights_source
    assert model.teacher2.layers == (1, 2, 3) and model.teacher2.channels != pair1.teacher.channels[:3]
    teacher1_same_levels = FeatureExtractor(LITE0, (1, 2, 3), weights="random")
    assert _count(model.teacher2) > 1.2 * _count(teacher1_same_levels)  # larger at the same levels
    assert not any(p.requires_grad for p in model.teacher2.parameters())
    student2 = model.student2
    assert isinstance(student2, DecoderStudent) and len(student2.stages) == 3
    assert student2.stages[0][1][0].in_channels == pair1.teacher.channels[3]  # fed by Teacher1's deepest
    # Attention per stage: 3x3 conv -> BN -> ReLU -> 1x1 conv (one channel) -> sigmoid, on Teacher2's width.
    for attention, channels in zip(student2.attention, model.teacher2.channels[::-1], strict=True):
        conv, norm, relu = attention.body
        assert (conv.kernel_size, conv.in_channels) == ((3, 3), channels)
        assert isinstance(norm, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
        assert attention.logit.kernel_size == (1, 1) and attention.logit.out_channels == 1
    # Discriminator: DRAEM's discriminative U-Net (6 stages b..8b, skips) on THREE channels.
    disc = model.discriminative
    assert isinstance(disc, UNet) and disc.decoder.skip
    assert disc.encoder.widths == [64, 128, 256, 512, 512, 512]
    assert disc.encoder.stages[0][0][0].in_channels == 3
    assert model.final_map == "product" and model.hparams.training == "two-stage"


def test_student2_reads_teacher1_deepest_and_attends_with_teacher2() -> None:
    model = _tiny().eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    student_inputs: list[tuple[torch.Tensor, ...]] = []
    attention_inputs: list[tuple[torch.Tensor, ...]] = []
    _record_inputs(model.student2, student_inputs)
    for attention in model.student2.attention:
        _record_inputs(attention, attention_inputs)
    with torch.no_grad():
        model(images)
        teacher1_all = model.pair1.teacher(images)
        teacher2 = model.teacher2(images)
    torch.testing.assert_close(student_inputs[0][0], teacher1_all[3])  # level 4, stride 32
    assert student_inputs[0][0].shape[-1] == SIZE // 32
    # Coarse to fine: attention k sees Teacher2's level 3, 2, 1 of the same image.
    for seen, expected in zip(attention_inputs, teacher2[::-1], strict=True):
        torch.testing.assert_close(seen[0], expected)


def test_discriminator_sees_the_per_scale_sums_and_final_map_is_the_product() -> None:
    model = _tiny().eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    disc_inputs: list[tuple[torch.Tensor, ...]] = []
    _record_inputs(model.discriminative, disc_inputs)
    with torch.no_grad():
        anomaly_map, score = model(images)
        teacher1 = model.pair1.teacher(images)[:3]
        omega_1_3 = [normalized_l2_distance(t, s) for t, s in zip(teacher1, model.pair1.student(images), strict=True)]
        teacher2 = model.teacher2(images)
        reconstructed = model.student2(model.pair1.teacher(images)[3], teacher2)
        omega_6_4 = [normalized_l2_distance(t, s) for t, s in zip(teacher2, reconstructed, strict=True)]
        discriminator_map = torch.sigmoid(model.discriminative(disc_inputs[0][0]))
        stpm_map = fuse_maps(omega_1_3, (SIZE, SIZE), "product")
    expected = torch.cat(
        [fuse_maps([omega_1_3[i], omega_6_4[i]], (SIZE, SIZE), "sum") for i in range(3)], dim=1
    )  # (Omega1 + Omega6, Omega2 + Omega5, Omega3 + Omega4)
    assert disc_inputs[0][0].shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(disc_inputs[0][0], expected)
    assert not torch.allclose(omega_1_3[0], omega_6_4[0], rtol=0.1, atol=0.0)  # two different pairs
    torch.testing.assert_close(anomaly_map, stpm_map * discriminator_map)
    torch.testing.assert_close(score, anomaly_map.flatten(1).amax(dim=1))


def test_pair_one_is_stpm() -> None:
    """Pair 1 is STPM's pair: with STPM's weights, RSTPM's STPM map is STPM's map."""
    stpm = STPM(backbone=LITE0).eval()
    model = _tiny(final_map="stpm").eval()
    own = model.pair1.state_dict()
    shared = {k: v for k, v in stpm.pair.state_dict().items() if k in own and v.shape == own[k].shape}
    assert {k for k in own if k.startswith("student.")} <= set(shared)
    model.pair1.load_state_dict(shared, strict=False)
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ours, theirs = model(images), stpm(images)
    torch.testing.assert_close(ours.anomaly_map, theirs.anomaly_map)
    torch.testing.assert_close(ours.image_score, theirs.image_score)


@pytest.mark.parametrize(
    ("final_map", "discriminator"),
    [("discriminator", True), ("stpm", True), ("pairs", True), ("pairs", False), ("stpm", False)],
)
def test_other_fusions(final_map: str, discriminator: bool) -> None:
    model = _tiny(final_map=final_map, discriminator=discriminator).eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        anomaly_map, score = model(images)
        maps1, maps2 = model.level_maps(images)
        scales = RSTPM.scale_maps(maps1, maps2, (SIZE, SIZE))
    expected = {
        "stpm": fuse_maps(maps1, (SIZE, SIZE), "product"),
        "pairs": scales.prod(dim=1, keepdim=True),
    }
    if discriminator:
        with torch.no_grad():
            expected["discriminator"] = torch.sigmoid(model.discriminative(scales))
    torch.testing.assert_close(anomaly_map, expected[final_map])
    torch.testing.assert_close(score, anomaly_map.flatten(1).amax(dim=1))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="final_map"):
        _tiny(final_map="max")
    with pytest.raises(ValueError, match="needs the discriminator"):
        _tiny(discriminator=False, final_map="product")
    with pytest.raises(ValueError, match="training"):
        _tiny(training="alternating")
    with pytest.raises(ValueError, match="optimizer"):
        _tiny(student_optimizer="rmsprop")


# ---------------------------------------------------------------------- ablations: one idea each


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("switch", "removed_or_changed"),
    [
        ({"second_pair": False}, ("teacher2.", "student2.", "pair1.teacher.")),
        ({"attention": False}, ("student2.attention.",)),
        ({"discriminator": False}, ("discriminative.",)),
        ({"teacher2": LITE0}, ("teacher2.", "student2.")),
    ],
)
def test_each_ablation_changes_only_its_part(switch: dict[str, Any], removed_or_changed: tuple[str, ...]) -> None:
    full, arm = _shapes(_tiny()), _shapes(_tiny(**switch))
    differing = {k for k in set(full) | set(arm) if full.get(k) != arm.get(k)}
    assert differing, "the switch changed nothing"
    assert all(k.startswith(removed_or_changed) for k in differing), sorted(differing)[:5]
    # Everything else (students, discriminator widths, teachers' distilled levels) is the same network.
    assert full["pair1.student.body.conv_stem.weight"] == arm["pair1.student.body.conv_stem.weight"]
    if "discriminator" not in switch:
        assert {k: v for k, v in full.items() if k.startswith("discriminative.")} == {
            k: v for k, v in arm.items() if k.startswith("discriminative.")
        }
    if "second_pair" in switch:  # Teacher1 stops at level 3: only the deepest stage goes
        extra = {k for k in differing if k.startswith("pair1.teacher.")}
        assert extra and all(k.startswith("pair1.teacher.body.blocks.") for k in extra)


def test_map_arms_switch_the_final_map_alone() -> None:
    """The sweep's map arms keep the discriminator (same modules, same two stages; tests/test_ablation_arms.py)
    and change the final map only: ``stpm`` is pair 1's product map, ``pairs`` the pairs' per-scale fusion."""
    import yaml

    sweep = yaml.safe_load((REPO / "configs" / "sweeps" / "ablations.yaml").read_text())
    profile = yaml.safe_load((REPO / "configs" / "rstpm" / "quick.yaml").read_text())
    arms = {name: v["overrides"] for name, v in sweep["variants"].items() if v["method"] == "rstpm"}
    assert arms["rstpm-stpm-map"] == {"model.init_args.final_map": "stpm"}
    assert arms["rstpm-pairs-fusion-map"] == {"model.init_args.final_map": "pairs"}
    assert "rstpm-no-discriminator" not in arms  # renamed: it also removed the discriminator and its epochs
    assert arms["rstpm-same-teacher"]["model.init_args.teacher2"] == profile["model"]["init_args"]["teacher1"]
    torch.manual_seed(0)
    full = _tiny().eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        maps1, maps2 = full.level_maps(images)
        product = full(images).anomaly_map
        for final_map, expected in (("stpm", fuse_maps(maps1, (SIZE, SIZE), "product")),
                                    ("pairs", full.scale_maps(maps1, maps2, (SIZE, SIZE)).prod(1, keepdim=True))):
            arm = _tiny(final_map=final_map).eval()
            arm.load_state_dict(full.state_dict())  # the same networks, the discriminator included
            torch.testing.assert_close(arm(images).anomaly_map, expected)
            assert not torch.allclose(arm(images).anomaly_map, product)


# ---------------------------------------------------------------------- training


class _Snapshots(Callback):
    """The model's state dict at the end of every training epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    names = {"pair1.student": "student1", "pair1.teacher": "teacher1", "student2": "student2",
             "teacher2": "teacher2", "discriminative": "discriminator"}  # fmt: skip
    moved = set()
    for key, value in after.items():
        if not torch.equal(value, before[key]):
            moved |= {short for prefix, short in names.items() if key.startswith(prefix + ".")}
    return moved


def _fit_epochs(
    model: RSTPM, root: Path, epochs: int, callbacks: Sequence[Callback] = ()
) -> tuple[Trainer, _Snapshots]:
    snapshots = _Snapshots()
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=2, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[snapshots, *callbacks],
    )  # fmt: skip
    trainer.fit(model, datamodule=small_datamodule(root))
    return trainer, snapshots


def test_two_stages_students_then_discriminator(embedded_root: Path) -> None:
    seed_everything(0, verbose=False)
    model = _tiny(student_epochs=1)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.stage == "students" and not model.ready_for_selection
    trainer, snapshots = _fit_epochs(model, embedded_root, epochs=2)
    first, second = snapshots.states
    assert _moved(initial, first) == {"student1", "student2"}  # stage 1: the students on clean images
    assert _moved(first, second) == {"discriminator"}  # stage 2: students frozen (BatchNorm statistics too)
    assert model.stage == "discriminator" and model.ready_for_selection
    assert trainer.global_step == 4  # one optimiser step per batch
    assert len(trainer.optimizers) == 2 and isinstance(trainer.optimizers[0], torch.optim.Adam)


def test_joint_training_moves_every_network_every_epoch(embedded_root: Path) -> None:
    seed_everything(0, verbose=False)
    model = _tiny(training="joint")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    _, snapshots = _fit_epochs(model, embedded_root, epochs=1)
    assert _moved(initial, snapshots.states[0]) == {"student1", "student2", "discriminator"}
    assert model.ready_for_selection


def test_students_learn_from_clean_images_only(embedded_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny(training="joint")
    seen: list[torch.Tensor] = []
    original = model.student_losses
    monkeypatch.setattr(model, "student_losses", lambda clean: (seen.append(clean), original(clean))[1])
    data = small_datamodule(embedded_root, pseudo_anomalies=True)
    trainer = step_trainer(1)
    batches: list[dict[str, torch.Tensor]] = []

    class Keep(Callback):
        def on_train_batch_start(self, trainer: Trainer, module: LightningModule, batch: Any, idx: int) -> None:
            batches.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})

    trainer.callbacks.append(Keep())
    trainer.fit(model, datamodule=data)
    assert not torch.equal(batches[0]["image"], batches[0]["clean_image"])  # pseudo-anomalies present
    torch.testing.assert_close(seen[0], batches[0]["clean_image"])


@pytest.mark.slow
def test_discriminator_lr_follows_draems_schedule_over_its_epochs(embedded_root: Path) -> None:
    seed_everything(0, verbose=False)
    model = _tiny(student_epochs=2, disc_lr=1e-3)
    lrs: list[float] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer: Trainer, module: LightningModule, *args: Any) -> None:
            lrs.append(trainer.optimizers[1].param_groups[0]["lr"])

    _fit_epochs(model, embedded_root, epochs=12, callbacks=[Record()])
    disc_epochs = lrs[2 * 2:]  # 2 batches an epoch; 10 discriminator epochs
    # 80 % and 90 % of the 10 discriminator epochs: x0.2 from its 9th epoch, x0.04 in its 10th.
    assert disc_epochs[:16] == [pytest.approx(1e-3)] * 16
    assert disc_epochs[16:18] == [pytest.approx(2e-4)] * 2
    assert disc_epochs[18:] == [pytest.approx(4e-5)] * 2


def test_student_stage_is_never_the_selected_checkpoint(embedded_root: Path) -> None:
    seed_everything(0, verbose=False)
    evaluator = AnomalyEvaluator(pixel_metrics=False)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=2, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[evaluator],
    )  # fmt: skip
    data = small_datamodule(embedded_root)
    data.val_fraction = 0.2
    trainer.fit(_tiny(student_epochs=1), datamodule=data)
    first, second = evaluator.val_history
    assert first["selection_score"] == NOT_READY_SCORE and math.isfinite(first["image_auroc"])
    # A real score: without pixel metrics the selection score is the validation image AUROC.
    assert second["selection_score"] == pytest.approx(second["image_auroc"])


def test_warns_when_the_discriminator_gets_no_epochs(embedded_root: Path) -> None:
    with pytest.warns(UserWarning, match="discriminator stays untrained"):
        _fit_epochs(_tiny(student_epochs=3), embedded_root, epochs=2)


def test_ablations_selectable_from_yaml(embedded_root: Path, tmp_path: Path) -> None:
    args = [
        "--config", str(REPO / "configs" / "rstpm" / "quick.yaml"), f"--data.root={embedded_root}",
        "--data.category=weave", f"--trainer.default_root_dir={tmp_path}",
        "--model.init_args.second_pair=false", "--model.init_args.discriminator=false",
    ]  # fmt: skip
    cli = AnomalyCLI(args=args, run=False)
    assert isinstance(cli.model, RSTPM) and cli.model.student2 is None and cli.model.discriminative is None
    default = AnomalyCLI(args=args[:5], run=False)  # the profile as written: the full method
    assert default.model.student2 is not None and default.model.discriminative is not None
    assert default.model.teacher2.name == LITE2 and default.model.pair1.teacher.name == LITE0


@pytest.mark.slow
def test_separates_embedded_defects_after_brief_training(embedded_root: Path) -> None:
    # 3 student epochs + 5 discriminator epochs (7 batches each) at 64 px on weave. Measured
    # (results/test_quality.jsonl, tests/measure_quality.sh, 2026-12-05, dataset v2): pixel AUROC
    # 0.815-0.863, image AUROC 0.789-0.836 over seeds 0-2; another machine saw pixel 0.796 on
    # dataset v1 (issue 22). Bounds a tenth below the lowest value seen; chance is 0.5.
    _, metrics = fit_and_test(lambda: _tiny(student_epochs=3), embedded_root, steps=8 * 7, max_epochs=8)
    assert metrics["pixel_auroc"] > 0.7, metrics
    assert metrics["image_auroc"] > 0.68, metrics


@pytest.mark.slow
def test_bf16_mixed_training_is_finite(embedded_root: Path) -> None:
    # Joint training steps both optimisers on every batch (Lightning counts two steps): 2 batches.
    assert_bf16_training_is_finite(
        lambda: _tiny(training="joint"), embedded_root, logged=("train/loss", "train/stpm", "train/focal"), steps=4
    )
