"""VisA, BTAD, MPDD and MVTec 3D-AD: their official layouts through the datamodule and the CLI,
bad input named, downloads from a local server (nothing here touches the internet)."""

from __future__ import annotations

import io
import re
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adbench.cli import AnomalyCLI
from adbench.datamodules import AnomalyDataModule, btad, get_dataset_class, mvtec3d, visa
from adbench.datamodules.base import DatasetError, read_mask
from adbench.datamodules.download import (
    COMPLETE_MARKER,
    ChecksumError,
    extract_zip_category,
    is_extracted,
    sha256_of,
)

from .dataset_layouts import (
    BUILDERS,
    LayoutCounts,
    build_btad,
    build_mvtec3d,
    build_visa,
    expected_mask,
)

NAMES = sorted(BUILDERS)
SIZE = 32


def _load(name: str, root: Path, category: str, **kwargs: object) -> AnomalyDataModule:
    data = get_dataset_class(name)(root=str(root), category=category, image_size=SIZE, **kwargs)
    data.setup("fit")
    data.setup("test")
    return data


def _assert_test_set(data: AnomalyDataModule, counts: LayoutCounts) -> None:
    """Counts, labels, defect types, and every mask nonzero exactly where the builder drew."""
    test = data.test_set
    assert len(test) == counts.test
    assert int(test.labels.sum()) == counts.test_anomalous
    assert set(test.defect_types) == {"good", *counts.defect_types}
    anomalous = {str(s.image_path) for s in test.samples if s.label == 1}
    assert anomalous == set(counts.defect_boxes)
    for index, sample in enumerate(test.samples):
        if sample.label == 1:
            assert str(sample.mask_path) == counts.masks[str(sample.image_path)], "mask aligned by name"
            expected = expected_mask(sample.image_path, counts.defect_boxes[str(sample.image_path)], SIZE)
            assert expected.any() and np.array_equal(test.masks[index], expected), sample.image_path
            assert sample.defect_type in counts.defect_types
        else:
            assert sample.defect_type == "good" and sample.mask_path is None and not test.masks[index].any()


# --------------------------------------------------------------------------- the official layouts


@pytest.mark.parametrize("name", NAMES)
def test_datamodule_reads_the_official_layout(name: str, tmp_path: Path) -> None:
    counts = BUILDERS[name](tmp_path)
    data = _load(name, tmp_path, counts.category, val_fraction=0.2)
    n_val = round(counts.train * 0.2)
    assert len(data.train_set) == counts.train - n_val and len(data.val_set) == n_val
    train_paths = {s.image_path for s in data.train_set.samples + data.val_set.samples}
    assert not train_paths & {s.image_path for s in data.test_set.samples}, "train and test are disjoint"
    assert set(data.test_set.categories) == set(data.train_set.categories) == {counts.category}
    _assert_test_set(data, counts)
    item = data.test_set[0]
    assert item["image"].shape == (3, SIZE, SIZE) and item["mask"].shape == (1, SIZE, SIZE)


def test_visa_split_comes_from_the_csv(tmp_path: Path) -> None:
    build_visa(tmp_path)
    data = _load("visa", tmp_path, "candle", val_fraction=0.0)
    normal = tmp_path / "candle" / "Data" / "Images" / "Normal"
    # One folder of normal images; the CSV puts 0000-0004 in train and 0005-0006 in test.
    assert [s.image_path for s in data.train_set.samples] == [normal / f"{i:04d}.JPG" for i in range(5)]
    assert [s.image_path for s in data.test_set.samples if s.label == 0] == [normal / "0005.JPG", normal / "0006.JPG"]


@pytest.mark.parametrize("values", [(1,), (3,), (1, 2, 3)])
def test_small_valued_masks_mark_every_nonzero_pixel(tmp_path: Path, values: tuple[int, ...]) -> None:
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 48)).save(image)
    mask = np.zeros((48, 64), dtype=np.uint8)
    for i, value in enumerate(values):  # VisA: instance numbers
        mask[5:15, 10 * i:10 * i + 8] = value
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert np.array_equal(read_mask(tmp_path / "mask.png", 64, image), (np.asarray(
        Image.fromarray(mask).resize((64, 64), Image.Resampling.NEAREST)) > 0).astype(np.uint8))


