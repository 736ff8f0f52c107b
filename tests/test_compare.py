"""benchmark/compare/ without anomalib: the offline timm weights, the weight check, metrics on
raw predictions, the table, the arguments and the error when anomalib is missing.

anomalib itself lives in ``.venv-compare`` (``make compare``); none of these tests needs it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from adbench.benchmark.compare import cli, pairs
from adbench.benchmark.compare.build_ours import restrict_dataset
from adbench.benchmark.compare.cli import parse_args, pick_evenly
from adbench.benchmark.compare.offline_weights import (
    WeightsMismatchError,
    check_backbone_weights,
    offline_hf_env,
    write_timm_hf_cache,
)
from adbench.benchmark.compare.pairs import (
    METHODS,
    AnomalibMissingError,
    CompareError,
    check_anomalib_fixed,
    layer_names,
    our_init_args,
    require_anomalib,
)
from adbench.benchmark.compare.report import (
    build_table,
    deltas_markdown,
    format_table,
    table_markdown,
)
from adbench.benchmark.compare.scoring import (
    DELTA_KEYS,
    deltas_from_predictions,
    load_ground_truth,
    metrics_from_predictions,
)
from adbench.benchmark.compare.worker import _trainer_kwargs, worker_specs
from adbench.datamodules.base import AnomalyDataset
from adbench.datamodules.mvtec import list_test_samples

REPO = Path(__file__).resolve().parents[1]
LITE0 = "tf_efficientnet_lite0"


# ------------------------------------------------------------------ anomalib missing


def test_missing_anomalib_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pairs, "_find_spec", lambda name: None)
    with pytest.raises(AnomalibMissingError, match=r"make compare") as info:
        require_anomalib()
    assert ".venv-compare" in str(info.value) and "--sides ours" in str(info.value)


def test_main_without_anomalib_exits_before_any_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(pairs, "_find_spec", lambda name: None)
    assert cli.main(["--methods", "stpm", "--out-dir", str(tmp_path / "out")]) == 2
    assert "make compare" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ offline weights


@pytest.mark.slow
def test_hf_cache_gives_timm_our_weights_offline(tmp_path: Path) -> None:
    cache = tmp_path / "hf-hub"
    path = write_timm_hf_cache(LITE0, cache)
    repo = cache / "models--timm--tf_efficientnet_lite0.in1k"
    commit = (repo / "refs" / "main").read_text()
    assert path == repo / "snapshots" / commit / "model.safetensors" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert (
        write_timm_hf_cache(LITE0, cache) == path and path.stat().st_mtime_ns == stamp
    )  # unchanged

    # What the anomalib worker does: a fresh process, offline, pretrained=True from the cache only.
    script = (
        "import huggingface_hub, timm\n"
        "from huggingface_hub import constants\n"
        "from adbench.benchmark.compare.offline_weights import check_backbone_weights\n"
        "assert constants.HF_HUB_OFFLINE\n"
        "where = huggingface_hub.hf_hub_download('timm/tf_efficientnet_lite0.in1k', 'model.safetensors')\n"
        "print('FILE', where)\n"
        "m = timm.create_model('tf_efficientnet_lite0', pretrained=True, pretrained_cfg=None,\n"
        "                      features_only=True, exportable=True, out_indices=[2, 3])\n"
        "print('CHECK', check_backbone_weights(m, 'tf_efficientnet_lite0'))\n"
    )
    env = {**os.environ, **offline_hf_env(cache), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"FILE {cache}" in done.stdout
    assert "CHECK 288 backbone tensors identical to ours" in done.stdout


def test_weight_check_fails_loudly_on_other_weights() -> None:
    from adbench.models.weights import resolve_state_dict

    model = timm.create_model(LITE0, pretrained=False, features_only=True, out_indices=[2, 3])
    with pytest.raises(WeightsMismatchError, match="differs from ours"):
        check_backbone_weights(model, LITE0)  # random initialisation
    ours, _ = resolve_state_dict(LITE0)
    model.load_state_dict({k: ours[k] for k in model.state_dict()})
    assert "identical" in check_backbone_weights(model, LITE0)
    with torch.no_grad():
        model.state_dict()["blocks.2.0.conv_pw.weight"].view(-1)[0] += 1e-6
    with pytest.raises(WeightsMismatchError, match="blocks.2.0.conv_pw.weight"):
        check_backbone_weights(model, LITE0)


# ------------------------------------------------------------------ metrics on raw predictions


def _test_paths(root: Path, count: int) -> list[str]:
    return pick_evenly([str(s.image_path) for s in list_test_samples(root / "weave")], count)


def test_metrics_use_our_ground_truth_matched_by_path(embedded_root: Path, tmp_path: Path) -> None:
    keep = _test_paths(embedded_root, 10)
    truth = load_ground_truth(str(embedded_root), "weave", 32, keep)
    assert len(truth.paths) == 10 and 0 < truth.labels.sum() < 10 and truth.masks.any()
    order = np.random.default_rng(0).permutation(10)  # workers may return any order
    file = tmp_path / "pred.npz"
    np.savez(
        file,
        paths=np.array(truth.paths)[order],
        scores=truth.labels[order].astype(np.float32),
        maps=truth.masks[order].astype(np.float32),
    )
    metrics = metrics_from_predictions(file, truth)
    assert metrics["image_auroc"] == 1.0 and metrics["pixel_auroc"] == 1.0
    assert metrics["pro"] == pytest.approx(1.0)

    np.savez(file, paths=np.array(truth.paths[:9]), scores=np.zeros(9, np.float32),
             maps=np.zeros((9, 32, 32), np.float32))  # fmt: skip
    with pytest.raises(CompareError, match="1 missing"):
        metrics_from_predictions(file, truth)


def test_paired_deltas_of_two_sides_and_their_verdicts(embedded_root: Path, tmp_path: Path) -> None:
    truth = load_ground_truth(str(embedded_root), "weave", 32, _test_paths(embedded_root, 16))
    rng = np.random.default_rng(0)
    perfect, noisy = tmp_path / "perfect.npz", tmp_path / "noisy.npz"
    np.savez(perfect, paths=np.array(truth.paths), scores=truth.labels.astype(np.float32),
             maps=truth.masks.astype(np.float32))  # fmt: skip
    np.savez(noisy, paths=np.array(truth.paths), scores=(truth.labels + rng.normal(0, 0.8, len(truth.paths))).astype(np.float32),
             maps=(truth.masks + rng.normal(0, 0.8, truth.masks.shape)).astype(np.float32))  # fmt: skip
    deltas = deltas_from_predictions(perfect, noisy, truth, n_resamples=100)
    assert set(deltas) == set(DELTA_KEYS)
    noisy_metrics = metrics_from_predictions(noisy, truth)
    for key, d in deltas.items():  # perfect - noisy: positive, and the point inside its interval
        assert d["delta"] == pytest.approx(1.0 - noisy_metrics[key], abs=1e-9)
        assert d["delta"] > 0 and d["low"] <= d["delta"] <= d["high"]
    assert deltas_from_predictions(noisy, noisy, truth, n_resamples=20)["pixel_ap"] == {"delta": 0.0, "low": 0.0, "high": 0.0}
    text = deltas_markdown({"padim": deltas, "fastflow": deltas_from_predictions(noisy, perfect, truth, n_resamples=100)})
    assert text.count("yes, better") == len(DELTA_KEYS) and text.count("**no**, worse") == len(DELTA_KEYS)
    rounding = {"pixel_auroc": {"delta": -2e-7, "low": -3e-7, "high": -1e-7}}
    assert "yes, equal" in deltas_markdown({"padim": rounding})


def test_restricting_our_dataset_keeps_the_chosen_images(embedded_root: Path) -> None:
    samples = list_test_samples(embedded_root / "weave")
    dataset = AnomalyDataset(samples, 32)
    keep = pick_evenly([str(s.image_path) for s in samples], 5)
    restrict_dataset(dataset, keep)
    assert [str(s.image_path) for s in dataset.samples] == keep
    assert len(dataset) == 5 and dataset.images.shape[0] == dataset.masks.shape[0] == 5
    assert dataset.labels.shape == (5,) and len(dataset.defect_types) == 5


# ------------------------------------------------------------------ the table


def _record(method: str, side: str, status: str = "ok", **values: float) -> dict:
    metrics = {k: values.pop(k) for k in ("image_auroc", "pixel_auroc", "pro") if k in values}
    return {"method": method, "side": side, "status": status, "metrics": metrics,
            "cuda_peak_mb": math.nan, "error": None if status == "ok" else "boom", **values}  # fmt: skip


def test_table_ratios_rows_and_failures() -> None:
    results = [
        _record(
            "patchcore_1pct",
            "ours",
            fit_seconds=10.0,
            train_images_per_second=30.0,
            test_images_per_second=8.0,
            predict_seconds=12.0,
            peak_rss_mb=1000.0,
            image_auroc=0.99,
            pixel_auroc=0.98,
            pro=0.9,
        ),  # fmt: skip
        _record(
            "patchcore_1pct",
            "anomalib",
            fit_seconds=20.0,
            train_images_per_second=15.0,
            test_images_per_second=4.0,
            predict_seconds=24.0,
            peak_rss_mb=2000.0,
            image_auroc=0.99,
            pixel_auroc=0.97,
            pro=0.8,
        ),  # fmt: skip
        _record(
            "stpm",
            "ours",
            fit_seconds=100.0,
            optimizer_steps=260,
            steps_per_second=2.6,
            test_images_per_second=10.0,
            predict_seconds=9.0,
            peak_rss_mb=1500.0,
            image_auroc=1.0,
            pixel_auroc=0.99,
            pro=0.95,
        ),  # fmt: skip
        _record("stpm", "anomalib", status="failed"),
        _record("padim", "ours", fit_seconds=5.0, train_images_per_second=40.0),
        _record("fastflow", "ours", fit_seconds=50.0, optimizer_steps=260, steps_per_second=5.2),
    ]
    table = build_table(results)
    rows = {(r.method, r.quantity): r for r in table.itertuples()}
    # PaDiM collects features like PatchCore; FastFlow trains like STPM.
    assert ("padim", "feature collection images/s") in rows
    assert ("padim", "training steps/s") not in rows
    assert ("fastflow", "training steps/s") in rows and ("fastflow", "optimizer steps") in rows
    assert ("fastflow", "feature collection images/s") not in rows
    assert rows[("patchcore_1pct", "fit time (s)")].ratio == pytest.approx(0.5)
    assert rows[("patchcore_1pct", "feature collection images/s")].ratio == pytest.approx(2.0)
    assert rows[("patchcore_1pct", "PRO (FPR <= 0.3)")].ratio == pytest.approx(0.9 / 0.8)
    assert rows[("patchcore_1pct", "fit time (s)")].better == "lower"
    assert ("patchcore_1pct", "training steps/s") not in rows  # PatchCore trains nothing
    assert ("stpm", "training steps/s") in rows and (
        "stpm",
        "feature collection images/s",
    ) not in rows
    assert not any(q == "peak CUDA memory (MiB)" for _, q in rows)  # NaN on both sides: dropped
    assert math.isnan(rows[("stpm", "fit time (s)")].anomalib)
    assert math.isnan(rows[("stpm", "fit time (s)")].ratio)

    shown = format_table(table, results)
    stpm_fit = shown[(shown.method == "stpm") & (shown.quantity == "fit time (s)")].iloc[0]
    assert stpm_fit["anomalib"] == "failed" and stpm_fit["ours / anomalib"] == "n/a"
    auroc = shown[(shown.method == "patchcore_1pct") & (shown.quantity == "image AUROC")].iloc[0]
    assert auroc["ours"] == "0.9900" and auroc["ours / anomalib"] == "1.00x"
    markdown = table_markdown(table, results)
    assert "| patchcore_1pct |" in markdown and "0.9900" in markdown  # not re-parsed into 0.99
    json.dumps(table.drop(columns=["key"]).to_dict())  # plain values: the CSV/JSON writers cope


# ------------------------------------------------------------------ arguments


def test_arguments_and_quick_smoke() -> None:
    args = parse_args([])
    assert args.methods == list(METHODS) and args.sides == ["ours", "anomalib"]
    assert (args.image_size, args.batch_size, args.draem_width) == (256, 8, (128, 64))
    assert args.out_dir == "results/compare"
    assert args.fastflow_epochs == 10 and args.padim_subset == args.stfpm_optimizer == "matched"
    smoke = parse_args(["--quick-smoke", "--image-size", "96", "--methods", "stpm,draem"])
    assert smoke.image_size == 96 and smoke.stpm_epochs == 1 and smoke.draem_width == (16, 16)
    assert smoke.fastflow_epochs == 1
    assert smoke.methods == ["stpm", "draem"] and smoke.out_dir == "results/compare/smoke"
    for bad in (["--methods", "patchcore"], ["--draem-width", "128"], ["--sides", "theirs"],
                ["--padim-subset", "mine"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_pick_evenly_spreads_over_the_list() -> None:
    items = list(range(10))
    assert pick_evenly(items, None) == items and pick_evenly(items, 20) == items
    assert pick_evenly(items, 5) == [0, 2, 4, 6, 8]
    with pytest.raises(CompareError):
        pick_evenly(items, 0)


def test_our_configs_match_anomalib_settings() -> None:
    """The pairs compare like with like: lite0 layers, anomalib's DRAEM widths, no lr decay."""
    _, patchcore = our_init_args(METHODS["patchcore_10pct"], (128, 64))
    assert patchcore["backbone"] == LITE0 and list(patchcore["layers"]) == [2, 3]
    assert patchcore["coreset_ratio"] == 0.1
    assert layer_names(LITE0, [2, 3]) == ["blocks.2", "blocks.4"]
    _, draem = our_init_args(METHODS["draem"], (128, 64))
    assert (draem["recon_base_width"], draem["disc_base_width"], draem["lr"]) == (128, 64, 1e-4)
    assert draem["lr_gamma"] == 1.0


