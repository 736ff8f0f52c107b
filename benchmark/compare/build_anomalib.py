"""anomalib's side of a worker: its model of each pair and its MVTecAD, on the chosen images.

Imported only in a worker running anomalib's side (``.venv-compare``): it needs anomalib.
Post-processor, evaluator and visualiser are disabled on every model so that its raw scores
and maps are what gets scored (see the package docstring, "Same raw outputs").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .offline_weights import check_backbone_weights
from .pairs import CompareError, check_anomalib_fixed
from .worker import WORKER_PREFIX

_DISABLED = {"post_processor": False, "evaluator": False, "visualizer": False}


def _pre_processor(spec: dict[str, Any], backbone: str | None) -> Any:
    """Resize to the comparison's size (no 224 crop), then ``backbone``'s normalisation if any."""
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from adbench.models.weights import default_normalisation

    size = (spec["image_size"], spec["image_size"])
    steps = [Resize(size, antialias=True)]
    if backbone is not None:  # None for DRAEM: anomalib's Draem refuses Normalize
        mean, std = default_normalisation(backbone)
        steps.append(Normalize(mean=list(mean), std=list(std)))
    return PreProcessor(transform=Compose(steps))


def _patchcore(spec: dict[str, Any], backbone: str) -> tuple[Any, Any, dict[str, Any]]:
    from anomalib.models import Patchcore

    names = spec["anomalib_layers"]
    model = Patchcore(
        backbone=backbone, layers=names, pre_trained=True,
        coreset_sampling_ratio=spec["coreset_ratio"],
        num_neighbors=spec["our_init_args"].get("num_neighbors", 9),
        pre_processor=_pre_processor(spec, backbone), **_DISABLED,
    )  # fmt: skip
    extractor = model.model.feature_extractor
    notes = {
        "model": f"Patchcore(backbone={backbone}, layers={names}, coreset_sampling_ratio="
                 f"{spec['coreset_ratio']}, num_neighbors={model.model.num_neighbors})",
        "embedding": f"{sum(extractor.out_dims)}-d",
    }  # fmt: skip
    return model, extractor, notes


def _stfpm(spec: dict[str, Any], backbone: str) -> tuple[Any, Any, dict[str, Any]]:
    import torch
    from anomalib.models import Stfpm

    names = spec["anomalib_layers"]
    cls = Stfpm
    notes = {"optimizer": "anomalib's own: SGD lr 0.4, momentum 0.9, weight decay 1e-3"}
    if spec["stfpm_optimizer"] == "matched":
        # anomalib's SGD lr 0.4 is tuned for ResNet-18 and diverges for depthwise students.
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
                return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

        cls = MatchedStfpm
        notes["optimizer"] = (f"ours (matched): {'Adam' if use_adam else 'SGD'} lr {lr:g}, "
                              f"weight decay {weight_decay:g}")  # fmt: skip
    model = cls(
        backbone=backbone, layers=names, pre_processor=_pre_processor(spec, backbone), **_DISABLED
    )
    notes["model"] = f"Stfpm(backbone={backbone}, layers={names})"
    return model, model.model.teacher_model, notes


def _padim(spec: dict[str, Any], backbone: str) -> tuple[Any, Any, dict[str, Any]]:
    from anomalib.models import Padim

    from adbench.models.padim import random_channel_subset

    names, ours = spec["anomalib_layers"], spec["our_init_args"]
    check_anomalib_fixed("padim", ours)
    model = Padim(
        backbone=backbone, layers=names, pre_trained=True, n_features=ours["channels"],
        pre_processor=_pre_processor(spec, backbone), **_DISABLED,
    )  # fmt: skip
    inner = model.model
    total, native = inner.n_features_original, inner.idx.clone()
    # Ours: random.Random(seed).sample(range(total), channels); anomalib: torch.randperm(total)[:n]
    # from the global torch RNG (the worker's seed, after the backbone's construction).
    subset = random_channel_subset(total, ours["channels"], ours["seed"])
    shared = len(set(subset.tolist()) & set(native.tolist()))
    if spec["padim_subset"] == "matched":
        inner.idx = subset  # the same channels as ours (their order does not change a distance)
        channels = (f"ours (matched): {ours['channels']} of {total}, random.Random({ours['seed']}); "
                    f"anomalib's own torch.randperm draw would share {shared} of them")  # fmt: skip
    else:
        channels = (f"anomalib's own: torch.randperm, {ours['channels']} of {total}; {shared} shared "
                    f"with ours (random.Random({ours['seed']}))")  # fmt: skip
    notes = {
        "model": f"Padim(backbone={backbone}, layers={names}, n_features={inner.n_features})",
        "channels": channels,
    }
    return model, inner.feature_extractor, notes


def _fastflow(spec: dict[str, Any], backbone: str) -> tuple[Any, Any, dict[str, Any]]:
    import timm
    from anomalib.models import Fastflow
    from anomalib.models.image.fastflow import lightning_model as fastflow_module
    from anomalib.models.image.fastflow.anomaly_map import AnomalyMapGenerator
    from anomalib.models.image.fastflow.torch_model import FastflowModel, create_fast_flow_block
    from torch import nn

    ours = spec["our_init_args"]
    check_anomalib_fixed("fastflow", ours)

    class TimmCnnFastflowModel(FastflowModel):
        """anomalib's FastflowModel, its CNN branch statement for statement, for any timm CNN.

        anomalib 2.7.0 takes only resnet18 and wide_resnet50_2 as CNN backbones (a name check);
        its CNN branch itself is backbone-agnostic: timm out_indices [1, 2, 3], a LayerNorm over
        (C, H, W) per level, and one flow per level.
        """

        def __init__(self, input_size: tuple[int, int], backbone: str, pre_trained: bool = True,
                     flow_steps: int = 8, conv3x3_only: bool = False, hidden_ratio: float = 1.0) -> None:  # fmt: skip
            nn.Module.__init__(self)
            self.input_size = input_size
            self.feature_extractor = timm.create_model(
                backbone, pretrained=pre_trained, features_only=True, out_indices=[1, 2, 3]
            )
            channels = self.feature_extractor.feature_info.channels()
            scales = self.feature_extractor.feature_info.reduction()
            dims = [[c, int(input_size[0] / s), int(input_size[1] / s)]
                    for c, s in zip(channels, scales, strict=True)]  # fmt: skip
            self.norms = nn.ModuleList(nn.LayerNorm(d, elementwise_affine=True) for d in dims)
            for parameter in self.feature_extractor.parameters():
                parameter.requires_grad = False
            self.fast_flow_blocks = nn.ModuleList(
                create_fast_flow_block(
                    input_dimensions=d,
                    conv3x3_only=conv3x3_only,
                    hidden_ratio=hidden_ratio,
                    flow_steps=flow_steps,
                )  # fmt: skip
                for d in dims
            )
            self.anomaly_map_generator = AnomalyMapGenerator(input_size=input_size)

    settings = {k: ours[k] for k in ("flow_steps", "conv3x3_only", "hidden_ratio")}
    fastflow_module.FastflowModel = TimmCnnFastflowModel
    try:
        model = Fastflow(backbone=backbone, pre_trained=True, **settings,
                         pre_processor=_pre_processor(spec, backbone), **_DISABLED)  # fmt: skip
    finally:
        fastflow_module.FastflowModel = FastflowModel
    notes = {
        "model": f"Fastflow(backbone={backbone}, {', '.join(f'{k}={v}' for k, v in settings.items())}), "
                 "CNN branch rebuilt for a timm backbone other than resnet18 / wide_resnet50_2",
        "optimizer": "anomalib's own: Adam lr 0.001, weight decay 1e-5 (= ours)",
    }  # fmt: skip
    return model, model.model, notes


def _efficientad(spec: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    import torch

    from .efficientad_teacher import (
        anomalib_teacher_file,
        check_penalty_folder,
        check_teacher_weights,
    )

    ours = spec["our_init_args"]
    check_anomalib_fixed("efficientad", ours)
    # platformdirs (anomalib's get_pretrained_weights_dir) reads XDG_CACHE_HOME at each call: this worker's
    # private cache, where the main process wrote our teacher as anomalib's file (no download).
    os.environ["XDG_CACHE_HOME"] = spec["anomalib_cache_home"]
    from anomalib.models import EfficientAd
    from anomalib.utils.path import get_pretrained_weights_dir

    size = ours["model_size"]
    expected = anomalib_teacher_file(spec["anomalib_cache_home"], size)
    looked = get_pretrained_weights_dir() / expected.parent.name / expected.name
    if looked.resolve() != expected.resolve() or not expected.is_file():
        raise CompareError(f"anomalib reads its EfficientAd teacher from {looked}, ours is at {expected}")

    class QuantilesFromTrainingEfficientAd(EfficientAd):
        """anomalib's EfficientAd; with no validation split its map quantiles would stay unset (raw maps):
        measured, as anomalib's on_validation_start does, on the training images, after training, as ours."""

        def on_train_end(self) -> None:
            was_training = self.training
            self.eval()
            with torch.no_grad():
                self.model.quantiles.update(self.map_norm_quantiles(self.trainer.datamodule.train_dataloader()))
            self.train(was_training)

    model = QuantilesFromTrainingEfficientAd(
        imagenet_dir=spec["penalty_root"], teacher_out_channels=ours["out_channels"], model_size=size,
        lr=ours["lr"], weight_decay=ours["weight_decay"], padding=False, pad_maps=True,
        pre_processor=_pre_processor(spec, None), **_DISABLED,
    )  # fmt: skip
    model.prepare_pretrained_model()  # on_train_start loads the same file again
    notes = {
        "model": f"EfficientAd(model_size={size}, teacher_out_channels={ours['out_channels']}, lr={ours['lr']}, "
                 f"weight_decay={ours['weight_decay']}, imagenet_dir={spec['penalty_root']}), map quantiles "
                 "measured on the training images after training (no validation split)",
        "teacher_check": check_teacher_weights(model.model.teacher, ours["teacher_weights"], size,
                                               ours["out_channels"], ours["width"]),
        "penalty_images": check_penalty_folder(spec["penalty_root"]),
        "lr_schedule": "anomalib's StepLR(step_size=0.95 x steps) is returned without interval 'step', so "
                       "Lightning steps it once per epoch: the lr never drops within these steps (ours drops "
                       "x 0.1 for the last 5 % of the steps)",
    }  # fmt: skip
    print(f"{WORKER_PREFIX} teacher check passed: {notes['teacher_check']}", flush=True)
    return model, None, notes