def test_palette_masks_are_read_by_label_and_0_255_masks_keep_their_threshold(tmp_path: Path) -> None:
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 40)).save(image)
    labels = np.zeros((40, 40), dtype=np.uint8)
    labels[:10], labels[10:20] = 1, 7
    palette = Image.fromarray(labels, mode="P")
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 5 + [200, 200, 200] + [0, 0, 0] * 248)
    palette.save(tmp_path / "palette.png")  # index 1 is dark red, index 7 light grey: both defects
    assert read_mask(tmp_path / "palette.png", 40, image)[:20].all()
    assert not read_mask(tmp_path / "palette.png", 40, image)[20:].any()
    binary = np.zeros((40, 40), dtype=np.uint8)
    binary[:10] = 255
    binary[30:] = 3  # faint noise of a 0/255 mask is no defect
    Image.fromarray(binary).save(tmp_path / "binary.png")
    assert np.array_equal(read_mask(tmp_path / "binary.png", 40, image), (binary == 255).astype(np.uint8))


def test_mvtec3d_official_validation(tmp_path: Path) -> None:
    counts = build_mvtec3d(tmp_path)
    validation = tmp_path / "bagel" / "validation" / "good" / "rgb"
    default = _load("mvtec3d", tmp_path, "bagel", val_fraction=0.2)
    assert all(s.image_path.parent != validation for s in default.val_set.samples), "not used by default"
    official = _load("mvtec3d", tmp_path, "bagel", val_fraction=0.2, use_official_validation=True)
    assert len(official.train_set) == counts.train, "all of train/good is trained on"
    assert [s.image_path.parent for s in official.val_set.samples] == [validation] * counts.validation
    shots = _load("mvtec3d", tmp_path, "bagel", use_official_validation=True, train_shots=2)
    assert len(shots.train_set) == 2 and len(shots.val_set) == counts.validation


@pytest.mark.parametrize("name", NAMES)
def test_find_categories_and_the_unified_setting(name: str, tmp_path: Path) -> None:
    cls = get_dataset_class(name)
    last, first = cls.categories[-1], cls.categories[0]
    BUILDERS[name](tmp_path, last)
    counts = BUILDERS[name](tmp_path, first)
    (tmp_path / "notes").mkdir()  # a folder that is no category
    data = _load(name, tmp_path, "all")
    assert data.find_categories() == [first, last], "official ones, in their order"
    assert len(data.test_set) == 2 * counts.test and set(data.test_set.categories) == {first, last}


# --------------------------------------------------------------------------- the CLI


EXTRA_CLI = {"mvtec3d": ["--data.use_official_validation=true", "--data.download_sha256=" + "ab" * 32]}


@pytest.mark.parametrize("name", NAMES)
def test_cli_builds_the_datamodule(name: str, tmp_path: Path) -> None:
    counts = BUILDERS[name](tmp_path / "data")
    cli = AnomalyCLI(args=[
        "--data", name, "--data.root", str(tmp_path / "data"), "--data.category", counts.category,
        "--data.image_size=32", *EXTRA_CLI.get(name, []),
        "--model", "stpm", "--model.weights=random", f"--trainer.default_root_dir={tmp_path / 'run'}",
    ], run=False)  # fmt: skip
    data = cli.datamodule
    assert type(data) is get_dataset_class(name)
    assert data.root == str(tmp_path / "data") and data.category == counts.category  # "01" stays a string
    assert AnomalyCLI.run_folder(cli.config).parts[-4:] == ("stpm", name, counts.category, "seed0")
    if name == "mvtec3d":
        assert data.use_official_validation and data.download_sha256 == "ab" * 32
    data.setup("test")
    assert len(data.test_set) == counts.test


# --------------------------------------------------------------------------- bad input


OTHER_CATEGORY = {"visa": "capsules", "btad": "02", "mpdd": "connector", "mvtec3d": "carrot"}


@pytest.mark.parametrize("name", NAMES)
def test_missing_folders_are_named(name: str, tmp_path: Path) -> None:
    counts = BUILDERS[name](tmp_path)
    cls = get_dataset_class(name)
    with pytest.raises(FileNotFoundError, match=rf"'{OTHER_CATEGORY[name]}' not found under .*there: {counts.category}$"):
        cls(root=str(tmp_path), category=OTHER_CATEGORY[name]).setup("test")
    with pytest.raises(FileNotFoundError, match=rf"'nope' not found .*categories: {cls.categories[0]}"):
        cls(root=str(tmp_path), category="nope").setup("fit")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cls(root=str(tmp_path / "nowhere"), category=counts.category).setup("fit")


