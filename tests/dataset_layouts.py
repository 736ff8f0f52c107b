"""Tiny datasets in the official on-disk layouts of VisA, BTAD, MPDD, MVTec 3D-AD, MVTec AD 2 and
Real-IAD, and one shaped like the Magnetic Tile Defect dataset (read by the ``folder`` dataset).

Each builder writes one category into ``root`` (next to any already there) and returns what a
loader must find: :class:`LayoutCounts`. Images are 64x48 (not square, so a resize that swaps
width and height shows), one defective image of a category is of another size, and every
defect is a rectangle drawn both into the image and into its mask, with the values the
dataset uses (VisA: small instance numbers; the others: 255).

    counts = BUILDERS["visa"](tmp_path)              # the default category, "candle"
    counts = build_btad(tmp_path, category="02")

MVTec AD 2, Real-IAD and the MTD shape are in :data:`MORE_BUILDERS`, not in :data:`BUILDERS`
(whose datasets the shared tests of ``test_datasets.py`` go through); ``test_new_datasets.py``
tests them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 64, 48
#: A rectangle in an image's own pixels: (left, top, right, bottom), right and bottom exclusive.
Box = tuple[int, int, int, int]


@dataclass
class LayoutCounts:
    """What a builder wrote for one category."""

    train: int  # normal training images (the official training split)
    test_good: int
    test_anomalous: int
    defect_types: tuple[str, ...]  # the ``defect_type`` values of the anomalous test images, sorted
    category: str = ""
    validation: int = 0  # official validation images (normal), where the dataset has them
    #: Anomalous test image -> its mask file.
    masks: dict[str, str] = field(default_factory=dict)
    #: Anomalous test image -> the defects drawn in it (its mask is nonzero exactly there).
    defect_boxes: dict[str, tuple[Box, ...]] = field(default_factory=dict)
    #: MVTec AD 2: private test set -> its image stems, sorted.
    private: dict[str, list[str]] = field(default_factory=dict)
    #: Real-IAD: test object (sample id) -> (its label: 1 if any view is defective, its number of views).
    objects: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def test(self) -> int:
        return self.test_good + self.test_anomalous


def expected_mask(image_path: str | Path, boxes: Sequence[Box], size: int) -> np.ndarray:
    """The binary mask a loader must produce at ``size`` x ``size``: the boxes drawn at the
    image's size on disk, resized as masks are (nearest neighbour)."""
    with Image.open(image_path) as image:
        width, height = image.size
    mask = np.zeros((height, width), dtype=np.uint8)
    for left, top, right, bottom in boxes:
        mask[top:bottom, left:right] = 255
    return (np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST)) > 0).astype(np.uint8)


def _box(index: int) -> Box:
    """A defect rectangle that differs per image, so a mask given to the wrong image shows."""
    left, top = 3 + 7 * index, 2 + 5 * index
    return left, top, left + 12, top + 9


def _write_image(path: Path, seed: int, boxes: Sequence[Box] = (), size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(60, 140, (size[1], size[0], 3), dtype=np.uint8)
    for left, top, right, bottom in boxes:
        pixels[top:bottom, left:right] = (250, 30, 30)  # the defect, visible in the image too
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)  # format from the suffix (.JPG, .bmp, .png)
    return path