def _glass(spec: dict[str, Any], backbone: str) -> tuple[Any, Any, dict[str, Any]]:
    import torch
    from anomalib.models import Glass

    from adbench.models.weights import default_normalisation

    from .textures import check_texture_files

    ours = spec["our_init_args"]
    check_anomalib_fixed("glass", ours)
    size = spec["image_size"]
    settings = {
        "pretrain_embed_dim": ours["pretrain_embed_dimension"], "target_embed_dim": ours["target_embed_dimension"],
        "discriminator_layers": ours["discriminator_layers"], "discriminator_hidden": ours["discriminator_hidden"],
        "learning_rate": ours["adaptor_lr"], "step": ours["ascent_steps"], "gaussian_noise_std": ours["noise_std"],
        "focal_loss_quantile_threshold": ours["mining_fraction"], "mining": ours["gradient_ascent"],
    }  # fmt: skip
    # patchsize 3: our locally aware patches average 3 x 3 neighbourhoods; one linear adaptor (pre_projection 1);
    # svd 0: the "manifold" projection around each normal feature, the only one ours implements.
    model = Glass(
        input_shape=(size, size), anomaly_source_path=spec["texture_root"], backbone=backbone,
        layers=spec["anomalib_layers"], pre_trained=True, patchsize=3, patchstride=1, pre_projection=1, svd=0,
        **settings, pre_processor=_pre_processor(spec, backbone), **_DISABLED,
    )  # fmt: skip
    extractor = model.model.forward_modules["feature_aggregator"]
    # Its synthesis undoes the pre-processor's Normalize (read at construction) to blend in [0, 1] pixels.
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in default_normalisation(backbone))
    undone = (model.model._img_mean.flatten(), model.model._img_std.flatten())
    if not (torch.allclose(undone[0], mean) and torch.allclose(undone[1], std)):
        raise CompareError(f"anomalib's Glass undoes the normalisation {undone}, the images have {(mean, std)}")
    textures = check_texture_files(spec["texture_root"], model.model.augmentor.anomaly_source_paths)
    print(f"{WORKER_PREFIX} texture check passed: {textures}", flush=True)
    notes = {
        "model": f"Glass(input_shape=({size}, {size}), backbone={backbone}, layers={spec['anomalib_layers']}, "
                 f"{', '.join(f'{k}={v}' for k, v in settings.items())}, patchsize=3, pre_projection=1, svd=0)",
        "fixed": "ascent step 0.001, projection onto [0.5, 1] every 5 steps, a patch anomalous when any pixel of its "
                 "cell is masked, focal gamma 2, adaptor weight decay 1e-5, discriminator lr 2 x adaptor lr, map "
                 "sigma 4 (pairs.ANOMALIB_FIXED: our side's ascent step, radius and patch labels are set to these)",
        "local_synthesis": f"anomalib's PerlinAnomalyGenerator(probability=1, dual_mask=True): every training image, "
                           "one Perlin mask or (half the time) the union of two, texture weight U(0.2, 1) inside it; "
                           f"textures: {textures}",
        "centre": "anomalib recomputes the normal features' centre (one pass over the training images) at each epoch "
                  "start; only its hypersphere projection (svd=1) reads it: part of its fit time",
    }  # fmt: skip
    return model, extractor, notes