@pytest.mark.parametrize("name", NAMES)
def test_a_missing_category_names_the_dataset_and_the_categories_there(name: str, tmp_path: Path) -> None:
    cls = get_dataset_class(name)
    first, missing, last = cls.categories[0], cls.categories[1], cls.categories[-1]
    for category in (last, first):
        BUILDERS[name](tmp_path, category)
    (tmp_path / "notes").mkdir()  # no category: not listed
    title = {"visa": "VisA", "btad": "BTAD", "mpdd": "MPDD", "mvtec3d": "MVTec 3D-AD"}[name]
    assert cls.display_name() == title
    with pytest.raises(FileNotFoundError) as error:
        cls(root=str(tmp_path), category=missing).setup("fit")
    assert str(error.value) == (f"{title} category {missing!r} not found under {str(tmp_path)!r}: "
                                f"{title} categories there: {first}, {last}")
    with pytest.raises(FileNotFoundError) as error:  # the classmethod, and a name that is not official
        cls.category_folder_under(tmp_path, "nope")
    assert str(error.value).startswith(f"{title} category 'nope' not found under {str(tmp_path)!r}: "
                                       f"{title} categories there: {first}, {last}; 'nope' is not an official")
    assert str(error.value).endswith(f"({title}'s categories: {', '.join(cls.categories)})")
    assert cls.categories_under(tmp_path) == [first, last]
    assert cls.category_folder_under(tmp_path, first) == tmp_path / first
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(title)} dataset root .*nowhere' does not exist"):
        cls.categories_under(tmp_path / "nowhere")


@pytest.mark.parametrize("name", NAMES)
def test_defect_image_without_mask_is_named(name: str, tmp_path: Path) -> None:
    counts = BUILDERS[name](tmp_path)
    image = sorted(counts.masks)[0]
    Path(counts.masks[image]).unlink()
    with pytest.raises(DatasetError, match=rf"defective test image '{re.escape(image)}' has no mask"):
        get_dataset_class(name)(root=str(tmp_path), category=counts.category).setup("test")


@pytest.mark.parametrize(
    ("name", "remove", "error", "message"),
    [
        ("visa", "split_csv", FileNotFoundError, r"missing VisA split file .*split_csv/1cls.csv"),
        ("visa", "candle/Data/Images/Normal/0006.JPG", FileNotFoundError,
         r"image .*Normal/0006.JPG' listed in .*1cls.csv' line 8 does not exist"),
        ("btad", "01/train/ok", FileNotFoundError, r"missing training folder .*01/train/ok"),
        ("btad", "01/test/ok", FileNotFoundError, r"missing test folder .*01/test/ok"),
        ("mpdd", "bracket_black/train", FileNotFoundError, r"missing training folder .*bracket_black/train/good"),
        ("mvtec3d", "bagel/train/good/rgb", FileNotFoundError, r"missing training folder .*bagel/train/good/rgb"),
        ("mvtec3d", "bagel/test/hole/rgb", FileNotFoundError, r"missing test folder .*bagel/test/hole/rgb"),
    ],
)  # fmt: skip
def test_missing_parts_of_a_category_are_named(name: str, remove: str, error: type, message: str,
                                               tmp_path: Path) -> None:  # fmt: skip
    counts = BUILDERS[name](tmp_path)
    path = tmp_path / remove
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    data = get_dataset_class(name)(root=str(tmp_path), category=counts.category)
    with pytest.raises(error, match=message):
        data.setup("fit")
        data.setup("test")


def _rewrite_split(root: Path, edit: Callable[[str], str]) -> None:
    split = root / "split_csv" / "1cls.csv"
    split.write_text(edit(split.read_text()))


