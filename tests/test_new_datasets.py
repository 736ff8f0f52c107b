"""MVTec AD 2 (official layout, private predictions in the server's format), Real-IAD (JSON split,
multi-view samples) and the ``folder`` dataset on the Magnetic Tile Defect's shape (normal test split,
defect rule, masks beside images), on tiny generated images; nothing touches the internet."""

from __future__ import annotations

import json
import math
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from adbench.benchmark.orchestration.sweep import SweepConfig
from adbench.cli import AnomalyCLI
from adbench.datamodules import AnomalyDataModule, get_dataset_class
from adbench.datamodules import mvtec_ad2 as ad2
from adbench.datamodules.base import DatasetError
from adbench.datamodules.download import ChecksumError, is_extracted, sha256_of
from adbench.datamodules.folder import FolderDataModule
from adbench.datamodules.real_iad import (
    RealIADDataModule,
    aggregate_views,
    sample_key,
    split_by_sample,
)

from .conftest import REPO
from .dataset_layouts import LayoutCounts, build_mtd, build_mvtec_ad2, build_real_iad, expected_mask

SIZE = 32


def _load(name: str, root: Path, category: str, **kwargs: object) -> AnomalyDataModule:
    data = get_dataset_class(name)(root=str(root), category=category, image_size=SIZE, **kwargs)
    data.setup("fit")
    data.setup("test")
    return data


def _assert_test_set(data: AnomalyDataModule, counts: LayoutCounts) -> None:
    """Counts, labels, defect types, and every mask nonzero exactly where the builder drew."""
    test = data.test_set
    assert len(test) == counts.test and int(test.labels.sum()) == counts.test_anomalous
    assert set(test.defect_types) == {"good", *counts.defect_types}
    assert {str(s.image_path) for s in test.samples if s.label == 1} == set(counts.defect_boxes)
    for index, sample in enumerate(test.samples):
        if sample.label == 1:
            assert str(sample.mask_path) == counts.masks[str(sample.image_path)]
            expected = expected_mask(sample.image_path, counts.defect_boxes[str(sample.image_path)], SIZE)
            assert expected.any() and np.array_equal(test.masks[index], expected), sample.image_path
        else:
            assert sample.defect_type == "good" and sample.mask_path is None and not test.masks[index].any()


def _mask_of_another_size(mask: Path) -> None:
    Image.new("L", (20, 20)).save(mask)


# =========================================================================== MVTec AD 2


def test_mvtec_ad2_reads_the_official_layout(tmp_path: Path) -> None:
    counts = build_mvtec_ad2(tmp_path)
    data = _load("mvtec_ad2", tmp_path, "can")
    assert len(data.train_set) == counts.train, "all of train/good is trained on"
    assert [s.image_path.parent for s in data.val_set.samples] == [tmp_path / "can" / "validation" / "good"] * 2
    _assert_test_set(data, counts)
    assert not {s.image_path.parent.name for s in data.test_set.samples} & {"test_private", "test_private_mixed"}
    item = data.test_set[0]
    assert item["image"].shape == (3, SIZE, SIZE) and item["mask"].shape == (1, SIZE, SIZE)
    carved = _load("mvtec_ad2", tmp_path, "can", use_official_validation=False, val_fraction=0.4)
    assert len(carved.train_set) == 3 and len(carved.val_set) == 2
    assert all("train/good" in s.image_path.as_posix() for s in carved.val_set.samples)
    private = data.private_samples("can", "test_private_mixed")
    assert [s.image_path.stem for s in private] == counts.private["test_private_mixed"]
    assert {(s.label, s.defect_type, s.category) for s in private} == {(-1, "unknown", "can")}