def _draem(spec: dict[str, Any], work_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    import torch
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
        model = Draem(dtd_dir=dtd, pre_processor=_pre_processor(spec, None),
                      **_DISABLED)  # fmt: skip
    finally:
        draem_module.DraemModel = DraemModel
    widths = (
        model.model.reconstructive_subnetwork.encoder.block1[0].out_channels,
        model.model.discriminative_subnetwork.encoder_segment.block1[0].out_channels,
    )
    if widths != (recon, disc):
        raise CompareError(f"anomalib's Draem has widths {widths}, expected {(recon, disc)}")
    notes = {
        "model": f"Draem(dtd_dir={spec['texture_root'] or 'none (Perlin noise)'}), widths {recon}/{disc}"
    }
    return model, None, notes


def _datamodule(spec: dict[str, Any]) -> Any:
    """anomalib's MVTecAD on the comparison's images, all of train/good, no validation split."""
    from anomalib.data import MVTecAD

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

    return ComparisonMVTecAD(
        root=spec["root"], category=spec["category"], train_batch_size=spec["batch_size"],
        eval_batch_size=spec["eval_batch_size"], num_workers=spec["num_workers"],
        val_split_mode="none", seed=spec["seed"],
    )  # fmt: skip


def build_anomalib(spec: dict[str, Any], work_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """anomalib's model, DataModule and notes for the report, as a worker ``spec`` describes them.

    Stops with :class:`~.offline_weights.WeightsMismatchError` unless the model's pretrained
    backbone holds exactly our ImageNet weights.
    """
    kind = spec["kind"]
    backbone = spec["our_init_args"].get("backbone")
    if kind == "patchcore":
        model, extractor, notes = _patchcore(spec, backbone)
    elif kind == "stpm":
        model, extractor, notes = _stfpm(spec, backbone)
    elif kind == "padim":
        model, extractor, notes = _padim(spec, backbone)
    elif kind == "fastflow":
        model, extractor, notes = _fastflow(spec, backbone)
    elif kind == "draem":
        model, extractor, notes = _draem(spec, work_dir)
    elif kind == "efficientad":
        model, extractor, notes = _efficientad(spec)
    elif kind == "glass":
        model, extractor, notes = _glass(spec, backbone)
    else:  # pragma: no cover - METHODS only has the kinds above
        raise CompareError(f"unknown method kind {kind!r}")

    if extractor is not None:
        notes["weights_check"] = check_backbone_weights(extractor.feature_extractor, backbone)
        print(f"{WORKER_PREFIX} weights check passed: {notes['weights_check']}", flush=True)
    return model, _datamodule(spec), notes