def test_visa_bad_split_files_are_named(tmp_path: Path) -> None:
    build_visa(tmp_path)
    _rewrite_split(tmp_path, lambda text: text.replace("object,split", "category,split", 1))
    with pytest.raises(DatasetError, match=r"1cls.csv' lacks column\(s\) object"):
        _load("visa", tmp_path, "candle")
    build_visa(tmp_path)
    _rewrite_split(tmp_path, lambda text: text.replace(",candle/Data/Masks/Anomaly/001.png", ",", 1))
    with pytest.raises(DatasetError, match=r"Anomaly/001.JPG' has no mask listed \(.*line 10\)"):
        _load("visa", tmp_path, "candle")
    build_visa(tmp_path)
    _rewrite_split(tmp_path, lambda text: text.replace("candle,test,anomaly", "candle,train,anomaly", 1))
    with pytest.raises(DatasetError, match="anomalous image in the training split"):
        _load("visa", tmp_path, "candle")
    build_visa(tmp_path)
    _rewrite_split(tmp_path, lambda text: text.replace("candle,test,normal", "candle,val,normal", 1))
    with pytest.raises(DatasetError, match="split 'val' / label 'normal' is not train/test"):
        _load("visa", tmp_path, "candle")


def test_btad_two_masks_of_one_image_are_refused(tmp_path: Path) -> None:
    build_btad(tmp_path, "01")
    Image.new("L", (64, 48)).save(tmp_path / "01" / "ground_truth" / "ko" / "0000.bmp")
    with pytest.raises(DatasetError, match=r"two masks for one image .*0000.bmp, 0000.png|0000.png, 0000.bmp"):
        _load("btad", tmp_path, "01")


def test_mpdd_cannot_be_downloaded(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"cannot be downloaded .*https://github.com/stepanje/MPDD.*point root"):
        get_dataset_class("mpdd")(root=str(tmp_path), category="tubes", download=True).prepare_data()
    counts = BUILDERS["mpdd"](tmp_path)  # present: nothing to download, no error
    get_dataset_class("mpdd")(root=str(tmp_path), category=counts.category, download=True).prepare_data()


# --------------------------------------------------------------------------- downloads (local server)


def _tar(source: Path, archive: Path, mode: str = "w") -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, mode) as tar:
        for folder in sorted(source.iterdir()):
            tar.add(folder, arcname=folder.name)
    return archive