def test_mvtec_ad2_categories_and_the_cli(tmp_path: Path) -> None:
    build_mvtec_ad2(tmp_path / "data", "walnuts")
    build_mvtec_ad2(tmp_path / "data", "can")
    cls = get_dataset_class("mvtec_ad2")
    assert cls.categories_under(tmp_path / "data") == ["can", "walnuts"]
    with pytest.raises(FileNotFoundError, match=r"MVTec AD 2 category 'rice' not found .*there: can, walnuts$"):
        cls(root=str(tmp_path / "data"), category="rice").setup("fit")
    cli = AnomalyCLI(args=[
        "--data", "mvtec_ad2", "--data.root", str(tmp_path / "data"), "--data.category", "all",
        "--data.image_size=32", "--model", "stpm", "--model.weights=random",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ], run=False)  # fmt: skip
    data = cli.datamodule
    assert type(data) is cls and data.use_official_validation
    data.setup("test")
    assert sorted(set(data.test_set.categories)) == ["can", "walnuts"] and len(data.test_set) == 10


@pytest.mark.parametrize(
    ("remove", "error", "message"),
    [
        ("can/validation", FileNotFoundError, r"missing validation folder .*can/validation/good.*use_official_validation"),
        ("can/train/good", FileNotFoundError, r"missing training folder .*can/train/good"),
        ("can/test_public/bad", FileNotFoundError, r"missing test folder .*can/test_public/bad"),
        ("can/test_public/ground_truth/bad/002_regular_mask.png", DatasetError,
         r"defective test image .*bad/002_regular.png' has no mask at .*ground_truth/bad/002_regular_mask.png"),
    ],
)  # fmt: skip
def test_mvtec_ad2_missing_parts_are_named(tmp_path: Path, remove: str, error: type, message: str) -> None:
    build_mvtec_ad2(tmp_path)
    path = tmp_path / remove
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(error, match=message):
        _load("mvtec_ad2", tmp_path, "can")


def test_mvtec_ad2_empty_folders_and_wrong_mask_size_are_named(tmp_path: Path) -> None:
    build_mvtec_ad2(tmp_path)
    mask = tmp_path / "can" / "test_public" / "ground_truth" / "bad" / "000_regular_mask.png"
    _mask_of_another_size(mask)
    with pytest.raises(DatasetError, match=r"mask .*000_regular_mask.png' is 20x20 but its image .*bad/000_regular.png' is 64x48"):
        _load("mvtec_ad2", tmp_path, "can")
    for path in (tmp_path / "can" / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=r"no images in training folder .*can/train/good"):
        _load("mvtec_ad2", tmp_path, "can")
    shutil.rmtree(tmp_path / "can" / "test_private")
    with pytest.raises(FileNotFoundError, match=r"missing private test \(test_private\) folder .*can/test_private"):
        ad2.private_images(tmp_path / "can", "test_private")
    (tmp_path / "can" / "test_private").mkdir()
    with pytest.raises(DatasetError, match=r"no images in private test folder"):
        ad2.private_images(tmp_path / "can", "test_private")
    with pytest.raises(ValueError, match="split must be one of"):
        ad2.private_images(tmp_path / "can", "test_public")


# --------------------------------------------------------------------------- predictions for the server


@dataclass
class _Prediction:
    anomaly_map: np.ndarray


class _Detector:
    """A stand-in for adbench.api.Detector: the map is the red channel in [0, 1] (defects: 250/255)."""

    pixel_threshold = 0.9

    def predict(self, path: Path) -> _Prediction:
        with Image.open(path) as image:
            return _Prediction(np.asarray(image.convert("RGB"), dtype=np.float32)[..., 0] / 255.0)


def test_float16_tiff_round_trip_through_tifffile(tmp_path: Path) -> None:
    array = np.random.default_rng(0).random((5, 7)).astype(np.float32) * 3
    for compress in (False, True):
        path = ad2.write_float16_tiff(tmp_path / f"{compress}.tiff", array, compress=compress)
        with tifffile.TiffFile(path) as tiff:  # what MVTec's checker reads
            page = tiff.pages[0]
            assert page.dtype == np.float16 and page.shape == (5, 7)
            assert page.compression == (tifffile.COMPRESSION.ADOBE_DEFLATE if compress else tifffile.COMPRESSION.NONE)
        back = ad2.read_float_tiff(path)
        assert back.dtype == np.float16 and np.array_equal(back, array.astype(np.float16))
    with pytest.raises(ValueError, match="2-D"):
        ad2.write_float16_tiff(tmp_path / "x.tiff", np.zeros((2, 2, 3)))
    Image.fromarray(np.zeros((3, 3), dtype=np.uint8)).save(tmp_path / "gray.tiff")
    with pytest.raises(ad2.SubmissionError, match="not a single-channel float TIFF"):
        ad2.read_float_tiff(tmp_path / "gray.tiff")


