"""Real-IAD (Wang et al., CVPR 2024, "Real-IAD: A Real-World Multi-View Dataset for Benchmarking
Versatile Industrial Anomaly Detection"): 30 objects, each sample photographed from 5 views (C1-C5).

The official layout (Tencent/AnomalyDetection_Real-IAD, README and ``datasets/explicit_dataset.py``)::

    ROOT/realiad_1024/<object>/...        images (and masks) of one resolution: realiad_256, realiad_512,
                                          realiad_1024 or realiad_raw (``resolution``)
    ROOT/realiad_jsons/<object>.json      the split (``split_folder``: also realiad_jsons_sv,
                                          realiad_jsons_fuiad_0.0 ... realiad_jsons_fuiad_0.4)

Files are named ``<object>_<4 digits>_<OK|NG>_C<view>_<timestamp>.jpg`` (the README's sample key
pattern), a mask the same with ``_mask.png``, in ``OK/S0001/`` or ``NG/<defect code>/S0001/``
folders (as anomalib 2.x's ``RealIAD`` describes them; only the JSON's paths are used).

A split file is ``{"meta": {"prefix": ..., "normal_class": "OK"}, "train": [...], "test": [...]}``;
each entry has the keys ``category``, ``anomaly_class`` (``OK`` or a defect code such as ``AK``),
``image_path`` and ``mask_path`` (``null`` when there is none), the paths relative to
``<images>/<meta.prefix>``. As the official loader reads it: every ``train`` entry is a training
image (label 0); a ``test`` entry is normal when its ``mask_path`` is ``null`` or its class is the
normal class (a view of a defective object in which the defect is not visible), defective otherwise.
Without ``meta`` (anomalib's test files) the prefix is the object's name and the normal class ``OK``.
The split JSONs are also found one folder deeper (``realiad_jsons/<split_folder>/``), where anomalib
expects them.

Multi-view: each item carries ``sample_id`` (the object photographed, by the official
``--sample_key_pat`` of the README: ``<object>_<4 digits>_<OK|NG>``) and ``view`` (``C1``...), so
that a report can aggregate an object's views (:func:`aggregate_views`, the maximum by default: the
sample-level S-AUROC of the paper). The validation split holds out whole objects (all their views)
from the training images, so that no object is both trained and validated on.

Our reading: ``defect_type`` of a defective image is its ``anomaly_class`` code as the JSON gives it;
a ``category`` key that names another object is refused; paths that leave the image folder are
refused. Real-IAD is distributed after an application, with no published checksum, so the suite does
not download it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .base import GOOD, AnomalyDataModule, AnomalyDataset, DatasetError, Sample, select_shots
from .registry import register_dataset

REAL_IAD_CATEGORIES: tuple[str, ...] = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts",
    "pcb", "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator",
    "rolled_strip_base", "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy",
    "toy_brick", "transistor1", "u_block", "usb", "usb_adaptor", "vcpill", "wooden_beads",
    "woodstick", "zipper",
)  # fmt: skip
RESOLUTIONS = ("256", "512", "1024", "raw")
#: The official sample key (README, ADEval's ``--sample_key_pat``): group 1 is the object photographed.
SAMPLE_KEY = re.compile(r"([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_(C[0-9])_")
REAL_IAD_SOURCE = "https://realiad4ad.github.io/Real-IAD"
TITLE = "Real-IAD"


def sample_key(path: str | Path) -> tuple[str, str]:
    """(sample id, view) of a Real-IAD image file, by the official key pattern; a name that does
    not follow it is its own sample (its folder and stem) with view ``""``."""
    path = Path(path)
    found = SAMPLE_KEY.search(path.name)
    if found:
        return found.group(1), found.group(2)
    return f"{path.parent.name}/{path.stem}", ""


@dataclass(frozen=True)
class ViewSample(Sample):
    """A :class:`Sample` that is one view of an object."""

    sample_id: str = ""
    view: str = ""


class MultiViewDataset(AnomalyDataset):
    """An :class:`AnomalyDataset` whose items also carry ``sample_id`` and ``view``."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        sample = self.samples[index]
        item["sample_id"] = getattr(sample, "sample_id", "") or sample_key(sample.image_path)[0]
        item["view"] = getattr(sample, "view", "")
        return item


