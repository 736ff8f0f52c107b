"""``python -m adbench.benchmark.compare``: the arguments, and the main process that prepares the
data and the offline weights, runs one worker per (method, side), scores them and writes the report."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .offline_weights import DEFAULT_HF_CACHE, offline_hf_env, write_timm_hf_cache
from .pairs import METHODS, REPO, SIDES, CompareError, check_anomalib_fixed, require_anomalib
from .report import build_table, markdown_report, table_markdown
from .scoring import (
    GroundTruth,
    deltas_from_predictions,
    load_ground_truth,
    metrics_from_predictions,
)
from .worker import json_default, run_worker_process, worker_main, worker_specs

# --------------------------------------------------------------------------- arguments


def _int_pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two comma-separated integers, got {text!r}"
        ) from None
    if a < 1 or b < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return a, b


def _name_list(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        if names == ["all"]:
            return list(choices)
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {unknown or text!r}; choose from {', '.join(choices)}"
            )
        return names

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m adbench.benchmark.compare",
        description="Our methods against anomalib 2.7.0's: same data, backbone, weights, image size "
        "and budget; fit time, steps/s, test images/s, peak RSS and metrics (ours, on raw scores).",
    )
    parser.add_argument("--root", help="MVTec AD root (default: the embedded dataset, no download)")
    parser.add_argument("--category", help="category (default: bottle with --root, else weave)")
    parser.add_argument("--methods", type=_name_list(tuple(METHODS)), default=list(METHODS),
                        help=f"comma-separated, or 'all' (default): {', '.join(METHODS)}")  # fmt: skip
    parser.add_argument("--sides", type=_name_list(SIDES), default=list(SIDES),
                        help="ours,anomalib (default both)")  # fmt: skip
    parser.add_argument("--texture-root", help="DTD folder: DRAEM's pseudo-anomalies, EfficientAD's penalty "
                        "images and GLASS's local-synthesis textures (both sides)")  # fmt: skip
    parser.add_argument("--image-size", type=_positive_int, default=256)
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="training batch size")
    parser.add_argument("--eval-batch-size", type=_positive_int, default=8)
    parser.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader workers (both sides)"
    )
    parser.add_argument("--stpm-epochs", type=_positive_int, default=10)
    parser.add_argument("--fastflow-epochs", type=_positive_int, default=10,
                        help="epochs of each FastFlow (configs/fastflow/quick.yaml: 10)")  # fmt: skip
    parser.add_argument("--glass-epochs", type=_positive_int, default=12,
                        help="epochs of each GLASS (configs/glass/quick.yaml: 12)")  # fmt: skip
    parser.add_argument(
        "--draem-steps", type=_positive_int, default=10, help="optimizer steps of each DRAEM"
    )
    parser.add_argument("--draem-width", type=_int_pair, default=(128, 64),
                        help="reconstructive,discriminative base widths (anomalib's: 128,64)")  # fmt: skip
    parser.add_argument("--efficientad-steps", type=_positive_int,
                        help="optimizer steps of each EfficientAD, batch 1 (default: the quick profile's, "
                        "max_epochs x train images // its batch size)")  # fmt: skip
    parser.add_argument("--efficientad-distill-steps", type=_positive_int,
                        help="steps of our teacher's distillation, done once for both sides (default: the "
                        "profile's distill_steps; cached in its teacher_cache)")  # fmt: skip
    parser.add_argument("--stfpm-optimizer", choices=("matched", "native"), default="matched",
                        help="anomalib Stfpm's optimizer: ours (matched, default) or its SGD lr 0.4")  # fmt: skip
    parser.add_argument("--padim-subset", choices=("matched", "native"), default="matched",
                        help="anomalib Padim's random channels: ours (matched, default) or its own "
                        "torch.randperm draw")  # fmt: skip
    parser.add_argument(
        "--max-train-images", type=_positive_int, help="evenly spaced subset of train/good"
    )
    parser.add_argument(
        "--max-test-images", type=_positive_int, help="evenly spaced subset of the test set"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=_positive_int, help="torch threads in each worker (default: torch's)"
    )
    parser.add_argument(
        "--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu)"
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds before a worker is killed (default: none)"
    )
    parser.add_argument("--hf-cache", default=str(DEFAULT_HF_CACHE),
                        help="private Hugging Face cache for the offline timm weights")  # fmt: skip
    parser.add_argument(
        "--out-dir", help="default results/compare (results/compare/smoke with --quick-smoke)"
    )
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild compare.md/.csv from the runs already in --out-dir (no training)")
    parser.add_argument("--profile-steps", type=_positive_int,
                        help="torch.profiler over this many training steps on each side (after 3 warm-up steps); "
                        "the report shows where a step's time goes (default: off)")
    parser.add_argument("--bootstrap-resamples", type=_positive_int, default=1000,
                        help="paired bootstrap resamples of the metric differences (default 1000)")
    parser.add_argument("--quick-smoke", action="store_true",
                        help="tiny end-to-end check: 64 px, 16 train / 12 test images, 1 STPM, FastFlow and GLASS "
                        "epoch, 2 DRAEM steps at widths 16,16, 2 EfficientAD steps (teacher distilled 2 steps; 256 px when "
                        "EfficientAD runs: anomalib's autoencoder needs 256), 1 thread (explicit options still win)")  # fmt: skip
    args = parser.parse_args(argv)
    explicit = {
        a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")
    }
    if args.quick_smoke:
        smoke = {"image_size": 64, "max_train_images": 16, "max_test_images": 12, "stpm_epochs": 1,
                 "fastflow_epochs": 1, "glass_epochs": 1, "draem_steps": 2, "draem_width": (16, 16), "threads": 1,
                 "efficientad_steps": 2, "efficientad_distill_steps": 2}  # fmt: skip
        if "efficientad" in args.methods:  # anomalib's encoder ends in an 8x8 conv on image_size / 32
            smoke["image_size"] = 256
        for key, value in smoke.items():
            if "--" + key.replace("_", "-") not in explicit:
                setattr(args, key, value)
    if args.out_dir is None:
        args.out_dir = "results/compare/smoke" if args.quick_smoke else "results/compare"
    return args


# --------------------------------------------------------------------------- main process


def pick_evenly(items: list[Any], count: int | None) -> list[Any]:
    """``count`` items spread evenly over ``items`` (all when ``count`` is None or large enough)."""
    if count is None or count >= len(items):
        return list(items)
    if count < 1:
        raise CompareError("image counts must be positive")
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


@dataclass
class _Plan:
    """Everything the runs need, prepared before the first worker starts."""

    root: str
    category: str
    train_paths: list[str]
    test_paths: list[str]
    specs: list[dict[str, Any]]
    env: dict[str, str]
    truth: GroundTruth
    out_dir: Path
    run_dir: Path


def _prepare(args: argparse.Namespace) -> _Plan:
    """Check anomalib, find the data, choose the images, write the offline weights, read the truth."""
    if "anomalib" in args.sides:
        require_anomalib()
    from adbench.datamodules import MVTecDataModule
    from adbench.datamodules.embedded import ensure_embedded_dataset
    from adbench.datamodules.embedded_render import EMBEDDED_CATEGORIES

    root = str(Path(args.root).expanduser().resolve()) if args.root else str(ensure_embedded_dataset())
    category = args.category or ("bottle" if args.root else EMBEDDED_CATEGORIES[0])
    data = MVTecDataModule(root=root, category=category)
    if args.texture_root and not Path(args.texture_root).is_dir():
        raise CompareError(f"--texture-root {args.texture_root!r} is not a folder")
    train_all = [str(s.image_path) for s in data.train_samples(category)]
    test_all = [str(s.image_path) for s in data.test_samples(category)]
    train_paths = pick_evenly(train_all, args.max_train_images)
    test_paths = pick_evenly(test_all, args.max_test_images)
    out_dir = Path(args.out_dir)
    run_dir = out_dir / "runs"
    if "efficientad" in args.methods and args.efficientad_steps is None:
        args.efficientad_steps = efficientad_quick_steps(len(train_paths))
    specs = worker_specs(args, root, category,
                         None if len(train_paths) == len(train_all) else train_paths,
                         None if len(test_paths) == len(test_all) else test_paths, run_dir)  # fmt: skip
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    backbones = {s["our_init_args"]["backbone"] for s in specs if s["our_init_args"].get("backbone")}
    if backbones:
        for backbone in sorted(backbones):
            path = write_timm_hf_cache(backbone, args.hf_cache)
            print(f"[compare] offline timm weights for {backbone}: {path}")
        env.update(offline_hf_env(args.hf_cache))  # both sides get the same environment
    if any(spec["kind"] == "efficientad" for spec in specs):
        _prepare_efficientad(args, specs, run_dir)
    if any(spec["kind"] == "glass" for spec in specs):
        _prepare_glass(args, specs, run_dir)
    truth = load_ground_truth(root, category, args.image_size, test_paths)
    return _Plan(root, category, train_paths, test_paths, specs, env, truth, out_dir, run_dir)


def efficientad_quick_steps(train_images: int) -> int:
    """The quick profile's optimiser steps on ``train_images`` images: max_epochs x (images // batch size)."""
    import yaml

    profile = yaml.safe_load((REPO / METHODS["efficientad"].our_config).read_text())
    return int(profile["trainer"]["max_epochs"]) * max(1, train_images // int(profile["data"]["batch_size"]))


def _prepare_efficientad(args: argparse.Namespace, specs: list[dict[str, Any]], run_dir: Path) -> None:
    """One teacher and one penalty folder for both sides of the EfficientAD pair, written before any worker.

    The penalty folder is ``--texture-root`` (else procedural textures written once as an ImageFolder); our
    teacher is distilled once (or read from the profile's teacher_cache) and written as our file and as
    anomalib's ``pretrained_teacher_<size>.pth`` under a private ``XDG_CACHE_HOME``; our side then loads the
    file by path and SHA-256, so neither worker distils and neither side downloads."""
    import time

    from .efficientad_teacher import check_pdn_architecture, check_penalty_folder, prepare_teacher
    from .textures import write_procedural_textures

    ours = [s for s in specs if s["kind"] == "efficientad"]
    init_args = dict(ours[0]["our_init_args"])
    check_anomalib_fixed("efficientad", init_args)
    if args.image_size < 256:
        raise CompareError(f"--image-size {args.image_size}: anomalib's EfficientAd needs at least 256 px (its "
                           "autoencoder's encoder ends in an 8x8 convolution on image_size / 32)")  # fmt: skip
    if "anomalib" in args.sides:  # a PDN anomalib cannot hold stops the run before the distillation
        import torch
        from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel

        from adbench.models.efficientad import PDN

        with torch.device("meta"):
            theirs = EfficientAdModel(init_args["out_channels"], init_args["model_size"]).teacher
            mine = PDN(init_args["model_size"], init_args["out_channels"], init_args["width"])
        check_pdn_architecture(mine, theirs, init_args["model_size"])
    penalty = args.texture_root or str(write_procedural_textures(run_dir / "penalty-images"))
    print(f"[compare] EfficientAD penalty images: {check_penalty_folder(penalty)}", flush=True)
    if args.efficientad_distill_steps is not None:
        init_args["distill_steps"] = args.efficientad_distill_steps
    start = time.perf_counter()
    cache_home = run_dir / "anomalib-cache"
    teacher, sha256, theirs_file = prepare_teacher(ours[0]["our_class_path"], init_args, penalty,
                                                   run_dir / "efficientad-teacher", cache_home)  # fmt: skip
    print(f"[compare] EfficientAD teacher ({init_args['distill_steps']} distillation steps, or cached) in "
          f"{time.perf_counter() - start:.0f} s: {teacher} (sha256 {sha256[:12]}), anomalib's {theirs_file}",
          flush=True)  # fmt: skip
    for spec in ours:
        spec["our_init_args"].update(teacher_weights=str(teacher.resolve()), teacher_sha256=sha256,
                                     penalty_source=str(Path(penalty).resolve()),
                                     distill_steps=init_args["distill_steps"])  # fmt: skip
        spec["penalty_root"] = str(Path(penalty).resolve())
        spec["anomalib_cache_home"] = str(cache_home.resolve())


def _prepare_glass(args: argparse.Namespace, specs: list[dict[str, Any]], run_dir: Path) -> None:
    """One texture folder for both sides' local synthesis: ``--texture-root``, else procedural textures written once
    (anomalib's Glass would otherwise blend its Perlin noise, ours procedural textures); anomalib's fixed settings
    are checked before any worker starts."""
    from adbench.datamodules.synthesis import FolderTextures

    from .textures import write_procedural_textures

    ours = [s for s in specs if s["kind"] == "glass"]
    check_anomalib_fixed("glass", ours[0]["our_init_args"])
    textures = Path(args.texture_root or write_procedural_textures(run_dir / "glass-textures")).resolve()
    print(f"[compare] GLASS local-synthesis textures: {len(FolderTextures(textures))} images of {textures}", flush=True)
    for spec in ours:
        spec["texture_root"] = str(textures)


def _run(spec: dict[str, Any], plan: _Plan, timeout: float | None, label: str) -> dict[str, Any]:
    """One worker, then our metrics of its predictions; a failure is recorded, never raised."""
    print(f"[compare] {label} starting", flush=True)
    record = run_worker_process(spec, plan.run_dir, plan.env, timeout, label)
    if record.get("status") == "ok":
        try:
            record["metrics"] = metrics_from_predictions(spec["predictions"], plan.truth)
        except CompareError as error:
            record.update(status="failed", error=str(error))
    if record.get("status") == "ok":
        m = record["metrics"]
        print(f"[compare] {label} done in {record['worker_seconds']:.0f} s: fit {record['fit_seconds']:.1f} s, "
              f"image AUROC {m['image_auroc']:.4f}, pixel AUROC {m['pixel_auroc']:.4f}, PRO {m['pro']:.4f}",
              flush=True)  # fmt: skip
    else:
        print(f"[compare] {label} FAILED: {record.get('error')} (log: {record.get('log')})", flush=True)
    return record


def _previous_results(run_dir: Path, plan: _Plan) -> list[dict[str, Any]]:
    """The worker records of an earlier run (``--report-only``), rescored by today's metrics."""
    path = run_dir / "all_results.json"
    if not path.is_file():
        raise CompareError(f"--report-only: no earlier run in {run_dir} ({path.name} is missing)")
    predictions = _predictions(plan)
    results = [r for r in json.loads(path.read_text()) if (r["method"], r["side"]) in predictions]
    for record in results:
        if record.get("status") == "ok":
            record["metrics"] = metrics_from_predictions(predictions[record["method"], record["side"]], plan.truth)
    return results


def _predictions(plan: _Plan) -> dict[tuple[str, str], str]:
    return {(spec["method"], spec["side"]): spec["predictions"] for spec in plan.specs}


def _paired_deltas(results: list[dict[str, Any]], plan: _Plan,
                   args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """Per method whose two sides both ran: ours - anomalib per metric with its paired interval."""
    ok, predictions = {(r["method"], r["side"]) for r in results if r.get("status") == "ok"}, _predictions(plan)
    deltas = {}
    for method in dict.fromkeys(r["method"] for r in results):
        if {(method, "ours"), (method, "anomalib")} <= ok:
            print(f"[compare] {method}: paired bootstrap of ours - anomalib ({args.bootstrap_resamples} resamples)",
                  flush=True)  # fmt: skip
            deltas[method] = deltas_from_predictions(predictions[method, "ours"], predictions[method, "anomalib"],
                                                     plan.truth, args.bootstrap_resamples, args.seed)  # fmt: skip
    return deltas


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["worker"]:  # the subprocess side of the protocol (worker.py)
        return worker_main(argv[1:])
    args = parse_args(argv)
    command = shlex.join(
        getattr(sys, "orig_argv", None) or [sys.executable, "-m", "adbench.benchmark.compare", *argv]
    )
    try:
        plan = _prepare(args)
    except (CompareError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    out_dir, run_dir, specs = plan.out_dir, plan.run_dir, plan.specs
    print(f"[compare] {plan.root} / {plan.category}: {len(plan.train_paths)} train, "
          f"{len(plan.test_paths)} test images, {args.image_size} px; {len(specs)} run(s), "
          f"one process each -> {out_dir}")  # fmt: skip
    if args.report_only:
        results = _previous_results(run_dir, plan)
    else:
        results = [_run(spec, plan, args.timeout, f"({i}/{len(specs)}) {spec['method']} / {spec['side']}:")
                   for i, spec in enumerate(specs, 1)]  # fmt: skip
    deltas = _paired_deltas(results, plan, args)

    table = build_table(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["key"]).to_csv(out_dir / "compare.csv", index=False)
    report = markdown_report(table, results, args, plan.root, plan.category,
                             len(plan.train_paths), len(plan.test_paths), command, deltas)  # fmt: skip
    (out_dir / "compare.md").write_text(report)
    (run_dir / "all_results.json").write_text(json.dumps(results, indent=2, default=json_default))
    print()
    print(table_markdown(table, results))
    print(f"\n[compare] wrote {out_dir / 'compare.csv'} and {out_dir / 'compare.md'}")
    return 0 if all(r.get("status") == "ok" for r in results) else 1