def test_mvtec_ad2_private_predictions_in_the_server_format(tmp_path: Path) -> None:
    counts = build_mvtec_ad2(tmp_path / "data")
    detector, out = _Detector(), tmp_path / "submission"
    summary = ad2.write_predictions(detector, tmp_path / "data", "can", out)
    validation = [detector.predict(p).anomaly_map.astype(np.float64)
                  for p in sorted((tmp_path / "data" / "can" / "validation" / "good").iterdir())]  # fmt: skip
    pixels = np.concatenate([v.ravel() for v in validation])
    assert summary.threshold == pytest.approx(pixels.mean() + 3 * pixels.std(), rel=1e-9)
    assert summary.threshold_rule == "validation mean+3std"
    for split, stems in counts.private.items():
        assert [(t.name, p.name) for t, p in summary.files[split]] == [(f"{s}.tiff", f"{s}.png") for s in stems]
        for stem in stems:
            image = tmp_path / "data" / "can" / split / f"{stem}.png"
            expected = detector.predict(image).anomaly_map
            tiff = ad2.read_float_tiff(out / "anomaly_images" / "can" / split / f"{stem}.tiff")
            assert tiff.dtype == np.float16 and tiff.shape == expected.shape
            np.testing.assert_array_equal(tiff, expected.astype(np.float16))
            binary = np.asarray(Image.open(out / "anomaly_images_thresholded" / "can" / split / f"{stem}.png"))
            assert binary.dtype == np.uint8 and binary.ndim == 2
            assert np.array_equal(binary, np.where(expected >= summary.threshold, 255, 0))
            assert (binary == 255).any(), "the drawn defect is above the validation threshold"
    assert ad2.check_submission(out, root=tmp_path / "data", complete=False) == 5
    with pytest.raises(ad2.SubmissionError, match=r"anomaly_images' holds \['can'\], expected \['can', 'fabric'"):
        ad2.check_submission(out)  # the upload needs all 8 categories
    archive = ad2.archive_submission(out)
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    assert len(names) == 10 and names[0] == "submission/anomaly_images/can/test_private/000_regular.tiff"


def test_mvtec_ad2_thresholds_and_refused_submissions(tmp_path: Path) -> None:
    build_mvtec_ad2(tmp_path / "data")
    detector = _Detector()
    assert ad2.write_predictions(detector, tmp_path / "data", "can", tmp_path / "a", splits=["test_private"],
                                 threshold="checkpoint").threshold == 0.9  # fmt: skip
    assert ad2.write_predictions(detector, tmp_path / "data", "can", tmp_path / "b", threshold=0.5,
                                 compress=False).threshold_rule == "given"  # fmt: skip
    detector.pixel_threshold = math.nan
    with pytest.raises(ValueError, match=r"threshold \(checkpoint pixel_threshold\) is nan"):
        ad2.write_predictions(detector, tmp_path / "data", "can", tmp_path / "c", threshold="checkpoint")
    with pytest.raises(ValueError, match="threshold must be"):
        ad2.write_predictions(detector, tmp_path / "data", "can", tmp_path / "c", threshold="median")
    out = tmp_path / "b"
    binary = out / "anomaly_images_thresholded" / "can" / "test_private" / "001_regular.png"
    Image.fromarray(np.full((40, 56), 7, dtype=np.uint8)).save(binary)
    with pytest.raises(ad2.SubmissionError, match=r"001_regular'.png is not a single-channel image with values in \{0, 255\}"):
        ad2.check_submission(out, complete=False)
    binary.unlink()
    with pytest.raises(ad2.SubmissionError, match=r"missing \['001_regular.png'\]"):
        ad2.check_submission(out, complete=False)
    (out / "notes.txt").write_text("x")
    with pytest.raises(ad2.SubmissionError, match="must hold exactly anomaly_images/ and anomaly_images_thresholded/"):
        ad2.check_submission(out, complete=False)