def test_padim_and_fastflow_pairs_match_anomalib_settings(tmp_path: Path) -> None:
    """PaDiM and FastFlow: lite0 levels 1-3 on both sides, anomalib's fixed settings, the budgets."""
    import yaml

    _, padim = our_init_args(METHODS["padim"], (128, 64))
    _, fastflow = our_init_args(METHODS["fastflow"], (128, 64))
    for ours in (padim, fastflow):
        assert ours["backbone"] == LITE0 and list(ours["layers"]) == [1, 2, 3]
    assert layer_names(LITE0, [1, 2, 3]) == ["blocks.1", "blocks.2", "blocks.4"]
    check_anomalib_fixed("padim", padim)  # random subset, + 0.01 I, sigma 4
    check_anomalib_fixed("fastflow", fastflow)  # out_indices [1, 2, 3], clamp 2, Adam 1e-3 / 1e-5
    assert 0 < padim["channels"] <= 24 + 40 + 112  # n_features of anomalib's Padim
    with pytest.raises(CompareError, match=r"clamp: ours 3.0, anomalib 2.0"):
        check_anomalib_fixed("fastflow", {**fastflow, "clamp": 3.0})
    with pytest.raises(CompareError, match="random_channels"):
        check_anomalib_fixed("padim", {**padim, "random_channels": False})

    # The budgets: PaDiM one pass, FastFlow the quick profile's epochs (the --fastflow-epochs default).
    args = parse_args(["--methods", "padim,fastflow", "--sides", "ours,anomalib", "--image-size", "128"])
    specs = worker_specs(args, "root", "bottle", None, None, tmp_path)
    # FastFlow's per-position LayerNorm is built for the comparison's image size, not the profile's 256 px.
    assert specs[2]["our_init_args"]["norm_image_size"] == 128 and "norm_image_size" not in specs[0]["our_init_args"]
    assert [(s["method"], s["side"]) for s in specs] == [
        ("padim", "ours"), ("padim", "anomalib"), ("fastflow", "ours"), ("fastflow", "anomalib")
    ]  # fmt: skip
    assert all(s["anomalib_layers"] == ["blocks.1", "blocks.2", "blocks.4"] for s in specs)
    assert specs[1]["padim_subset"] == "matched"
    profile = yaml.safe_load((REPO / "configs/fastflow/quick.yaml").read_text())
    assert _trainer_kwargs(specs[0], tmp_path)["max_epochs"] == 1
    assert _trainer_kwargs(specs[3], tmp_path)["max_epochs"] == profile["trainer"]["max_epochs"]


