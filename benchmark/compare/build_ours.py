"""Our side of a worker: our model from its config and our MVTec DataModule, on the chosen images."""

from __future__ import annotations

import importlib
import os
from typing import Any


def restrict_dataset(dataset: Any, keep: list[str] | None) -> None:
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


def _short_args(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in args.items())


def build_ours(spec: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Our model, DataModule and notes for the report, as a worker ``spec`` describes them."""
    from adbench.datamodules.mvtec import MVTecDataModule

    module_name, class_name = spec["our_class_path"].rsplit(".", 1)
    model = getattr(importlib.import_module(module_name), class_name)(**spec["our_init_args"])

    train_paths, test_paths = spec["train_paths"], spec["test_paths"]

    class ComparisonDataModule(MVTecDataModule):
        """Our DataModule, restricted to the images the comparison chose (``--max-*-images``)."""

        def setup(self, stage: str | None = None) -> None:
            super().setup(stage)
            restrict_dataset(self.train_set, train_paths)
            restrict_dataset(self.test_set, test_paths)

    # val_fraction=0: train on all of train/good, as anomalib's MVTecAD does (see the package docs). No validation,
    # so no texture classes are held out for it: the synthesis draws from every texture, as anomalib's does.
    data = ComparisonDataModule(
        root=spec["root"], category=spec["category"], image_size=spec["image_size"],
        batch_size=spec["batch_size"], eval_batch_size=spec["eval_batch_size"],
        num_workers=spec["num_workers"], val_fraction=0.0, split_seed=spec["seed"],
        texture_source=spec["texture_root"] or "procedural", validation_anomalies=False, validation_textures="shared",
        preload=True,  # restrict_dataset cuts the decoded arrays
    )  # fmt: skip
    notes: dict[str, Any] = {
        "model": f"{spec['our_class_path']}({_short_args(spec['our_init_args'])})"
    }
    pair = getattr(model, "pair", None)
    backbone = (getattr(model, "backbone", None) or getattr(pair, "teacher", None)
                or getattr(model, "teacher", None) or getattr(model, "feature_extractor", None))  # fmt: skip
    if backbone is not None and hasattr(backbone, "weights_source"):
        notes["weights"] = backbone.weights_source
    if spec["kind"] == "efficientad":
        # Our teacher from the file the main process wrote (anomalib's holds the same tensors), by SHA-256.
        notes["teacher"] = (f"{spec['our_init_args']['teacher_weights']} (sha256 "
                            f"{spec['our_init_args']['teacher_sha256'][:12]}), not distilled in this worker")
        notes["map_quantiles"] = "no validation split: measured on the training images after training"
    if spec["kind"] == "glass":
        notes["local_synthesis"] = (f"the DataModule's DRAEM recipe (datamodules/synthesis.py) on textures from "
                                    f"{spec['texture_root']}: half of the training images, one Perlin mask, image "
                                    "weight U(0, 0.8) inside it")
    if spec["kind"] == "patchcore":
        notes["embedding"] = f"{spec['our_init_args']['target_embed_dimension']}-d"
    return model, data, notes