def test_check_submission_knows_the_official_file_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ad2, "SUBMISSION_FILE_COUNTS", dict.fromkeys(ad2.MVTEC_AD2_CATEGORIES, 2))
    out, tiny = tmp_path / "full", np.zeros((2, 3), dtype=np.float32)
    for category in ad2.MVTEC_AD2_CATEGORIES:
        for split, suffix in ad2.PRIVATE_SUFFIX.items():
            for i in range(2):
                ad2.write_float16_tiff(out / "anomaly_images" / category / split / f"{i:03d}_{suffix}.tiff", tiny)
                png = out / "anomaly_images_thresholded" / category / split / f"{i:03d}_{suffix}.png"
                png.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.zeros((2, 3), dtype=np.uint8)).save(png)
    assert ad2.check_submission(out) == 8 * 2 * 2
    maps = out / "anomaly_images" / "rice" / "test_private_mixed"
    (maps / "001_mixed.tiff").rename(maps / "001_regular.tiff")
    with pytest.raises(ad2.SubmissionError, match=r"rice/test_private_mixed': 2 file\(s\), expected 2 .tiff files; "
                       r"missing \['001_mixed.tiff'\], superfluous \['001_regular.tiff'\]"):
        ad2.check_submission(out)
    (maps / "001_regular.tiff").rename(maps / "001_mixed.tiff")
    shutil.rmtree(out / "anomaly_images" / "vial" / "test_private")
    with pytest.raises(ad2.SubmissionError, match=r"vial' holds \['test_private_mixed'\], expected"):
        ad2.check_submission(out)


def test_mvtec_ad2_download_from_a_local_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               serve: Callable[[Path], str]) -> None:  # fmt: skip
    source = tmp_path / "source"
    counts = build_mvtec_ad2(source, "vial")
    build_mvtec_ad2(source, "rice")
    archive = tmp_path / "served" / ad2.MVTEC_AD2_ARCHIVE
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for folder in sorted(source.iterdir()):
            tar.add(folder, arcname=folder.name)
    monkeypatch.setattr(ad2, "MVTEC_AD2_URL", serve(archive))
    monkeypatch.setattr(ad2, "MVTEC_AD2_SHA256", sha256_of(archive))
    root = tmp_path / "mvtec_ad2"
    data = ad2.MVTecAD2DataModule(root=str(root), category="vial", image_size=SIZE, download=True)
    data.prepare_data()
    assert sorted(p.name for p in root.iterdir()) == sorted([ad2.MVTEC_AD2_ARCHIVE, "vial"]) and is_extracted(root / "vial")
    data.setup("test")
    assert len(data.test_set) == counts.test
    with pytest.raises(DatasetError, match=r"'walnuts' is not in archive.*extract .*mvtec_ad_2.tar.gz' by hand"):
        ad2.MVTecAD2DataModule(root=str(root), category="walnuts", download=True).prepare_data()
    monkeypatch.setattr(ad2, "MVTEC_AD2_SHA256", "0" * 64)
    refused = tmp_path / "refused"
    with pytest.raises(ChecksumError, match="expected 0000"):
        ad2.MVTecAD2DataModule(root=str(refused), category="vial", download=True).prepare_data()
    assert list(refused.iterdir()) == [], "a refused download leaves nothing"


# =========================================================================== Real-IAD