# ------------------------------------------------------------------ EfficientAD


def test_efficientad_pair_matches_anomalib_settings(tmp_path: Path) -> None:
    """anomalib's PDN widths and 0.999 hard loss on our side; batch 1 and the quick profile's steps on both."""
    import yaml

    from adbench.benchmark.compare.cli import efficientad_quick_steps

    _, ours = our_init_args(METHODS["efficientad"], (128, 64))
    assert (ours["model_size"], ours["width"], ours["hard_quantile"], ours["pad_raw_maps"]) == ("small", 1.0, 0.999, True)
    check_anomalib_fixed("efficientad", ours)
    profile = yaml.safe_load((REPO / "configs/efficientad/quick.yaml").read_text())
    quick = profile["model"]["init_args"]
    # The quick profile itself is what anomalib cannot build: x0.25 widths, 0.9 hard quantile, the paper's map order.
    with pytest.raises(CompareError, match=r"width: ours 0.25, anomalib 1.0.*hard_quantile: ours 0.9.*pad_raw_maps: ours False"):
        check_anomalib_fixed("efficientad", quick)
    for change, message in (({"penalty": False}, "penalty"), ({"map_quantiles": [0.8, 0.995]}, "map_quantiles"),
                            ({"autoencoder": False}, "autoencoder"), ({"pad_raw_maps": False}, "pad_raw_maps")):  # fmt: skip
        with pytest.raises(CompareError, match=message):
            check_anomalib_fixed("efficientad", {**ours, **change})

    # bottle's 209 train images: 20 epochs x 26 batches of 8, the quick profile's optimizer steps.
    assert efficientad_quick_steps(209) == profile["trainer"]["max_epochs"] * (209 // 8) == 520
    args = parse_args(["--methods", "efficientad,stpm", "--efficientad-steps", "7"])
    specs = worker_specs(args, "root", "bottle", None, None, tmp_path)
    assert [(s["method"], s["side"], s["batch_size"]) for s in specs] == [
        ("efficientad", "ours", 1), ("efficientad", "anomalib", 1), ("stpm", "ours", 8), ("stpm", "anomalib", 8)
    ]  # fmt: skip
    bounds = _trainer_kwargs(specs[1], tmp_path)
    assert (bounds["max_epochs"], bounds["max_steps"]) == (-1, 7)
    smoke = parse_args(["--quick-smoke", "--methods", "efficientad"])
    assert smoke.image_size == 256 and smoke.efficientad_steps == 2  # anomalib's autoencoder needs 256 px
    assert parse_args(["--quick-smoke", "--methods", "stpm"]).image_size == 64


@pytest.mark.parametrize("size", ["small", "medium"])
def test_efficientad_teacher_keys_round_trip(size: str) -> None:
    """Our PDN's state dict onto anomalib's conv names and back, tensor for tensor; a foreign key is an error."""
    from adbench.benchmark.compare.efficientad_teacher import (
        ANOMALIB_PDN_CONVS,
        from_anomalib_pdn,
        to_anomalib_pdn,
    )
    from adbench.models.efficientad import PDN

    torch.manual_seed(0)
    state = PDN(size, 16, width=0.125).state_dict()
    theirs = to_anomalib_pdn(state, size)
    assert sorted({k.split(".")[0] for k in theirs}) == sorted(ANOMALIB_PDN_CONVS[size])
    assert theirs["conv1.weight"].shape == state["0.weight"].shape  # the first conv, 3 -> 16 at 4x4
    back = from_anomalib_pdn(theirs, size)
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    with pytest.raises(CompareError, match="expected"):
        to_anomalib_pdn({**state, "extra.weight": state["0.weight"]}, size)


ANOMALIB_PDN_SCRIPT = """
import torch
from PIL import Image
from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel
from adbench.benchmark.compare.efficientad_teacher import check_pdn_architecture, from_anomalib_pdn, to_anomalib_pdn
from adbench.benchmark.compare.pairs import CompareError
from adbench.models.efficientad import PDN
from adbench.models.weights import IMAGENET_NORMALISATION

for size in ("small", "medium"):
    theirs = EfficientAdModel(64, size).teacher.eval()
    torch.manual_seed(1)
    ours = PDN(size, 64, width=1.0).eval()
    check_pdn_architecture(ours, theirs, size)
    theirs.load_state_dict(to_anomalib_pdn(ours.state_dict(), size))
    back = from_anomalib_pdn(theirs.state_dict(), size)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET_NORMALISATION)
    image = torch.rand(1, 3, 80, 80)
    with torch.no_grad():
        diff = float((ours((image - mean) / std) - theirs(image)).abs().max())
    assert diff < 1e-4, diff
    try:
        check_pdn_architecture(PDN(size, 64, width=0.25), theirs, size)
    except CompareError as error:
        assert "convolution 1" in str(error) and "out_channels" in str(error), error
    else:
        raise AssertionError("a x0.25 PDN passed anomalib's architecture check")
print("ok")
"""


@pytest.mark.slow
def test_efficientad_teacher_loads_into_anomalibs_pdn() -> None:
    """anomalib's own PDN (the compare venv's anomalib) takes our teacher's tensors and gives our outputs."""
    python = REPO / ".venv-compare" / "bin" / "python"
    if not python.is_file():
        pytest.skip("no .venv-compare (make .venv-compare/.installed): anomalib is not importable")
    done = subprocess.run([str(python), "-c", ANOMALIB_PDN_SCRIPT], capture_output=True, text=True,
                          timeout=600, cwd=REPO)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ------------------------------------------------------------------ GLASS


def test_glass_pair_matches_anomalib_settings(tmp_path: Path) -> None:
    """lite0 levels 2-3 on both sides; anomalib's fixed step, radius and patch labels on ours; the profile's epochs."""
    import yaml

    _, ours = our_init_args(METHODS["glass"], (128, 64))
    assert ours["backbone"] == LITE0 and list(ours["layers"]) == [2, 3]
    assert (ours["ascent_step_size"], ours["projection_radius"], ours["mask_threshold"]) == (0.001, 0.5, 1e-6)
    check_anomalib_fixed("glass", ours)
    profile = yaml.safe_load((REPO / "configs/glass/quick.yaml").read_text())
    quick = profile["model"]["init_args"]
    # The quick profile itself is what anomalib cannot build: lite0-scaled step and radius, half-covered patches.
    with pytest.raises(CompareError, match=r"ascent_step_size: ours 0.0136.*projection_radius: ours 6.8.*mask_threshold"):
        check_anomalib_fixed("glass", quick)
    for change, message in (({"local_synthesis": False}, "local_synthesis"), ({"focal_gamma": 1.0}, "focal_gamma"),
                            ({"discriminator_lr": 1e-4}, r"discriminator_lr: ours 0.0001, anomalib 2 x adaptor_lr")):  # fmt: skip
        with pytest.raises(CompareError, match=message):
            check_anomalib_fixed("glass", {**ours, **change})

    args = parse_args(["--methods", "glass"])
    specs = worker_specs(args, "root", "bottle", None, None, tmp_path)
    assert [(s["method"], s["side"]) for s in specs] == [("glass", "ours"), ("glass", "anomalib")]
    assert all(s["anomalib_layers"] == ["blocks.2", "blocks.4"] for s in specs)
    assert _trainer_kwargs(specs[1], tmp_path)["max_epochs"] == profile["trainer"]["max_epochs"] == 12
    assert parse_args(["--quick-smoke", "--methods", "glass"]).glass_epochs == 1


def test_glass_patch_labels_match_anomalibs_rule() -> None:
    """mask_threshold 1e-6 on a binary mask: a patch is anomalous when any pixel of its cell is (anomalib's max-pool)."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from adbench.models.glass import GLASS

    torch.manual_seed(0)
    mask = (torch.rand(4, 1, 64, 64) > 0.995).float()  # scattered single pixels: the rules' hardest case
    mask[0] = 0.0
    fake = SimpleNamespace(hparams=SimpleNamespace(mask_threshold=1e-6))
    ours = GLASS.local_targets(fake, mask, (8, 8))
    anomalib = F.max_pool2d(mask, kernel_size=8).flatten()
    assert torch.equal(ours, anomalib) and 0 < ours.sum() < ours.numel()
    fake.hparams.mask_threshold = 0.5  # the quick profile's rule differs on those masks
    assert not torch.equal(GLASS.local_targets(fake, mask, (8, 8)), anomalib)


def test_texture_files_check_and_procedural_folder(tmp_path: Path) -> None:
    from adbench.benchmark.compare.textures import check_texture_files, write_procedural_textures

    folder = write_procedural_textures(tmp_path / "textures", count=3, size=16)
    files = sorted((folder / "procedural").glob("*.png"))
    assert len(files) == 3 and write_procedural_textures(folder, count=3, size=16) == folder  # written once
    assert check_texture_files(folder, files).startswith("3 images of")
    with pytest.raises(CompareError, match="ours draws from 3 images, anomalib's from 2"):
        check_texture_files(folder, files[:2])


def test_our_comparison_synthesis_draws_from_every_texture(embedded_root: Path, tmp_path: Path) -> None:
    """No validation split, so no texture classes held out: our training synthesis reads all the files anomalib reads."""
    from adbench.benchmark.compare.build_ours import build_ours
    from adbench.datamodules.synthesis import FolderTextures

    for name in ("a", "b", "c", "d", "e"):  # five texture classes: a held-out split would keep four
        (tmp_path / "dtd" / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), ord(name), np.uint8)).save(tmp_path / "dtd" / name / "0.jpg")
    args = parse_args(["--methods", "draem", "--sides", "ours", "--draem-width", "4,4", "--image-size", "32"])
    spec = worker_specs(args, str(embedded_root), "weave", None, None, tmp_path)[0]
    spec["texture_root"] = str(tmp_path / "dtd")
    _, data, _ = build_ours(spec)
    training, _ = data._synthesizers(np.zeros((1, 32, 32, 3), np.uint8))
    assert len(training.texture_source) == len(FolderTextures(tmp_path / "dtd")) == 5


ANOMALIB_GLASS_SCRIPT = """
import sys
from pathlib import Path
import torch
from adbench.benchmark.compare.build_anomalib import build_anomalib
from adbench.benchmark.compare.build_ours import build_ours
from adbench.benchmark.compare.cli import parse_args
from adbench.benchmark.compare.worker import worker_specs

root, textures, work = sys.argv[1:4]
args = parse_args(["--methods", "glass", "--image-size", "64"])
ours_spec, theirs_spec = worker_specs(args, root, "weave", None, None, Path(work))
for spec in (ours_spec, theirs_spec):
    spec["texture_root"] = textures
theirs, _, notes = build_anomalib(theirs_spec, Path(work))  # checks weights, textures, normalisation
ours = build_ours(ours_spec)[0]
assert "identical to ours" in notes["weights_check"] and "the same files" in notes["local_synthesis"], notes
inner = theirs.model
image = torch.rand(2, 3, 64, 64)
with torch.no_grad():
    features, shapes = inner.generate_embeddings(image, evaluation=True)
    mine, grid = ours.patch_features(image)
assert features.shape == mine.shape == (2 * 8 * 8, 256) and tuple(shapes[0]) == grid == (8, 8), (features.shape, mine.shape)
sizes = lambda m: sorted(tuple(p.shape) for p in m.parameters())
assert sizes(inner.projection) == sizes(ours.adaptor) and sizes(inner.discriminator) == sizes(ours.discriminator)
inner.center = torch.zeros(64, 256)
inner.train()
losses = inner(image)
assert all(torch.isfinite(v) for v in losses), losses
inner.eval()
out = inner(image)
assert out.pred_score.shape == (2,) and out.anomaly_map.shape == (2, 64, 64)
print("ok")
"""


@pytest.mark.slow
def test_anomalib_glass_takes_our_settings(embedded_root: Path, tmp_path: Path) -> None:
    """anomalib's Glass as the pair builds it (compare venv): our weights and textures, our patch grid, adaptor and
    discriminator shapes; one training and one test pass run."""
    from adbench.benchmark.compare.textures import write_procedural_textures

    python = REPO / ".venv-compare" / "bin" / "python"
    if not python.is_file():
        pytest.skip("no .venv-compare (make .venv-compare/.installed): anomalib is not importable")
    write_timm_hf_cache(LITE0, tmp_path / "hf-hub")
    textures = write_procedural_textures(tmp_path / "textures", count=4, size=64)
    env = {**os.environ, **offline_hf_env(tmp_path / "hf-hub")}
    done = subprocess.run([str(python), "-c", ANOMALIB_GLASS_SCRIPT, str(embedded_root), str(textures),
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=900, cwd=REPO, env=env)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_step_profiler_times_the_window_of_steps_by_operator_and_the_report_sets_sides_side_by_side(
    tmp_path: Path,
) -> None:
    from lightning import LightningModule, Trainer

    from adbench.benchmark.compare.report import profile_markdown
    from adbench.benchmark.compare.step_profiler import StepProfiler, kind_of

    class Tiny(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.conv(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(8, 3, 32, 32)), batch_size=1)
    profiler = StepProfiler(steps=3, out_dir=tmp_path, warmup=2)
    Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[profiler]).fit(Tiny(), data)  # fmt: skip
    summary = profiler.summary
    assert summary["steps"] == 3 and (tmp_path / "profile.txt").stat().st_size > 0
    assert summary["kinds"]["convolution"] > 0 and summary["kinds"]["optimiser"] > 0
    assert sum(summary["kinds"].values()) == pytest.approx(summary["operators_ms_per_step"])
    assert 0 < summary["operators_ms_per_step"] <= summary["wall_ms_per_step"] * 1.05
    assert kind_of("aten::convolution_backward") == "convolution" and kind_of("aten::relu") == "other"
    with pytest.raises(ValueError, match="steps >= 1"):
        StepProfiler(steps=0, out_dir=tmp_path)
    slower = {**summary, "wall_ms_per_step": 2 * summary["wall_ms_per_step"]}
    text = profile_markdown([{"method": "stpm", "side": "ours", "profile": summary},
                             {"method": "stpm", "side": "anomalib", "profile": slower}])  # fmt: skip
    assert "| wall time per step |" in text and "| 0.50 |" in text and "kind: convolution" in text
