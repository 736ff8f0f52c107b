"""MVTec DataModule: layout, protocol (validation from train/good), bad input, download."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import seed_everything
from PIL import Image

from adbench.datamodules import AnomalyDataset, MVTecDataModule
from adbench.datamodules import download as download_module
from adbench.datamodules.base import DatasetError
from adbench.datamodules.download import ChecksumError, download_mvtec
from adbench.datamodules.embedded_render import EMBEDDED_CATEGORIES
from adbench.datamodules.mvtec import list_test_samples, list_train_samples

from .conftest import MVTEC_ROOT, REPO, requires_mvtec


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """A 2-train, 1-good + 1-defective-test category in MVTec layout, 40x40 px."""
    rng = np.random.default_rng(0)
    category = tmp_path / "widget"
    for i in range(4):
        _png(category / "train" / "good" / f"{i:03d}.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    _png(category / "test" / "good" / "000.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    _png(category / "test" / "scratch" / "000.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[10:20, 5:15] = 255
    _png(category / "ground_truth" / "scratch" / "000_mask.png", mask)
    return tmp_path


# --------------------------------------------------------------------------- embedded default


def test_embedded_default_items_and_protocol(embedded_root: Path) -> None:
    data = MVTecDataModule(root=str(embedded_root), category="weave", image_size=64, batch_size=4, val_fraction=0.2)
    data.setup("fit")
    data.setup("test")
    train_paths = {s.image_path for s in data.train_set.samples}
    val_paths = {s.image_path for s in data.val_set.samples}
    assert not train_paths & val_paths, "validation images must be held out of training"
    assert all("train/good" in str(p) for p in train_paths | val_paths), "validation never from the test set"
    assert len(train_paths) + len(val_paths) == 60 and len(val_paths) == 12

    item = data.test_set[len(data.test_set) - 1]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    assert item["mask"].shape == (1, 64, 64) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["label"].item() == 1 and item["mask"].sum() > 0 and item["defect_type"] != "good"
    good = data.test_set[data.test_set.defect_types.index("good")]
    assert good["label"].item() == 0 and good["mask"].sum() == 0 and good["defect_type"] == "good"

    # Validation gets fixed synthetic anomalies: both classes, masks consistent with labels.
    labels = data.val_set.labels
    assert 0 < labels.sum() < len(labels)
    has_pixels = data.val_set.masks.reshape(len(labels), -1).any(axis=1)
    assert np.array_equal(has_pixels, labels.astype(bool))


def test_root_none_uses_embedded_dataset(embedded_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADBENCH_EMBEDDED_ROOT", str(embedded_root))
    data = MVTecDataModule(image_size=32)
    assert data.category == EMBEDDED_CATEGORIES[0]
    assert data.category_dir == embedded_root / EMBEDDED_CATEGORIES[0]


def test_validation_split_is_seeded(embedded_root: Path) -> None:
    def val_paths(seed: int) -> list[Path]:
        data = MVTecDataModule(root=str(embedded_root), category="disc", image_size=32, split_seed=seed)
        data.setup("fit")
        return [s.image_path for s in data.val_set.samples]

    assert val_paths(1) == val_paths(1)
    assert val_paths(1) != val_paths(2)


def test_validation_anomalies_are_reproducible(embedded_root: Path) -> None:
    def val_images() -> np.ndarray:
        data = MVTecDataModule(root=str(embedded_root), category="marble", image_size=48)
        data.setup("fit")
        return data.val_set.images.copy()

    assert np.array_equal(val_images(), val_images())


# --------------------------------------------------------------------------- pseudo-anomalies


class _NeedsAnomalies:
    needs_pseudo_anomalies = True


def _first_batch(root: Path, seed: int, workers: int = 0) -> dict:
    seed_everything(seed, workers=True)
    data = MVTecDataModule(
        root=str(root), category="weave", image_size=64, batch_size=8, num_workers=workers, pseudo_anomalies=True
    )
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_pseudo_anomaly_batches_are_seeded(embedded_root: Path) -> None:
    first, again, other = (_first_batch(embedded_root, s) for s in (3, 3, 4))
    assert set(first) >= {"image", "clean_image", "mask", "label"}
    for key in ("image", "clean_image", "mask", "label"):
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(first["image"], other["image"])
    # Outside the mask the input is the clean image; inside, anomalous samples differ.
    outside = first["mask"].expand_as(first["image"]) == 0
    assert torch.allclose(first["image"][outside], first["clean_image"][outside], atol=1e-6)
    assert torch.equal(first["label"].bool(), first["mask"].flatten(1).amax(1) > 0)


def test_pseudo_anomaly_batches_are_seeded_with_workers(embedded_root: Path) -> None:
    first, again = (_first_batch(embedded_root, 5, workers=2) for _ in range(2))
    assert torch.equal(first["image"], again["image"])
    assert torch.equal(first["mask"], again["mask"])


def test_pseudo_anomalies_follow_the_model_when_unset(embedded_root: Path) -> None:
    class _Trainer:
        lightning_module = _NeedsAnomalies()

    data = MVTecDataModule(root=str(embedded_root), category="weave", image_size=32)
    data.trainer = _Trainer()
    data.setup("fit")
    assert data.train_set.synthesizer is not None

    plain = MVTecDataModule(root=str(embedded_root), category="weave", image_size=32)
    plain.setup("fit")
    assert plain.train_set.synthesizer is None
    assert "clean_image" not in plain.train_set[0]


def test_dtd_texture_source(embedded_root: Path, dtd_root: Path | None) -> None:
    if dtd_root is None:
        pytest.skip("DTD textures not available (set DTD_ROOT)")
    data = MVTecDataModule(
        root=str(embedded_root), category="weave", image_size=64, pseudo_anomalies=True, texture_source=str(dtd_root)
    )
    data.setup("fit")
    labels = [data.train_set[i]["label"].item() for i in range(20)]
    assert 0 < sum(labels) < 20


# --------------------------------------------------------------------------- real MVTec AD


@requires_mvtec
def test_real_bottle_counts_and_alignment() -> None:
    category = Path(MVTEC_ROOT) / "bottle"
    train = list_train_samples(category)
    test = list_test_samples(category)
    assert len(train) == 209
    assert len(test) == 83
    defective = [s for s in test if s.label == 1]
    assert len(defective) == 63
    for sample in defective:
        assert sample.mask_path.name == f"{sample.image_path.stem}_mask.png"
        assert sample.mask_path.parent.name == sample.image_path.parent.name == sample.defect_type

    data = MVTecDataModule(root=MVTEC_ROOT, category="bottle", image_size=64, val_fraction=0.1)
    data.setup("fit")
    data.setup("test")
    assert len(data.train_set) + len(data.val_set) == 209 and len(data.val_set) == 21
    assert len(data.test_set) == 83
    assert int(data.test_set.masks.reshape(83, -1).any(axis=1).sum()) == 63
    assert int(data.test_set.labels.sum()) == 63


# --------------------------------------------------------------------------- bad input


def test_missing_root(tmp_path: Path) -> None:
    data = MVTecDataModule(root=str(tmp_path / "nowhere"), category="bottle")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.setup("fit")


def test_unknown_category_lists_what_is_there(tiny_root: Path) -> None:
    data = MVTecDataModule(root=str(tiny_root), category="bottel")
    with pytest.raises(FileNotFoundError, match=r"MVTec AD category 'bottel'.*widget.*not an official MVTec AD category"):
        data.setup("fit")


def test_any_folder_in_mvtec_layout_loads(tiny_root: Path) -> None:
    data = MVTecDataModule(root=str(tiny_root), category="widget", image_size=32, val_fraction=0.25)
    data.setup("fit")
    data.setup("test")
    assert len(data.train_set) == 3 and len(data.val_set) == 1 and len(data.test_set) == 2


def test_empty_train_folder(tiny_root: Path) -> None:
    for path in (tiny_root / "widget" / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="no images in training folder .*train/good"):
        MVTecDataModule(root=str(tiny_root), category="widget").setup("fit")


def test_empty_test_folder(tiny_root: Path) -> None:
    shutil.rmtree(tiny_root / "widget" / "test")
    (tiny_root / "widget" / "test").mkdir()
    with pytest.raises(DatasetError, match="no images in test folder"):
        MVTecDataModule(root=str(tiny_root), category="widget").setup("test")


def test_corrupt_image_is_named(tiny_root: Path) -> None:
    bad = tiny_root / "widget" / "train" / "good" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match="cannot read image .*002.png"):
        MVTecDataModule(root=str(tiny_root), category="widget").setup("fit")


def test_grayscale_rgba_palette_and_16bit_images_are_converted(tiny_root: Path) -> None:
    folder = tiny_root / "widget" / "train" / "good"
    _png(folder / "010.png", np.full((40, 40), 128, dtype=np.uint8))  # L
    _png(folder / "011.png", np.full((40, 40, 4), 200, dtype=np.uint8))  # RGBA
    Image.fromarray(np.full((40, 40), 128, dtype=np.uint8)).convert("P").save(folder / "012.png")
    Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)).save(folder / "013.png")  # I;16
    samples = [s for s in list_train_samples(tiny_root / "widget") if s.image_path.stem >= "010"]
    dataset = AnomalyDataset(samples, image_size=32)
    assert dataset.images.shape == (4, 32, 32, 3)
    assert np.all(dataset.images[0] == 128) and np.all(dataset.images[1] == 200)
    assert np.all(dataset.images[3] == 255), "16-bit images are rescaled, not clipped"


def test_mask_of_wrong_size_is_named(tiny_root: Path) -> None:
    _png(tiny_root / "widget" / "ground_truth" / "scratch" / "000_mask.png", np.zeros((30, 40), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"000_mask.png.* is 40x30 but its image .*000.png.* is 40x40"):
        MVTecDataModule(root=str(tiny_root), category="widget").setup("test")


def test_missing_mask_is_named(tiny_root: Path) -> None:
    (tiny_root / "widget" / "ground_truth" / "scratch" / "000_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"scratch/000.png.* has no mask"):
        MVTecDataModule(root=str(tiny_root), category="widget").setup("test")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"image_size": 8}, "image_size"),
        ({"batch_size": 0}, "batch sizes"),
        ({"root": "/data"}, "category is required"),
    ],
)
def test_bad_config_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MVTecDataModule(**kwargs)


# --------------------------------------------------------------------------- download


@pytest.fixture
def served_archive(tmp_path: Path, tiny_root: Path) -> Iterator[tuple[str, str]]:
    """The tiny category as an MVTec-style .tar.xz on a local HTTP server: (url, sha256)."""
    served = tmp_path / "served"
    served.mkdir()
    archive = served / "mvtec_anomaly_detection.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tiny_root / "widget", arcname="widget")
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/{archive.name}", sha256
    finally:
        server.shutdown()


def test_download_verifies_and_extracts(tmp_path: Path, served_archive: tuple[str, str]) -> None:
    url, sha256 = served_archive
    folder = download_mvtec(tmp_path / "mvtec", "widget", url=url, sha256=sha256)
    assert folder == tmp_path / "mvtec" / "widget"
    assert len(list_train_samples(folder)) == 4


def test_download_rejects_a_wrong_checksum(tmp_path: Path, served_archive: tuple[str, str]) -> None:
    url, _ = served_archive
    with pytest.raises(ChecksumError, match="expected 0000"):
        download_mvtec(tmp_path / "mvtec", "widget", url=url, sha256="0" * 64)
    assert not list((tmp_path / "mvtec").glob("*.tar.xz*")), "a bad download must not be kept"


@pytest.fixture
def official_source(served_archive: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """The local server's archive as the module's official URL and SHA-256: (url, sha256)."""
    url, sha256 = served_archive
    monkeypatch.setattr(download_module, "MVTEC_URL", url)
    monkeypatch.setattr(download_module, "MVTEC_SHA256", sha256)
    return url, sha256


def test_datamodule_download_flag(tmp_path: Path, official_source: tuple[str, str]) -> None:
    data = MVTecDataModule(root=str(tmp_path / "mvtec"), category="widget", image_size=32, download=True)
    data.prepare_data()
    data.setup("test")
    assert len(data.test_set) == 2


def test_a_killed_extraction_is_never_used_as_a_complete_category(
    tmp_path: Path, official_source: tuple[str, str]
) -> None:
    url, sha256 = official_source
    root = tmp_path / "mvtec"
    download_mvtec(root, "widget", url=url, sha256=sha256)  # the archive is now in root
    full = len(list((root / "widget").rglob("*.png")))
    # An older version extracted in place and was killed: half the files, no completion marker.
    (root / "widget" / download_module.COMPLETE_MARKER).unlink()
    for png in sorted((root / "widget" / "test").rglob("*.png"))[1:]:
        png.unlink()
    (root / ".adbench-extract-killed").mkdir()  # and a killed new-style run's temporary folder
    data = MVTecDataModule(root=str(root), category="widget", image_size=32, download=True)
    data.prepare_data()
    assert len(list((root / "widget").rglob("*.png"))) == full, "re-extracted whole"
    assert download_module.is_extracted(root / "widget")
    assert not list(root.glob(".adbench-extract-*")), "temporary folders are cleaned up"
    # A refused archive leaves nothing behind.
    with pytest.raises(FileNotFoundError, match="'gadget' is not in archive"):
        download_mvtec(root, "gadget", url=url, sha256=sha256)
    assert sorted(p.name for p in root.iterdir()) == ["mvtec_anomaly_detection.tar.xz", "widget"]


def test_a_folder_of_the_users_own_is_never_replaced(tmp_path: Path, tiny_root: Path,
                                                     served_archive: tuple[str, str]) -> None:
    url, sha256 = served_archive
    data = MVTecDataModule(root=str(tiny_root), category="widget", image_size=32, download=True)
    before = sorted(p.relative_to(tiny_root) for p in (tiny_root / "widget").rglob("*"))
    data.prepare_data()  # no archive in that root: the folder is the user's, used as is
    assert sorted(p.relative_to(tiny_root) for p in (tiny_root / "widget").rglob("*")) == before


def test_a_decompression_bomb_names_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from adbench.datamodules.base import read_image

    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: PIL refuses it
    with pytest.raises(DatasetError, match=r"image '.*huge.png' is too large to decode safely"):
        read_image(path, 32)


def test_download_reports_unreachable_server(tmp_path: Path) -> None:
    with pytest.raises(ConnectionError, match="could not download http://127.0.0.1:9/"):
        download_mvtec(tmp_path, "bottle", url="http://127.0.0.1:9/x.tar.xz", sha256="0" * 64)


def test_incomplete_last_batch_is_kept_when_the_model_asks(embedded_root: Path) -> None:
    class _Trainer:
        class lightning_module:  # noqa: N801 - a stand-in for a model class attribute
            drop_incomplete_batches = False

    def train_batches(model_trainer: object | None) -> list[int]:
        data = MVTecDataModule(root=str(embedded_root), category="weave", image_size=32, batch_size=8)
        data.trainer = model_trainer
        data.setup("fit")
        return [len(b["image"]) for b in data.train_dataloader()]

    assert train_batches(None) == [8] * 6  # 54 training images: the incomplete 7th batch is dropped
    assert train_batches(_Trainer()) == [8] * 6 + [6]  # PatchCore-like: every image is seen


def test_paper_profiles_never_fall_back_to_procedural_textures(embedded_root: Path) -> None:

    data = MVTecDataModule(root=str(embedded_root), category="weave", image_size=64, texture_source="required",
                           pseudo_anomalies=True)  # fmt: skip
    with pytest.raises(DatasetError, match="texture_root"):
        data.setup("fit")
    import yaml

    for method in ("draem", "pouta", "tsdn", "rstpm"):
        config = yaml.safe_load((REPO / "configs" / method / "paper.yaml").read_text())
        assert config["data"]["texture_source"] == "required", method


def test_held_out_validation_textures_are_classes_training_never_sees(tmp_path: Path, embedded_root: Path) -> None:
    from adbench.datamodules.synthesis import FolderTextures

    rng = np.random.default_rng(0)
    for kind in ("banded", "dotted", "grid", "lined", "woven"):
        (tmp_path / "tex" / kind).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "tex" / kind / f"{i}.png")
    kept, held = FolderTextures(tmp_path / "tex").split(0.2, seed=0)
    assert {p.parent.name for p in kept.paths}.isdisjoint({p.parent.name for p in held.paths})
    assert len(held.paths) == 3 and len(kept.paths) == 12  # one class of five held out
    assert [p.name for p in FolderTextures(tmp_path / "tex").split(0.2, seed=0)[1].paths] == [p.name for p in held.paths]

    data = MVTecDataModule(root=str(embedded_root), category="weave", image_size=64, val_fraction=0.2,
                           texture_source=str(tmp_path / "tex"), validation_textures="held-out", pseudo_anomalies=True)  # fmt: skip
    data.setup("fit")
    train_source = data.train_set.synthesizer.texture_source
    assert {p.parent.name for p in train_source.paths} == {p.parent.name for p in kept.paths}
    assert any(item["label"] == 1 for item in data.val_set)
    with pytest.raises(DatasetError, match="held-out"):
        MVTecDataModule(root=str(embedded_root), category="weave", image_size=64, val_fraction=0.2,
                        validation_textures="held-out", pseudo_anomalies=True).setup("fit")  # fmt: skip
    with pytest.raises(ValueError, match="validation_textures"):
        MVTecDataModule(validation_textures="other")


def test_validation_anomalies_use_held_out_textures_for_every_seed_and_the_validation_recipe(
        tmp_path: Path, embedded_root: Path) -> None:
    from adbench.datamodules.synthesis import SYNTHESIS_RECIPES

    rng = np.random.default_rng(0)
    kinds = [f"kind{i}" for i in range(10)]
    for kind in kinds:
        (tmp_path / "tex" / kind).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "tex" / kind / f"{i}.png")
    held_by_seed = {}
    for seed in range(5):
        # Default validation_textures ("auto"): held out as soon as there is a texture folder.
        data = MVTecDataModule(root=str(embedded_root), category="weave", image_size=64, val_fraction=0.2,
                               split_seed=seed, texture_source=str(tmp_path / "tex"), pseudo_anomalies=True)  # fmt: skip
        train, val = data._synthesizers(np.zeros((1, 64, 64, 3), np.uint8))
        trained = {p.parent.name for p in train.texture_source.paths}
        held = {p.parent.name for p in val.texture_source.paths}
        assert trained.isdisjoint(held) and trained | held == set(kinds) and len(held) == 2, seed
        assert (train.mask_shape, train.beta_range) == ("perlin", (0.0, 0.8))
        assert (val.mask_shape, val.beta_range) == ("ellipses", SYNTHESIS_RECIPES["validation"]["beta_range"])
        held_by_seed[seed] = held
    assert len({frozenset(h) for h in held_by_seed.values()}) > 1, "the seed chooses the held-out classes"
    # Procedural textures have no classes to hold out: shared, still with the validation recipe.
    data = MVTecDataModule(root=str(embedded_root), category="weave", image_size=64, pseudo_anomalies=True)
    train, val = data._synthesizers(np.zeros((1, 64, 64, 3), np.uint8))
    assert train.texture_source is val.texture_source and val.mask_shape == "ellipses"
    # The suite's validation before 2026-12-06, on request.
    old = MVTecDataModule(root=str(embedded_root), category="weave", image_size=64, validation_textures="shared",
                          validation_recipe="draem", texture_source=str(tmp_path / "tex"))  # fmt: skip
    train, val = old._synthesizers(np.zeros((1, 64, 64, 3), np.uint8))
    assert train.texture_source is val.texture_source and val.mask_shape == "perlin" and val.beta_range == (0.0, 0.8)
    with pytest.raises(ValueError, match="validation_recipe"):
        MVTecDataModule(validation_recipe="other")