def test_real_iad_reads_the_json_split(tmp_path: Path) -> None:
    counts = build_real_iad(tmp_path)
    data = _load("real_iad", tmp_path, "audiojack", val_fraction=0.0)
    assert len(data.train_set) == counts.train and not data.train_set.labels.any()
    _assert_test_set(data, counts)
    ng5 = [s for s in data.test_set.samples if s.sample_id == "audiojack_0005_NG"]
    assert [(s.view, s.label) for s in ng5] == [("C1", 1), ("C2", 1), ("C3", 0), ("C4", 0), ("C5", 0)], \
        "a view of a defective object without a mask is a normal image, as the official loader reads it"
    assert get_dataset_class("real_iad").categories_under(tmp_path / "realiad_1024") == ["audiojack"]


def test_real_iad_items_carry_the_object_and_views_aggregate(tmp_path: Path) -> None:
    counts = build_real_iad(tmp_path)
    data = _load("real_iad", tmp_path, "audiojack", val_fraction=0.0)
    items = [data.test_set[i] for i in range(len(data.test_set))]
    assert {item["sample_id"] for item in items} == set(counts.objects)
    assert all(item["view"] == f"C{i % 5 + 1}" for i, item in enumerate(sorted(items, key=lambda x: x["path"])))
    assert set(data.train_set[0]) >= {"sample_id", "view", "image", "mask", "label"}
    batch = next(iter(data.test_dataloader()))
    assert len(batch["sample_id"]) == len(batch["path"]), "collated like the paths"
    scores = [float(i) for i in range(len(items))]
    ids, object_scores, object_labels = aggregate_views([it["sample_id"] for it in items], scores,
                                                        [int(it["label"]) for it in items])  # fmt: skip
    assert sorted(ids) == sorted(counts.objects)
    for sample_id, score, label in zip(ids, object_scores, object_labels, strict=True):
        views = [i for i, it in enumerate(items) if it["sample_id"] == sample_id]
        assert len(views) == counts.objects[sample_id][1] and score == max(scores[i] for i in views)
        assert label == counts.objects[sample_id][0]
    assert aggregate_views(["a", "a", "b"], [1, 3, 2], [0, 1, 0], reduce=np.mean)[1].tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="differ in length"):
        aggregate_views(["a"], [1, 2], [0])
    assert sample_key("NG/AK/S0005/audiojack_0005_NG_C3_20230525153003.jpg") == ("audiojack_0005_NG", "C3")
    assert sample_key("x/other.png") == ("x/other", "")


def test_real_iad_validation_holds_out_whole_objects(tmp_path: Path) -> None:
    build_real_iad(tmp_path)
    data = _load("real_iad", tmp_path, "audiojack", val_fraction=0.34)
    train_ids = {s.sample_id for s in data.train_set.samples}
    val_ids = {s.sample_id for s in data.val_set.samples}
    assert len(val_ids) == 1 and len(data.val_set) == 5 and len(train_ids) == 2 and not train_ids & val_ids
    again = _load("real_iad", tmp_path, "audiojack", val_fraction=0.34)
    assert [s.image_path for s in again.val_set.samples] == [s.image_path for s in data.val_set.samples]
    train, val = split_by_sample(data.train_set.samples + data.val_set.samples, 0.0, 0)
    assert len(val) == 0 and len(train) == 15