def aggregate_views(
    sample_ids: Sequence[str],
    scores: Sequence[float],
    labels: Sequence[int],
    reduce: Callable[[np.ndarray], float] = np.max,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per object: (ids in first-seen order, ``reduce`` of its views' scores, 1 if any view is
    anomalous). The per-image test scores (``test_scores.csv``'s path gives the id by
    :func:`sample_key`) become sample-level ones."""
    if not len(sample_ids) == len(scores) == len(labels):
        raise ValueError(f"sample_ids, scores and labels differ in length: {len(sample_ids)}, {len(scores)}, "
                         f"{len(labels)}")
    groups: dict[str, list[int]] = {}
    for index, sample_id in enumerate(sample_ids):
        groups.setdefault(sample_id, []).append(index)
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    ids = list(groups)
    return (ids, np.array([float(reduce(scores[groups[i]])) for i in ids]),
            np.array([int(labels[groups[i]].max()) for i in ids], dtype=np.int64))


def split_by_sample(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded split into (train, validation) that keeps each object's views together: a
    ``val_fraction`` of the objects (rounded) is held out, all their views with them."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(getattr(sample, "sample_id", "") or sample_key(sample.image_path)[0], []).append(index)
    ids = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(ids))
    held = {index for i in order[: int(round(len(ids) * val_fraction))] for index in groups[ids[i]]}
    train = [s for i, s in enumerate(samples) if i not in held]
    val = [s for i, s in enumerate(samples) if i in held]
    if not train:
        raise DatasetError(f"val_fraction={val_fraction} leaves no training images")
    return train, val


@register_dataset("real_iad")
class RealIADDataModule(AnomalyDataModule):
    """Real-IAD: one object (or several, or ``"all"``: the paper's unified setting); see the module
    docstring for the layout and our choices, :class:`AnomalyDataModule` for the shared arguments.
    ``root`` is the folder holding ``realiad_<resolution>/`` and ``realiad_jsons/``.

    Args:
        resolution: which image folder is read: ``256``, ``512``, ``1024`` (default) or ``raw``.
        split_folder: the folder of split JSONs: ``realiad_jsons`` (multi-view, default),
            ``realiad_jsons_sv`` (single view), ``realiad_jsons_fuiad_0.1`` ... (noisy training sets).
    """

    categories = REAL_IAD_CATEGORIES
    title = TITLE

    def __init__(self, *args: Any, resolution: str | int = "1024", split_folder: str = "realiad_jsons",
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.resolution = str(resolution)
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
        self.split_folder = split_folder

    @property
    def real_iad_root(self) -> Path:
        """The folder holding the image folders and the split JSONs."""
        return super().dataset_root

    @property
    def dataset_root(self) -> Path:
        """The image folder of the chosen resolution (its sub-folders are the objects)."""
        images = self.real_iad_root / f"realiad_{self.resolution}"
        if not images.is_dir() and self.real_iad_root.is_dir():
            present = sorted(p.name for p in self.real_iad_root.glob("realiad_*") if p.is_dir())
            raise FileNotFoundError(f"missing {TITLE} image folder {str(images)!r} (resolution={self.resolution!r}); "
                                    f"folders there: {', '.join(present) or 'none'}")
        return images

    def split_file(self, category: str) -> Path:
        """``category``'s split JSON (``<root>/<split_folder>/<category>.json``, or one folder deeper)."""
        root = self.real_iad_root
        candidates = [root / self.split_folder / f"{category}.json",
                      root / "realiad_jsons" / self.split_folder / f"{category}.json"]
        for path in candidates:
            if path.is_file():
                return path
        raise FileNotFoundError(f"missing {TITLE} split file {str(candidates[0])!r} (nor at {str(candidates[1])!r}); "
                                f"extract realiad_jsons.zip into {str(root)!r}")

    def read_split(self, category: str) -> dict[str, list[ViewSample]]:
        """``category``'s split file as samples, by split (``train``, ``test``)."""
        self.category_folder(category)  # the object's image folder, or an error naming what is there
        path = self.split_file(category)
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DatasetError(f"cannot read {TITLE} split file {str(path)!r}: {error}") from error
        if not isinstance(info, dict) or not all(isinstance(info.get(k), list) for k in ("train", "test")):
            raise DatasetError(f"{TITLE} split file {str(path)!r} must be an object with 'train' and 'test' lists")
        meta = info.get("meta") or {}
        prefix = str(meta.get("prefix", category) or "")
        normal_class = str(meta.get("normal_class", "OK"))
        base = Path(os.path.normpath(self.dataset_root / prefix))
        splits: dict[str, list[ViewSample]] = {"train": [], "test": []}
        for split in splits:
            for index, entry in enumerate(info[split]):
                where = f"{str(path)!r} {split}[{index}]"
                splits[split].append(self._sample(entry, split, base, normal_class, category, where))
        return splits

    def _sample(self, entry: Any, split: str, base: Path, normal_class: str, category: str,
                where: str) -> ViewSample:  # fmt: skip
        if not isinstance(entry, dict) or not isinstance(entry.get("image_path"), str) or "anomaly_class" not in entry:
            raise DatasetError(f"{where}: an entry needs image_path and anomaly_class, got {entry!r}")
        if entry.get("category", category) != category:
            raise DatasetError(f"{where}: entry of object {entry['category']!r} in the split file of {category!r}")
        image = self._inside(base, entry["image_path"], where)
        if not image.is_file():
            raise FileNotFoundError(f"image {str(image)!r} listed in {where} does not exist")
        sample_id, view = sample_key(image)
        anomaly_class, mask_path = str(entry["anomaly_class"]), entry.get("mask_path")
        if split == "train" or mask_path is None or anomaly_class == normal_class:
            return ViewSample(image, None, 0, GOOD, category, sample_id, view)
        mask = self._inside(base, str(mask_path), where)
        if not mask.is_file():
            raise DatasetError(f"defective test image {str(image)!r} has no mask at {str(mask)!r} ({where})")
        return ViewSample(image, mask, 1, anomaly_class, category, sample_id, view)

    @staticmethod
    def _inside(base: Path, relative: str, where: str) -> Path:
        path = Path(os.path.normpath(base / relative))  # '..' folded, links not followed
        if not path.is_relative_to(base):
            raise DatasetError(f"{where}: path {relative!r} leaves the image folder {str(base)!r}")
        return path

    def _rows(self, category: str, split: str) -> list[Sample]:
        samples = self.read_split(category)[split]
        if not samples:
            raise DatasetError(f"no {split} entries for object {category!r} in {str(self.split_file(category))!r}")
        return list(samples)

    def train_samples(self, category: str) -> list[Sample]:
        return self._rows(category, "train")

    def test_samples(self, category: str) -> list[Sample]:
        return self._rows(category, "test")

    def _split(self, category: str) -> tuple[list[Sample], list[Sample]]:
        """Training and validation images, the validation split holding out whole objects."""
        samples = [replace(s, category=category) for s in self.train_samples(category)]
        train, val = split_by_sample(samples, self.val_fraction, self.split_seed)
        if self.train_shots is not None:
            train = select_shots(train, self.train_shots, self.split_seed)
        return train, val

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for dataset in (self.train_set, self.val_set, self.test_set):
            if dataset is not None and type(dataset) is AnomalyDataset:
                dataset.__class__ = MultiViewDataset  # the same data; items gain sample_id and view

    def download_category(self, category: str) -> None:
        raise DatasetError(
            f"{TITLE} object {category!r} is not under {str(self.real_iad_root)!r} and it cannot be downloaded by "
            f"the suite (distributed after an application, no published checksum): get it from {REAL_IAD_SOURCE} "
            "and point root (--data.root) at the folder holding realiad_<resolution>/ and realiad_jsons/"
        )