def _zip(source: Path, archive: Path, prefix: str = "", extra: dict[str, bytes] | None = None) -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            zf.write(path, prefix + path.relative_to(source).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return archive


def test_visa_download(tmp_path: Path, serve: Callable[[Path], str], monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    build_visa(source, "capsules")
    counts = build_visa(source, "candle")
    archive = _tar(source, tmp_path / "served" / visa.VISA_ARCHIVE)
    monkeypatch.setattr(visa, "VISA_URL", serve(archive))
    monkeypatch.setattr(visa, "VISA_SHA256", sha256_of(archive))
    root = tmp_path / "visa"
    data = visa.VisADataModule(root=str(root), category="candle", image_size=SIZE, download=True)
    assert data.category_missing("candle")
    data.prepare_data()
    assert sorted(p.name for p in root.iterdir()) == sorted([visa.VISA_ARCHIVE, "candle", "split_csv"])
    assert is_extracted(root / "candle") and is_extracted(root / "split_csv") and not data.category_missing("candle")
    data.setup("test")
    assert len(data.test_set) == counts.test

    monkeypatch.setattr(visa, "VISA_SHA256", "0" * 64)
    refused = tmp_path / "refused"
    with pytest.raises(ChecksumError, match="expected 0000"):
        visa.VisADataModule(root=str(refused), category="candle", download=True).prepare_data()
    assert list(refused.iterdir()) == [], "a refused download leaves nothing"


def test_btad_download(tmp_path: Path, serve: Callable[[Path], str], monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    counts = build_btad(source, "01")
    build_btad(source, "03")
    # The authors' ZIP wraps the products in one folder; a macOS resource fork folder is ignored.
    archive = _zip(source, tmp_path / "served" / btad.BTAD_ARCHIVE, prefix="BTech_Dataset_transformed/",
                   extra={"__MACOSX/BTech_Dataset_transformed/._01": b"\0"})  # fmt: skip
    monkeypatch.setattr(btad, "BTAD_URL", serve(archive))
    monkeypatch.setattr(btad, "BTAD_SHA256", sha256_of(archive))
    root = tmp_path / "btad"
    data = btad.BTADDataModule(root=str(root), category="01", image_size=SIZE, download=True)
    data.prepare_data()
    assert sorted(p.name for p in root.iterdir()) == ["01", btad.BTAD_ARCHIVE]
    assert is_extracted(root / "01") and not data.category_missing("01")
    data.setup("test")
    _assert_test_set(data, _moved(counts, source, root))

    monkeypatch.setattr(btad, "BTAD_SHA256", "0" * 64)
    refused = tmp_path / "refused"
    with pytest.raises(ChecksumError, match="expected 0000"):
        btad.BTADDataModule(root=str(refused), category="01", download=True).prepare_data()
    assert list(refused.iterdir()) == [], "a refused download leaves nothing"


def _moved(counts: LayoutCounts, source: Path, root: Path) -> LayoutCounts:
    """``counts`` with its paths under ``root`` instead of ``source``."""
    def move(path: str) -> str:
        return str(root / Path(path).relative_to(source))

    counts.masks = {move(k): move(v) for k, v in counts.masks.items()}
    counts.defect_boxes = {move(k): v for k, v in counts.defect_boxes.items()}
    return counts


def test_zip_extraction_without_a_top_folder_and_a_half_extraction(tmp_path: Path) -> None:
    source = tmp_path / "source"
    build_btad(source, "02")
    build_btad(source, "03")
    root = tmp_path / "root"
    archive = _zip(source, root / "btad.zip")  # the products at the top level
    assert extract_zip_category(archive, root, "02") == root / "02"
    assert sorted(p.name for p in root.iterdir()) == ["02", "btad.zip"]
    files = sorted(p.relative_to(root) for p in (root / "02").rglob("*") if p.name != COMPLETE_MARKER)
    assert files == sorted(p.relative_to(source) for p in (source / "02").rglob("*"))
    # A killed older extraction (no marker, the archive beside it) is replaced; leftovers go.
    (root / "02" / COMPLETE_MARKER).unlink()
    shutil.rmtree(root / "02" / "test")
    (root / ".adbench-extract-killed").mkdir()
    extract_zip_category(archive, root, "02")
    assert (root / "02" / "test" / "ko").is_dir() and is_extracted(root / "02")
    assert sorted(p.name for p in root.iterdir()) == ["02", "btad.zip"]
    with pytest.raises(FileNotFoundError, match="'01' is not in archive"):
        extract_zip_category(archive, root, "01")
    assert sorted(p.name for p in root.iterdir()) == ["02", "btad.zip"]


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil.txt", "01/../../evil.txt", "..\\evil.txt", "C:/evil.txt"])
def test_zip_slip_is_refused_and_leaves_nothing(tmp_path: Path, member: str) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("01/train/ok/0000.png", b"fine")
        zf.writestr(zipfile.ZipInfo(member), b"evil")
    root = tmp_path / "nested" / "root"
    root.mkdir(parents=True)
    (root / "btad.zip").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=rf"refusing archive .*member {re.escape(repr(member))}"):
        extract_zip_category(root / "btad.zip", root, "01")
    assert sorted(p.name for p in root.iterdir()) == ["btad.zip"]
    assert not list(tmp_path.rglob("evil.txt"))


def test_mvtec3d_download_needs_a_sha256(tmp_path: Path, serve: Callable[[Path], str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    root = tmp_path / "mvtec3d"
    with pytest.raises(DatasetError, match=re.escape(mvtec3d.MVTEC3D_URL) + r".*md5sum.*"
                       + mvtec3d.MVTEC3D_MD5 + r".*download_sha256.*sha256sum"):  # fmt: skip
        mvtec3d.MVTec3DDataModule(root=str(root), category="bagel", download=True).prepare_data()
    assert not root.exists(), "nothing is fetched"

    source = tmp_path / "source"
    counts = build_mvtec3d(source, "bagel")
    archive = _tar(source, tmp_path / "served" / mvtec3d.MVTEC3D_ARCHIVE, mode="w:xz")
    monkeypatch.setattr(mvtec3d, "MVTEC3D_URL", serve(archive))
    with pytest.raises(ChecksumError, match="expected 0000"):
        mvtec3d.MVTec3DDataModule(root=str(root), category="bagel", download=True,
                                  download_sha256="0" * 64).prepare_data()  # fmt: skip
    assert list(root.iterdir()) == [], "a refused download leaves nothing"
    data = mvtec3d.MVTec3DDataModule(root=str(root), category="bagel", image_size=SIZE, download=True,
                                     download_sha256=sha256_of(archive))  # fmt: skip
    data.prepare_data()
    assert is_extracted(root / "bagel")
    data.setup("test")
    assert len(data.test_set) == counts.test