def test_real_iad_cli_unified_and_other_json_folders(tmp_path: Path) -> None:
    build_real_iad(tmp_path, "audiojack", resolution="256")
    build_real_iad(tmp_path, "zipper", resolution="256")
    cli = AnomalyCLI(args=[
        "--data", "real_iad", "--data.root", str(tmp_path), "--data.category", "all", "--data.resolution", "256",
        "--data.image_size=32", "--model", "stpm", "--model.weights=random",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ], run=False)  # fmt: skip
    data = cli.datamodule
    assert type(data) is RealIADDataModule and data.resolution == "256"
    assert data.category_names == ["audiojack", "zipper"]
    data.setup("test")
    assert len(data.test_set) == 30 and set(data.test_set.categories) == {"audiojack", "zipper"}
    # anomalib's place for the JSONs (one folder deeper), and another split folder by name.
    nested = tmp_path / "realiad_jsons" / "realiad_jsons_sv"
    nested.mkdir()
    shutil.copy(tmp_path / "realiad_jsons" / "zipper.json", nested / "zipper.json")
    sv = RealIADDataModule(root=str(tmp_path), category="zipper", resolution=256, split_folder="realiad_jsons_sv")
    assert sv.split_file("zipper") == nested / "zipper.json"
    assert len(sv.test_samples("zipper")) == 15


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda r: (r / "realiad_jsons" / "audiojack.json").unlink(), FileNotFoundError,
         r"missing Real-IAD split file .*realiad_jsons/audiojack.json"),
        (lambda r: shutil.rmtree(r / "realiad_1024"), FileNotFoundError,
         r"missing Real-IAD image folder .*realiad_1024' \(resolution='1024'\); folders there: realiad_jsons"),
        (lambda r: min((r / "realiad_1024" / "audiojack" / "OK" / "S0002").iterdir()).unlink(), FileNotFoundError,
         r"image .*audiojack_0002_OK_C1_.*jpg' listed in .*audiojack.json' train\[5\] does not exist"),
        (lambda r: next((r / "realiad_1024" / "audiojack" / "NG" / "HS").rglob("*C3*_mask.png")).unlink(), DatasetError,
         r"defective test image .*0006_NG_C3.*jpg' has no mask at .*_mask.png' \(.*test\[8\]\)"),
        (lambda r: _mask_of_another_size(next((r / "realiad_1024" / "audiojack").rglob("*0005_NG_C1*_mask.png"))),
         DatasetError, r"mask .*0005_NG_C1.*_mask.png' is 20x20 but its image .*0005_NG_C1.*jpg' is 64x48"),
        (lambda r: _rewrite(r, lambda t: t.replace('"train": [', '"train": [], "old": [', 1)), DatasetError,
         r"no train entries for object 'audiojack' in .*audiojack.json'"),
        (lambda r: _rewrite(r, lambda t: t.replace('"test"', '"tests"', 1)), DatasetError,
         r"must be an object with 'train' and 'test' lists"),
        (lambda r: _rewrite(r, lambda t: t.replace('"OK/S0001/', '"../../../OK/S0001/', 1)), DatasetError,
         r"train\[0\]: path '../../../OK/S0001/.*' leaves the image folder"),
        (lambda r: _rewrite(r, lambda t: t.replace('"category": "audiojack"', '"category": "zipper"', 1)),
         DatasetError, r"train\[0\]: entry of object 'zipper' in the split file of 'audiojack'"),
        (lambda r: _rewrite(r, lambda t: t[:-5]), DatasetError, r"cannot read Real-IAD split file"),
    ],
)  # fmt: skip
def test_real_iad_bad_input_is_named(tmp_path: Path, edit: Callable[[Path], object], error: type, message: str) -> None:
    build_real_iad(tmp_path)
    edit(tmp_path)
    with pytest.raises(error, match=message):
        _load("real_iad", tmp_path, "audiojack")


def _rewrite(root: Path, change: Callable[[str], str]) -> None:
    path = root / "realiad_jsons" / "audiojack.json"
    path.write_text(change(path.read_text()))


def test_real_iad_arguments_and_download(tmp_path: Path) -> None:
    build_real_iad(tmp_path)
    with pytest.raises(ValueError, match="resolution must be one of 256, 512, 1024, raw"):
        RealIADDataModule(root=str(tmp_path), category="audiojack", resolution=2048)
    with pytest.raises(FileNotFoundError, match=r"Real-IAD category 'zipper' not found .*there: audiojack"):
        _load("real_iad", tmp_path, "zipper")
    with pytest.raises(DatasetError, match=r"cannot be downloaded .*realiad4ad.github.io"):
        RealIADDataModule(root=str(tmp_path), category="zipper", download=True).prepare_data()


# =========================================================================== both, in a sweep