def _write_mask(path: Path, boxes: Sequence[Box], size: tuple[int, int] = (WIDTH, HEIGHT),
                values: Sequence[int] = (255,)) -> Path:  # fmt: skip
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    for index, (left, top, right, bottom) in enumerate(boxes):
        mask[top:bottom, left:right] = values[index % len(values)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


def _record(counts: LayoutCounts, image: Path, mask: Path, boxes: Sequence[Box]) -> None:
    counts.masks[str(image)] = str(mask)
    counts.defect_boxes[str(image)] = tuple(boxes)


# --------------------------------------------------------------------------- VisA


def build_visa(root: Path, category: str = "candle") -> LayoutCounts:
    """VisA: ``Data/Images/{Normal,Anomaly}/*.JPG``, ``Data/Masks/Anomaly/*.png`` (instance
    numbers 1, 2, 3), ``image_anno.csv`` and the category's rows of ``split_csv/1cls.csv``:
    5 normal images in its train split, 2 in its test split, 3 anomalies (one with two defects,
    one of another size)."""
    data = Path(category) / "Data"
    rows = []
    for i in range(7):
        image = data / "Images" / "Normal" / f"{i:04d}.JPG"
        _write_image(root / image, seed=sum(map(ord, category)) * 10 + i)  # str hashes vary per process
        rows.append([category, "train" if i < 5 else "test", "normal", image.as_posix(), ""])
    counts = LayoutCounts(train=5, test_good=2, test_anomalous=3, defect_types=("anomaly",), category=category)
    for i in range(3):
        size = (56, 40) if i == 1 else (WIDTH, HEIGHT)
        boxes = (_box(i), (40, 30, 46, 36)) if i == 2 else (_box(i),)
        image = data / "Images" / "Anomaly" / f"{i:03d}.JPG"
        mask = data / "Masks" / "Anomaly" / f"{i:03d}.png"
        _write_image(root / image, seed=100 + i, boxes=boxes, size=size)
        _write_mask(root / mask, boxes, size=size, values=(i + 1, 1))  # instance numbers, not 255
        _record(counts, root / image, root / mask, boxes)
        rows.append([category, "test", "anomaly", image.as_posix(), mask.as_posix()])
    with open(root / category / "image_anno.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "label", "mask"], *([r[3], r[2], r[4]] for r in rows)])
    split = root / "split_csv" / "1cls.csv"
    kept = []
    if split.is_file():  # other categories' rows stay
        with open(split, newline="") as f:
            kept = [r for r in list(csv.reader(f))[1:] if r[0] != category]
    split.parent.mkdir(parents=True, exist_ok=True)
    with open(split, "w", newline="") as f:
        csv.writer(f).writerows([["object", "split", "label", "image", "mask"], *kept, *rows])
    return counts


# --------------------------------------------------------------------------- BTAD


#: BTAD's file suffixes per product: (images, masks).
_BTAD_SUFFIXES = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}


def build_btad(root: Path, category: str = "01") -> LayoutCounts:
    """BTAD: ``train/ok`` (5), ``test/ok`` (2), ``test/ko`` (3) with masks of the same stem in
    ``ground_truth/ko``; images .bmp in 01 and 03, .png in 02; masks .png, or .bmp in 03."""
    image_suffix, mask_suffix = _BTAD_SUFFIXES.get(category, (".png", ".png"))
    folder = root / category
    for i in range(5):
        _write_image(folder / "train" / "ok" / f"{i:04d}{image_suffix}", seed=i)
    for i in range(2):
        _write_image(folder / "test" / "ok" / f"{i:04d}{image_suffix}", seed=10 + i)
    counts = LayoutCounts(train=5, test_good=2, test_anomalous=3, defect_types=("ko",), category=category)
    for i in range(3):
        size = (56, 40) if i == 1 else (WIDTH, HEIGHT)
        boxes = (_box(i),)
        image = _write_image(folder / "test" / "ko" / f"{i:04d}{image_suffix}", seed=20 + i, boxes=boxes, size=size)
        mask = _write_mask(folder / "ground_truth" / "ko" / f"{i:04d}{mask_suffix}", boxes, size=size)
        _record(counts, image, mask, boxes)
    return counts


# --------------------------------------------------------------------------- MPDD (MVTec AD's layout)


def build_mpdd(root: Path, category: str = "bracket_black") -> LayoutCounts:
    """MPDD: ``train/good`` (5), ``test/good`` (2), ``test/hole`` (2) and ``test/scratches`` (1),
    masks ``ground_truth/<defect>/<stem>_mask.png``."""
    folder = root / category
    for i in range(5):
        _write_image(folder / "train" / "good" / f"{i:03d}.png", seed=i)
    for i in range(2):
        _write_image(folder / "test" / "good" / f"{i:03d}.png", seed=10 + i)
    counts = LayoutCounts(train=5, test_good=2, test_anomalous=3, defect_types=("hole", "scratches"),
                          category=category)  # fmt: skip
    for i, (defect, index) in enumerate([("hole", 0), ("hole", 1), ("scratches", 0)]):
        size = (56, 40) if i == 1 else (WIDTH, HEIGHT)
        boxes = (_box(i),)
        image = _write_image(folder / "test" / defect / f"{index:03d}.png", seed=20 + i, boxes=boxes, size=size)
        mask = _write_mask(folder / "ground_truth" / defect / f"{index:03d}_mask.png", boxes, size=size)
        _record(counts, image, mask, boxes)
    return counts


# --------------------------------------------------------------------------- MVTec 3D-AD (RGB)


def build_mvtec3d(root: Path, category: str = "bagel") -> LayoutCounts:
    """MVTec 3D-AD: ``train/good/rgb`` (5), ``validation/good/rgb`` (2), ``test/good/rgb`` (2),
    ``test/crack/rgb`` (2), ``test/hole/rgb`` (1), masks ``test/<defect>/gt/<same name>``;
    every ``rgb/`` has an ``xyz/`` beside it whose files are not images (a loader must skip it)."""
    folder = root / category

    def sample(split: Path, name: str, seed: int, boxes: Sequence[Box] = (),
               size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:  # fmt: skip
        image = _write_image(split / "rgb" / name, seed=seed, boxes=boxes, size=size)
        (split / "xyz").mkdir(exist_ok=True)
        (split / "xyz" / name.replace(".png", ".tiff")).write_bytes(b"not an image: point clouds are not read")
        if split.parent.name == "test":  # the official gt folders, all-zero masks for good images
            _write_mask(split / "gt" / name, boxes, size=size)
        return image

    for i in range(5):
        sample(folder / "train" / "good", f"{i:03d}.png", seed=i)
    for i in range(2):
        sample(folder / "validation" / "good", f"{i:03d}.png", seed=10 + i)
        sample(folder / "test" / "good", f"{i:03d}.png", seed=20 + i)
    counts = LayoutCounts(train=5, test_good=2, test_anomalous=3, defect_types=("crack", "hole"),
                          category=category, validation=2)  # fmt: skip
    for i, (defect, index) in enumerate([("crack", 0), ("crack", 1), ("hole", 0)]):
        size = (56, 40) if i == 1 else (WIDTH, HEIGHT)
        boxes = (_box(i),)
        split = folder / "test" / defect
        image = sample(split, f"{index:03d}.png", seed=30 + i, boxes=boxes, size=size)
        _record(counts, image, split / "gt" / image.name, boxes)
    return counts


# --------------------------------------------------------------------------- MVTec AD 2


def build_mvtec_ad2(root: Path, category: str = "can") -> LayoutCounts:
    """MVTec AD 2: ``train/good`` (5), ``validation/good`` (2), ``test_public/good`` (2),
    ``test_public/bad`` (3, masks ``test_public/ground_truth/bad/<stem>_mask.png``), and the
    unlabelled ``test_private`` (3, ``000_regular.png``...) and ``test_private_mixed`` (2, ``000_mixed.png``...)."""
    folder = root / category
    for i in range(5):
        _write_image(folder / "train" / "good" / f"{i:03d}_regular.png", seed=i)
    for i in range(2):
        _write_image(folder / "validation" / "good" / f"{i:03d}_regular.png", seed=10 + i)
        _write_image(folder / "test_public" / "good" / f"{i:03d}_regular.png", seed=20 + i)
    counts = LayoutCounts(train=5, test_good=2, test_anomalous=3, defect_types=("bad",), category=category,
                          validation=2)  # fmt: skip
    for i, name in enumerate(["000_regular", "001_overexposed", "002_regular"]):
        size = (56, 40) if i == 1 else (WIDTH, HEIGHT)
        boxes = (_box(i),)
        image = _write_image(folder / "test_public" / "bad" / f"{name}.png", seed=30 + i, boxes=boxes, size=size)
        mask = _write_mask(folder / "test_public" / "ground_truth" / "bad" / f"{name}_mask.png", boxes, size=size)
        _record(counts, image, mask, boxes)
    for split, suffix, n in (("test_private", "regular", 3), ("test_private_mixed", "mixed", 2)):
        stems = [f"{i:03d}_{suffix}" for i in range(n)]
        for i, stem in enumerate(stems):
            size = (56, 40) if i == 1 else (WIDTH, HEIGHT)
            _write_image(folder / split / f"{stem}.png", seed=40 + i + 10 * len(stems), boxes=(_box(i),), size=size)
        counts.private[split] = stems
    return counts


# --------------------------------------------------------------------------- Real-IAD


def real_iad_name(category: str, number: int, kind: str, view: int) -> str:
    """A Real-IAD file name: ``<object>_<4 digits>_<OK|NG>_C<view>_<timestamp>.jpg``."""
    return f"{category}_{number:04d}_{kind}_C{view}_2023052{number % 10}1530{view:02d}.jpg"


def build_real_iad(root: Path, category: str = "audiojack", resolution: str = "1024") -> LayoutCounts:
    """Real-IAD: ``realiad_<resolution>/<object>/{OK,NG/<code>}/S<nnnn>/`` images of 5 views and
    ``realiad_jsons/<object>.json``. Train: objects 1-3 (OK, 15 images). Test: object 4 (OK, 5 views),
    object 5 (NG/AK: views C1, C2 defective with masks, C3-C5 with no mask, so normal), object 6
    (NG/HS, 56x40 px: C1-C5 all defective with masks)."""
    folder = root / f"realiad_{resolution}" / category
    entries: dict[str, list[dict]] = {"train": [], "test": []}
    counts = LayoutCounts(train=15, test_good=5 + 3, test_anomalous=2 + 5, defect_types=("AK", "HS"), category=category)

    def add(split: str, number: int, code: str, view: int, boxes: Sequence[Box] = (), masked: bool = False,
            size: tuple[int, int] = (WIDTH, HEIGHT)) -> None:  # fmt: skip
        kind = "OK" if code == "OK" else "NG"
        sub = f"OK/S{number:04d}" if kind == "OK" else f"NG/{code}/S{number:04d}"
        name = real_iad_name(category, number, kind, view)
        image = _write_image(folder / sub / name, seed=100 * number + view, boxes=boxes if masked else (), size=size)
        mask_path = None
        if masked:
            mask = _write_mask(folder / sub / name.replace(".jpg", "_mask.png"), boxes, size=size)
            mask_path = f"{sub}/{mask.name}"
            _record(counts, image, mask, boxes)
        entries[split].append({"category": category, "anomaly_class": code, "image_path": f"{sub}/{name}",
                               "mask_path": mask_path})

    for number in (1, 2, 3):
        for view in range(1, 6):
            add("train", number, "OK", view)
    for view in range(1, 6):
        add("test", 4, "OK", view)
        add("test", 5, "AK", view, (_box(view),), masked=view <= 2)
        add("test", 6, "HS", view, (_box(view - 1),), masked=True, size=(56, 40))
    counts.objects = {f"{category}_0004_OK": (0, 5), f"{category}_0005_NG": (1, 5), f"{category}_0006_NG": (1, 5)}
    split = root / "realiad_jsons" / f"{category}.json"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text(json.dumps({"meta": {"prefix": category, "normal_class": "OK"}, **entries}, indent=1))
    return counts


# --------------------------------------------------------------------------- Magnetic Tile Defect's shape


def build_mtd(root: Path) -> LayoutCounts:
    """The Magnetic Tile Defect dataset's shape: ``MT_<type>/Imgs/exp1_num_<n>.jpg`` each with its
    mask ``exp1_num_<n>.png`` beside it (all-zero for ``MT_Free``): 10 free images, 3 ``Blowhole``
    (one 56x40) and 2 ``Crack``. No normal test images: the ``folder`` dataset carves them out."""
    counts = LayoutCounts(train=10, test_good=0, test_anomalous=5, defect_types=("Blowhole", "Crack"), category="mtd")
    for i in range(10):
        image = _write_image(root / "MT_Free" / "Imgs" / f"exp1_num_{1000 + i}.jpg", seed=200 + i)
        _write_mask(image.with_suffix(".png"), ())
    for i, (defect, number) in enumerate([("Blowhole", 1), ("Blowhole", 2), ("Blowhole", 3), ("Crack", 4), ("Crack", 5)]):
        size = (56, 40) if i == 1 else (WIDTH, HEIGHT)
        boxes = (_box(i),)
        image = _write_image(root / f"MT_{defect}" / "Imgs" / f"exp1_num_{number}.jpg", seed=300 + i, boxes=boxes,
                             size=size)  # fmt: skip
        _record(counts, image, _write_mask(image.with_suffix(".png"), boxes, size=size), boxes)
    return counts


#: Builder by registry name; each takes ``(root, category=<an official category>)``.
BUILDERS: dict[str, Callable[..., LayoutCounts]] = {
    "visa": build_visa,
    "btad": build_btad,
    "mpdd": build_mpdd,
    "mvtec3d": build_mvtec3d,
}

#: The newer layouts, by registry name (``mtd``: the ``folder`` dataset's; ``(root)`` only).
MORE_BUILDERS: dict[str, Callable[..., LayoutCounts]] = {
    "mvtec_ad2": build_mvtec_ad2,
    "real_iad": build_real_iad,
    "mtd": build_mtd,
}
