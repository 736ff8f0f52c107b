"""Lazy decoding, the decode cache and the loaders' worker default: the same items as the
preloaded path, bad files named early, nothing held in memory (issue 29, item 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import seed_everything
from PIL import Image

import adbench.__main__ as cli_main
from adbench.datamodules import MVTecDataModule, decoding
from adbench.datamodules import base as base_module
from adbench.datamodules.base import AnomalyDataModule, DatasetError
from adbench.datamodules.decoding import DecodeCache, DecodedOnAccess, default_workers
from adbench.datamodules.folder import FolderDataModule

KEYS = ("image", "mask", "label", "clean_image")


def _assert_same_items(eager: torch.utils.data.Dataset, lazy: torch.utils.data.Dataset) -> None:
    assert len(eager) == len(lazy)
    for index in range(len(eager)):
        a, b = eager[index], lazy[index]
        assert a.keys() == b.keys() and a["path"] == b["path"] and a["defect_type"] == b["defect_type"]
        for key in set(KEYS) & a.keys():
            assert torch.equal(a[key], b[key]), (key, a["path"])


def _batches(data: AnomalyDataModule, seed: int) -> list[dict]:
    seed_everything(seed, workers=True)
    return list(data.train_dataloader())


def _assert_same_batches(eager: list[dict], lazy: list[dict]) -> None:
    assert len(eager) == len(lazy) > 0
    for a, b in zip(eager, lazy, strict=True):
        assert a["path"] == b["path"]
        for key in KEYS:
            assert torch.equal(a[key], b[key]), key


def _both(make: type[AnomalyDataModule], **kwargs: object) -> tuple[AnomalyDataModule, AnomalyDataModule]:
    modules = []
    for preload in (True, False):
        data = make(preload=preload, **kwargs)
        data.setup("fit")
        data.setup("test")
        modules.append(data)
    eager, lazy = modules
    for split in ("train_set", "val_set", "test_set"):
        assert getattr(eager, split).preload and not getattr(lazy, split).preload
    return eager, lazy


@pytest.mark.parametrize(("texture_source", "workers"), [("procedural", 0), ("self", 2)])
def test_lazy_items_equal_preloaded_ones_on_the_embedded_data(
    embedded_root: Path, texture_source: str, workers: int
) -> None:
    eager, lazy = _both(MVTecDataModule, root=str(embedded_root), category="weave", image_size=64, batch_size=16,
                        val_fraction=0.2, pseudo_anomalies=True, texture_source=texture_source,
                        num_workers=workers)  # fmt: skip
    assert isinstance(lazy.train_set.images, DecodedOnAccess) and isinstance(lazy.test_set.masks, DecodedOnAccess)
    # Validation: the same fixed synthetic anomalies, both classes; test: the same images and masks.
    assert np.array_equal(eager.val_set.labels, lazy.val_set.labels) and 0 < lazy.val_set.labels.sum() < 12
    assert eager.val_set.defect_types == lazy.val_set.defect_types
    _assert_same_items(eager.val_set, lazy.val_set)
    _assert_same_items(eager.test_set, lazy.test_set)
    # Training: the same pseudo-anomalies drawn (torch's RNG, per worker), batch by batch.
    eager_batches, lazy_batches = _batches(eager, 7), _batches(lazy, 7)
    _assert_same_batches(eager_batches, lazy_batches)
    assert 0 < sum(int(b["label"].sum()) for b in lazy_batches) < sum(len(b["label"]) for b in lazy_batches)


def _write(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture
def own_layout(tmp_path: Path) -> Path:
    """A user's layout: 60x44 px PNG and JPEG images in RGB, grayscale, RGBA and 16-bit, masks
    beside the defective images; every file read through the generic decoding rules."""
    rng = np.random.default_rng(0)
    root = tmp_path / "own"
    for i in range(12):
        pixels = rng.integers(0, 256, (44, 60, 3), dtype=np.uint8)
        image = [Image.fromarray(pixels), Image.fromarray(pixels[..., 0]),
                 Image.fromarray(np.dstack([pixels, pixels[..., :1]]))][i % 3]  # fmt: skip
        _write(root / "ok" / f"{i:02d}.{'jpg' if i % 4 == 3 else 'png'}", image.convert("RGB") if i % 4 == 3 else image)
    for i in range(3):
        _write(root / "test_ok" / f"{i}.png", Image.fromarray(rng.integers(0, 65535, (44, 60), dtype=np.uint16)))
        _write(root / "defects" / "crack" / f"{i}.jpg", Image.fromarray(rng.integers(0, 256, (44, 60, 3), dtype=np.uint8)))
        mask = np.zeros((44, 60), dtype=np.uint8)
        mask[5 + i : 20 + i, 10:30] = 255
        _write(root / "defects" / "crack" / f"{i}.png", Image.fromarray(mask))
    return root


def _folder(root: Path, **kwargs: object) -> dict:
    return dict(root=str(root), category="own", normal="ok", test_normal="test_ok", test_abnormal="defects/*/*.jpg",
                mask="{parent}/{stem}.png", image_size=32, batch_size=4, val_fraction=0.25, **kwargs)  # fmt: skip


def test_lazy_items_equal_preloaded_ones_on_a_folder_layout(own_layout: Path) -> None:
    eager, lazy = _both(FolderDataModule, **_folder(own_layout, pseudo_anomalies=True, num_workers=0))
    _assert_same_items(eager.val_set, lazy.val_set)
    _assert_same_items(eager.test_set, lazy.test_set)
    defective = [lazy.test_set[i] for i in range(len(lazy.test_set)) if lazy.test_set.labels[i]]
    assert len(defective) == 3 and all(item["mask"].sum() > 0 for item in defective)
    _assert_same_batches(_batches(eager, 3), _batches(lazy, 3))


def test_the_cache_gives_the_same_items_and_skips_decoding(own_layout: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    cache = tmp_path / "cache"
    plain = FolderDataModule(**_folder(own_layout, preload=True))
    plain.setup("test")
    assert not cache.exists()
    cached = FolderDataModule(**_folder(own_layout, preload=False, cache_dir=str(cache), num_workers=2))
    cached.setup("test")
    for batch in cached.test_dataloader():  # two workers fill the cache at once
        assert len(batch["image"]) > 0
    entries = sorted(cache.rglob("*.npy"))
    assert len(entries) == 6 + 3, "an entry per test image, and per mask of the 3 defective ones"
    assert not [p for p in cache.rglob("*") if p.name.startswith(".tmp-")], "no temporary file left"

    # Read back: no decoding at all, the same items, preloaded or not.
    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded despite the cache")

    monkeypatch.setattr(decoding, "read_image", no_decoding)
    monkeypatch.setattr(decoding, "read_mask", no_decoding)
    for preload in (False, True):
        again = FolderDataModule(**_folder(own_layout, preload=preload, cache_dir=str(cache)))
        again.setup("test")
        _assert_same_items(plain.test_set, again.test_set)
    monkeypatch.undo()

    # A changed file is decoded again (its mtime and size are in the key); another size is another entry.
    changed = own_layout / "test_ok" / "0.png"
    Image.fromarray(np.full((44, 60), 9, dtype=np.uint8)).save(changed)
    fresh = DecodeCache(cache)
    assert np.all(decoding.load_image(changed, 32, fresh) == 9)
    assert decoding.load_image(changed, 40, fresh).shape == (40, 40, 3)
    assert len(list(cache.rglob("*.npy"))) == len(entries) + 2


def test_preload_default_follows_the_split_size(embedded_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = MVTecDataModule(root=str(embedded_root), category="disc", image_size=32)
    data.setup("test")
    assert data.test_set.preload and isinstance(data.test_set.images, np.ndarray)
    assert data.test_dataloader().num_workers == 0, "a preloaded split needs no workers"
    # One byte less than the decoded test split: it is decoded on access.
    monkeypatch.setattr(base_module, "PRELOAD_MAX_BYTES", len(data.test_set) * 32 * 32 * 3 - 1)
    lazy = MVTecDataModule(root=str(embedded_root), category="disc", image_size=32)
    lazy.setup("test")
    assert not lazy.test_set.preload and isinstance(lazy.test_set.images, DecodedOnAccess)
    assert lazy.test_dataloader().num_workers == default_workers() >= 1
    explicit = MVTecDataModule(root=str(embedded_root), category="disc", image_size=32, num_workers=0)
    explicit.setup("test")
    assert explicit.test_dataloader().num_workers == 0
    with pytest.raises(ValueError, match="num_workers"):
        MVTecDataModule(root=str(embedded_root), category="disc", num_workers=-1)


# --------------------------------------------------------------------------- bad files, lazily


def test_a_file_bad_past_its_header_is_named_from_a_worker(own_layout: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    bad = own_layout / "test_ok" / "1.png"
    bad.write_bytes(bad.read_bytes()[:200])  # the header reads, the pixels do not
    data = FolderDataModule(**_folder(own_layout, preload=False, num_workers=1))
    data.setup("test")  # the header check passes: nothing decoded yet
    with pytest.raises(DatasetError, match=r"cannot read image .*test_ok/1.png") as raised:
        list(data.test_dataloader())
    # The command line reports the worker's error in one line, naming the file.
    def run(argv: list[str]) -> None:
        raise raised.value

    monkeypatch.setattr(cli_main, "_run", run)
    with pytest.raises(SystemExit, match=r"^adbench fit: error: DatasetError: cannot read image '.*test_ok/1.png'"
                       r".* \(in a DataLoader worker\) \(ADBENCH_TRACEBACK") as stopped:  # fmt: skip
        cli_main.main(["fit"])
    assert "\n" not in str(stopped.value)
    with pytest.raises(DatasetError, match=r"cannot read image .*test_ok/1.png"):
        FolderDataModule(**_folder(own_layout, preload=True)).setup("test")


def test_unreadable_files_and_wrong_masks_fail_before_training(own_layout: Path) -> None:
    mask = own_layout / "defects" / "crack" / "2.png"
    Image.fromarray(np.zeros((40, 60), dtype=np.uint8)).save(mask)
    with pytest.raises(DatasetError, match=r"crack/2.png' is 60x40 but its image .*crack/2.jpg' is 60x44"):
        FolderDataModule(**_folder(own_layout, preload=False)).setup("test")
    (own_layout / "ok" / "05.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"cannot read image .*ok/05.png"):
        FolderDataModule(**_folder(own_layout, preload=False)).setup("fit")