@pytest.mark.parametrize(("name", "build", "category"), [("mvtec_ad2", build_mvtec_ad2, "vial"),
                                                          ("real_iad", build_real_iad, "toy")])
def test_the_sweep_selects_the_new_datasets_by_name(tmp_path: Path, name: str, build: Callable[..., LayoutCounts],
                                                     category: str) -> None:  # fmt: skip
    root = tmp_path / name
    counts = build(root, category)
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({"name": "new", "methods": ["stpm"], "profile": "quick", "seeds": [0],
                                "dataset": name, "root": str(root), "categories": "all",
                                "overrides": {"data.image_size": 32}}))  # fmt: skip
    jobs = SweepConfig.from_yaml(path).jobs()
    assert [j.category for j in jobs] == [category]
    data = AnomalyCLI(args=jobs[0].config(), run=False).datamodule
    assert type(data) is get_dataset_class(name)
    data.setup()
    assert len(data.train_set) + len(data.val_set or []) == counts.train + counts.validation
    assert int(data.test_set.labels.sum()) == counts.test_anomalous and len(data.test_set) == counts.test


# =========================================================================== folder: Magnetic Tile Defect


MTD = {"normal": "MT_Free/Imgs", "test_abnormal": "MT_[!F]*/Imgs", "masks_beside": ".png",
       "defect": r"MT_(\w+)/Imgs", "normal_test_split": 0.2}  # fmt: skip


def _mtd(root: Path, **kwargs: object) -> FolderDataModule:
    return FolderDataModule(root=str(root), category="mtd", image_size=SIZE, **{**MTD, **kwargs})


def test_folder_reads_the_magnetic_tile_defect_shape(tmp_path: Path) -> None:
    counts = build_mtd(tmp_path)
    data = _mtd(tmp_path, val_fraction=0.25, normal_test_list=str(tmp_path / "run" / "normal_test.txt"))
    data.setup("fit")
    data.setup("test")
    trained = {s.image_path for s in data.train_set.samples + data.val_set.samples}
    carved = [s.image_path for s in data.test_set.samples if s.label == 0]
    assert len(trained) == 8 and len(carved) == 2 and not trained & set(carved), "train and test disjoint"
    assert {p.suffix for p in trained | set(carved)} == {".jpg"}, "the masks beside are never images"
    assert data.normal_test_files == [str(p) for p in carved]
    assert (tmp_path / "run" / "normal_test.txt").read_text().splitlines() == \
        [Path(p).relative_to(tmp_path).as_posix() for p in data.normal_test_files]
    counts.test_good = 2
    _assert_test_set(data, counts)
    assert sorted(set(data.test_set.defect_types) - {"good"}) == ["Blowhole", "Crack"]
    # Reproducible by the seed; another seed carves other files.
    again = _mtd(tmp_path)
    assert [s.image_path for s in again.test_samples("mtd") if s.label == 0] == carved
    assert again.normal_test_files == data.normal_test_files
    others = [_mtd(tmp_path, split_seed=seed) for seed in (1, 2, 3)]
    assert any(o.test_samples("mtd") and o.normal_test_files != data.normal_test_files for o in others)


def test_folder_defect_rule_by_index_and_placeholder(tmp_path: Path) -> None:
    build_mtd(tmp_path)
    by_index = _mtd(tmp_path, defect=0).test_samples("mtd")
    assert sorted({s.defect_type for s in by_index if s.label}) == ["MT_Blowhole", "MT_Crack"]
    assert {s.defect_type for s in _mtd(tmp_path, defect=-3).test_samples("mtd") if s.label} == {"MT_Blowhole", "MT_Crack"}
    # {defect} follows the rule: masks moved to gt/<type>/.
    for png in tmp_path.glob("MT_[!F]*/Imgs/*.png"):
        target = tmp_path / "gt" / png.parts[-3][3:] / png.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(png, target)
    moved = _mtd(tmp_path, masks_beside=None, mask="gt/{defect}/{stem}.png").test_samples("mtd")
    assert {s.mask_path.parent.name for s in moved if s.label} == {"Blowhole", "Crack"}
    with pytest.raises(DatasetError, match=r"defective image .*MT_Blowhole/Imgs/exp1_num_1.jpg' has no mask at .*exp1_num_1.png' \(masks_beside '.png'\)"):
        _mtd(tmp_path).test_samples("mtd")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"defect": r"Imgs/(\d+)"}, DatasetError, r"defect regex 'Imgs/\(\\\\d\+\)' does not match image .*MT_Blowhole"),
        ({"defect": 5}, DatasetError, r"defect=5: image .* has no path part 5 .*has 3\)"),
        ({"defect": r"MT_\w+"}, ValueError, r"must have exactly one group .* it has 0"),
        ({"defect": r"(MT_(\w+)"}, ValueError, r"does not compile"),
        ({"normal_test_split": 1.0}, ValueError, r"normal_test_split must be in \[0, 1\)"),
        ({"normal_test_split": 0.99}, DatasetError, r"normal_test_split=0.99 of 10 normal image\(s\) leaves none"),
        ({"masks_beside": "png"}, ValueError, r"masks_beside must be an image suffix"),
        ({"test_abnormal": "MT_Crack/Imgs/*.png"}, DatasetError, r"matches only masks beside their images \(2"),
        # Without masks_beside a folder of images and masks is refused (its masks read as images).
        ({"masks_beside": None, "mask": "{parent}/{stem}.png"}, DatasetError,
         r"exp1_num_1.png' is the mask of .*exp1_num_1.jpg' but is also listed as an image by test_abnormal"),
    ],
)  # fmt: skip
def test_folder_bad_rules_are_named(tmp_path: Path, kwargs: dict, error: type, message: str) -> None:
    build_mtd(tmp_path)
    with pytest.raises(error, match=message):
        _mtd(tmp_path, **kwargs).setup("test")


def test_folder_rules_through_the_cli(tmp_path: Path) -> None:
    build_mtd(tmp_path)
    args = ["--config", str(REPO / "configs" / "padim" / "quick.yaml"), "--data", "folder", "--data.root", str(tmp_path),
            "--data.category", "mtd", "--data.normal", "MT_Free/Imgs", "--data.test_abnormal", "MT_[!F]*/Imgs",
            "--data.masks_beside", ".png", "--data.normal_test_split", "0.2", "--data.image_size", "32",
            "--trainer.default_root_dir", str(tmp_path / "run")]  # fmt: skip
    regex = AnomalyCLI(args=[*args, "--data.defect", r"MT_(\w+)/Imgs"], run=False).datamodule
    assert regex.defect == r"MT_(\w+)/Imgs"
    index = AnomalyCLI(args=[*args, "--data.defect", "0"], run=False).datamodule
    assert index.defect == 0 and isinstance(index.defect, int)
    regex.setup("test")
    assert sorted(set(regex.test_set.defect_types)) == ["Blowhole", "Crack", "good"]


def test_folder_mtd_batches_fit_padim(tmp_path: Path, one_thread: None) -> None:
    """End to end: PaDiM (random weights, 64 px, one epoch) fits and tests on the MTD-shaped data."""
    from lightning import Trainer, seed_everything

    from adbench.callbacks.evaluation import AnomalyEvaluator
    from adbench.models.padim import PaDiM

    build_mtd(tmp_path)
    seed_everything(0, verbose=False)
    data = FolderDataModule(root=str(tmp_path), category="mtd", image_size=64, batch_size=4, val_fraction=0.0, **MTD)
    model = PaDiM(backbone="tf_efficientnet_lite0", layers=(1, 2), channels=16, weights="random")
    evaluator = AnomalyEvaluator()
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[evaluator])  # fmt: skip
    trainer.fit(model, datamodule=data)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64)
    trainer.test(model, datamodule=data, verbose=False)
    metrics = evaluator.test_metrics
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert math.isfinite(metrics["pixel_auroc"]), "the masks beside the defective images were read"
