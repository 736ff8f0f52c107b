"""MVTec LOCO AD (several masks per image, official validation, download) and the ``folder``
dataset (any layout by arguments), on tiny generated images; plus ``folder`` on real MVTec AD."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import math
import shutil
import tarfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import Trainer
from PIL import Image

from adbench.callbacks import AnomalyEvaluator
from adbench.callbacks.intervals import bootstrap_intervals
from adbench.callbacks.metrics import compute_anomaly_metrics, saturated_pro
from adbench.cli import AnomalyCLI
from adbench.datamodules import MVTecDataModule, get_dataset_class
from adbench.datamodules import loco as loco_module
from adbench.datamodules.base import DatasetError, read_mask
from adbench.datamodules.download import ChecksumError
from adbench.datamodules.folder import FolderDataModule
from adbench.datamodules.loco import LOCO_ARCHIVE, MVTecLOCODataModule
from adbench.models.base import AnomalyModule, AnomalyOutput

from .conftest import MVTEC_ROOT, REPO, requires_mvtec

W, H = 64, 48  # non-square, as LOCO's images are
SIZE = 32


def _image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, *boxes: tuple[int, int, int, int]) -> np.ndarray:
    """A 0/255 mask with the rectangles (top, bottom, left, right); returns it as {0, 1}."""
    array = np.zeros((H, W), dtype=np.uint8)
    for top, bottom, left, right in boxes:
        array[top:bottom, left:right] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return (array > 0).astype(np.uint8)


def _resized(full: np.ndarray) -> np.ndarray:
    return (np.asarray(Image.fromarray(full * 255).resize((SIZE, SIZE), Image.Resampling.NEAREST)) > 127).astype(
        np.uint8
    )


# --------------------------------------------------------------------------- MVTec LOCO AD


@pytest.fixture
def loco_root(tmp_path: Path) -> Path:
    """breakfast_box in LOCO layout: 4 train, 2 validation, test 2 good + 2 logical + 1 structural;
    logical 000 has two mask files (two defects), the others one."""
    category = tmp_path / "loco" / "breakfast_box"
    for i in range(4):
        _image(category / "train" / "good" / f"{i:03d}.png", i)
    for i in range(2):
        _image(category / "validation" / "good" / f"{i:03d}.png", 10 + i)
        _image(category / "test" / "good" / f"{i:03d}.png", 20 + i)
        _image(category / "test" / "logical_anomalies" / f"{i:03d}.png", 30 + i)
    _image(category / "test" / "structural_anomalies" / "000.png", 40)
    gt = category / "ground_truth"
    _mask(gt / "logical_anomalies" / "000" / "000.png", (2, 12, 4, 20))
    _mask(gt / "logical_anomalies" / "000" / "001.png", (30, 44, 40, 60))
    _mask(gt / "logical_anomalies" / "001" / "000.png", (10, 30, 10, 30))
    _mask(gt / "structural_anomalies" / "000" / "000.png", (0, 8, 0, 8))
    # The defect of logical 001 is of a kind that saturates at half its area (pixel value 128).
    relative = np.asarray(Image.open(gt / "logical_anomalies" / "001" / "000.png")) // 255 * 128
    Image.fromarray(relative.astype(np.uint8)).save(gt / "logical_anomalies" / "001" / "000.png")
    (category / "defects_config.json").write_text(json.dumps([
        {"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 200, "relative_saturation": False},
        {"defect_name": "extra", "pixel_value": 128, "saturation_threshold": 0.5, "relative_saturation": True},
    ]))  # fmt: skip
    return tmp_path / "loco"


def _loco(root: Path, **kwargs: object) -> MVTecLOCODataModule:
    return MVTecLOCODataModule(root=str(root), category="breakfast_box", image_size=SIZE, **kwargs)


def test_loco_counts_defect_types_and_official_validation(loco_root: Path) -> None:
    assert get_dataset_class("loco") is MVTecLOCODataModule and MVTecLOCODataModule.report_per_defect_type
    data = _loco(loco_root)
    assert data.hparams["use_official_validation"] is True
    data.setup("fit")
    data.setup("test")
    # Official validation: all 4 train/good images are trained on, validation/good validates.
    assert len(data.train_set) == 4 and {p.image_path.parent.parent.name for p in data.train_set.samples} == {"train"}
    assert [s.image_path.parent.parent.name for s in data.val_set.samples] == ["validation"] * 2
    assert len(data.test_set) == 5
    assert sorted(data.test_set.defect_types) == ["good", "good", "logical_anomalies", "logical_anomalies",
                                                  "structural_anomalies"]  # fmt: skip
    assert data.test_set.labels.tolist() == [int(t != "good") for t in data.test_set.defect_types]
    assert all(s.category == "breakfast_box" for s in data.test_set.samples)
    assert MVTecLOCODataModule(root=str(loco_root), category="all").category_names == ["breakfast_box"]


def test_loco_several_masks_are_merged(loco_root: Path) -> None:
    data = _loco(loco_root)
    data.setup("test")
    gt = loco_root / "breakfast_box" / "ground_truth" / "logical_anomalies" / "000"
    index = next(i for i, s in enumerate(data.test_set.samples) if s.mask_path == gt)
    first = _resized(_mask(gt / "000.png", (2, 12, 4, 20)))
    second = _resized(_mask(gt / "001.png", (30, 44, 40, 60)))
    merged = data.test_set.masks[index]
    assert np.array_equal(merged, first | second), "the mask is the union of the image's mask files"
    assert merged.sum() > first.sum() and merged.sum() > second.sum()
    # Every defective image has a mask, every good one none.
    has_pixels = data.test_set.masks.reshape(len(data.test_set), -1).any(axis=1)
    assert np.array_equal(has_pixels, data.test_set.labels.astype(bool))
    # The same union straight from read_mask, at the file's own resolution too.
    image = loco_root / "breakfast_box" / "test" / "logical_anomalies" / "000.png"
    assert np.array_equal(read_mask(gt, SIZE, image), first | second)


def test_loco_saturation_regions_follow_defects_config(loco_root: Path) -> None:
    data = _loco(loco_root)
    test = loco_root / "breakfast_box" / "test"
    assert data.saturation_regions(test / "good" / "000.png", SIZE) == []
    first, second = data.saturation_regions(test / "logical_anomalies" / "000.png", SIZE)  # two mask files
    scale = SIZE * SIZE / (W * H)  # an absolute saturation area is in full-size pixels
    for (mask, saturation), box in zip((first, second), ((2, 12, 4, 20), (30, 44, 40, 60)), strict=True):
        full = np.zeros((H, W), dtype=np.uint8)
        full[box[0]:box[1], box[2]:box[3]] = 1
        assert np.array_equal(mask, _resized(full).astype(bool))
        assert saturation == pytest.approx(min(200 * scale, mask.sum()))
    assert first[1] == first[0].sum() and second[1] < second[0].sum(), "the small defect saturates at its area"
    ((mask, saturation),) = data.saturation_regions(test / "logical_anomalies" / "001.png", SIZE)
    assert saturation == pytest.approx(0.5 * mask.sum())  # relative: half its area
    (loco_root / "breakfast_box" / "defects_config.json").write_text("[]")
    with pytest.raises(DatasetError, match="pixel value 255"):
        _loco(loco_root).saturation_regions(test / "structural_anomalies" / "000.png", SIZE)


def test_loco_test_reports_spro_from_the_datamodule(loco_root: Path) -> None:
    data = _loco(loco_root, eval_batch_size=8)
    evaluator = AnomalyEvaluator(bootstrap_resamples=200)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[evaluator])  # fmt: skip
    model = _MeanIntensity()
    trainer.test(model, datamodule=data)
    with torch.no_grad():
        maps = torch.cat([model(batch["image"]).anomaly_map[:, 0] for batch in data.test_dataloader()])
    labels = data.test_set.labels
    regions = {i: data.saturation_regions(s.image_path, SIZE) for i, s in enumerate(data.test_set.samples) if labels[i]}
    expected = saturated_pro(maps.numpy(), labels, regions)
    assert evaluator.test_metrics["spro_fpr05"] == pytest.approx(expected[0], abs=1e-6)
    assert evaluator.test_metrics["spro"] == pytest.approx(expected[1], abs=1e-6)
    assert 0.0 <= expected[0] <= 1.0 and expected[1] != evaluator.test_metrics["pro"]
    # Intervals like every metric's, on the same resamples as the others'.
    for key in ("spro_fpr05", "spro"):
        low, high = evaluator.test_intervals[key]
        assert low <= evaluator.test_metrics[key] <= high and high - low > 0
    # Per anomaly type too (that type's defects against the good images).
    assert "spro" in evaluator.test_metrics_by_defect_type["breakfast_box/logical_anomalies"]


class _MeanIntensity(AnomalyModule):
    """Anomaly map = mean intensity of the image (nothing trained)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        anomaly_map = images.mean(dim=1, keepdim=True) * self.weight
        return AnomalyOutput(anomaly_map, anomaly_map.flatten(1).amax(dim=1))


def test_loco_validation_carved_from_train_when_asked(loco_root: Path) -> None:
    data = _loco(loco_root, use_official_validation=False, val_fraction=0.25)
    data.setup("fit")
    assert len(data.train_set) == 3 and len(data.val_set) == 1
    assert all("train/good" in str(s.image_path) for s in data.train_set.samples + data.val_set.samples)
    shots = _loco(loco_root, train_shots=2)  # the few-shot draw still applies to train/good
    shots.setup("fit")
    assert len(shots.train_set) == 2 and len(shots.val_set) == 2
    shutil.rmtree(loco_root / "breakfast_box" / "validation")
    with pytest.raises(FileNotFoundError, match=r"missing validation folder.*use_official_validation=False"):
        _loco(loco_root).setup("fit")
    _loco(loco_root, use_official_validation=False).setup("fit")


def test_loco_missing_or_empty_mask_folder_is_named(loco_root: Path) -> None:
    gt = loco_root / "breakfast_box" / "ground_truth" / "structural_anomalies" / "000"
    for path in gt.iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=r"structural_anomalies/000.png.* no mask folder .*structural_anomalies/000'"):
        _loco(loco_root).setup("test")
    with pytest.raises(DatasetError, match=r"mask folder .*000' of image .* holds no mask image"):
        read_mask(gt, SIZE, loco_root / "breakfast_box" / "test" / "structural_anomalies" / "000.png")
    gt.rmdir()
    with pytest.raises(DatasetError, match=r"no mask folder"):
        _loco(loco_root).setup("test")


def test_loco_unknown_category_lists_what_is_there(loco_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'pushpin' not found.*categories there: breakfast_box"):
        MVTecLOCODataModule(root=str(loco_root), category="pushpin").setup("fit")


@pytest.fixture
def served_loco(tmp_path: Path, loco_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The tiny category as the official LOCO archive on a local HTTP server, set as the module's
    URL and SHA-256; yields the archive's SHA-256."""
    served = tmp_path / "served"
    served.mkdir()
    archive = served / LOCO_ARCHIVE
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(loco_root / "breakfast_box", arcname="breakfast_box")
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(loco_module, "LOCO_URL", f"http://127.0.0.1:{server.server_port}/{LOCO_ARCHIVE}")
    monkeypatch.setattr(loco_module, "LOCO_SHA256", sha256)
    try:
        yield sha256
    finally:
        server.shutdown()


def test_loco_download_verifies_and_extracts(tmp_path: Path, served_loco: str) -> None:
    root = tmp_path / "downloaded"
    data = _loco(root, download=True)
    assert data.category_missing("breakfast_box")
    data.prepare_data()
    assert not data.category_missing("breakfast_box")
    data.setup("test")
    assert len(data.test_set) == 5
    assert (root / LOCO_ARCHIVE).is_file()


def test_loco_download_refuses_a_wrong_checksum(
    tmp_path: Path, served_loco: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loco_module, "LOCO_SHA256", "0" * 64)
    root = tmp_path / "downloaded"
    with pytest.raises(ChecksumError, match="expected 0000"):
        _loco(root, download=True).prepare_data()
    assert not list(root.iterdir()), "a refused archive leaves nothing behind"


# --------------------------------------------------------------------------- folder: tiny layout


@pytest.fixture
def own_root(tmp_path: Path) -> Path:
    """A user's layout: good/*.jpg (4) for training, test/ok/*.jpg (2) normal test images, and
    test/defects/<defect>/*.jpg beside same-stem *.png masks (crack: 2, stain: 1)."""
    root = tmp_path / "own"
    for i in range(4):
        _image(root / "good" / f"{i:03d}.jpg", i)
    for i in range(2):
        _image(root / "test" / "ok" / f"{i:03d}.jpg", 10 + i)
        _image(root / "test" / "defects" / "crack" / f"{i:03d}.jpg", 20 + i)
        _mask(root / "test" / "defects" / "crack" / f"{i:03d}.png", (4 + i, 20, 8, 30))
    _image(root / "test" / "defects" / "stain" / "000.jpg", 30)
    _mask(root / "test" / "defects" / "stain" / "000.png", (30, 40, 40, 60))
    return root


BESIDE = {"normal": "good", "test_normal": "test/ok", "test_abnormal": "test/defects/*/*.jpg",
          "mask": "{parent}/{stem}.png"}  # fmt: skip


def _folder(root: Path, **kwargs: object) -> FolderDataModule:
    return FolderDataModule(root=str(root), image_size=SIZE, **{**BESIDE, **kwargs})


def _key(samples: list) -> list[tuple]:
    return sorted((s.image_path, s.mask_path, s.label, s.defect_type) for s in samples)


def test_folder_loads_a_custom_layout(own_root: Path) -> None:
    assert get_dataset_class("folder") is FolderDataModule
    data = _folder(own_root, val_fraction=0.25)
    assert data.category == "custom" and data.hparams["test_abnormal"] == "test/defects/*/*.jpg"
    data.setup("fit")
    data.setup("test")
    assert len(data.train_set) == 3 and len(data.val_set) == 1
    assert all(s.image_path.parent.name == "good" for s in data.train_set.samples + data.val_set.samples)
    samples = data.test_set.samples
    assert len(samples) == 5
    assert sorted(s.defect_type for s in samples) == ["crack", "crack", "good", "good", "stain"]
    for sample in samples:
        if sample.label:
            assert sample.mask_path == sample.image_path.with_suffix(".png")
        else:
            assert sample.mask_path is None and sample.image_path.parent.name == "ok"
    assert np.array_equal(data.test_set.masks.reshape(5, -1).any(axis=1), data.test_set.labels.astype(bool))
    stain = next(i for i, s in enumerate(samples) if s.defect_type == "stain")
    expected = _resized((np.asarray(Image.open(samples[stain].mask_path)) > 0).astype(np.uint8))
    assert np.array_equal(data.test_set.masks[stain], expected)


def test_folder_placeholders_globs_and_absolute_patterns(own_root: Path) -> None:
    reference = _folder(own_root)
    # Masks elsewhere, relative to root ({defect}) or absolute ({root}): the same samples.
    for defect in ("crack", "stain"):
        for png in (own_root / "test" / "defects" / defect).glob("*.png"):
            target = own_root / "ground_truth" / defect / f"{png.stem}_mask.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(png, target)
    for mask in ("ground_truth/{defect}/{stem}_mask.png", "{root}/ground_truth/{defect}/{stem}_mask.png"):
        moved = _folder(own_root, mask=mask).test_samples("custom")
        assert [(s.image_path, s.label) for s in moved] == [(s.image_path, s.label)
                                                            for s in reference.test_samples("custom")]
        assert all(s.mask_path.name.endswith("_mask.png") for s in moved if s.label)
    # Absolute and recursive patterns.
    _image(own_root / "good" / "more" / "deep" / "100.jpg", 100)
    absolute = _folder(own_root, normal=str(own_root / "good"))
    assert len(absolute.train_samples("custom")) == 4, "a folder lists the images directly in it"
    recursive = _folder(own_root, normal="good/**/*.jpg")
    assert len(recursive.train_samples("custom")) == 5
    # A mask pattern that names a folder is read as the union of its images (LOCO style).
    union = own_root / "unions" / "crack" / "000"
    _mask(union / "a.png", (0, 4, 0, 4))
    _mask(union / "b.png", (40, 48, 56, 64))
    data = _folder(own_root, test_normal=None, test_abnormal="test/defects/crack/000.jpg",
                   mask="unions/{defect}/{stem}")  # fmt: skip
    data.setup("test")
    assert data.test_set.samples[0].mask_path == union
    assert data.test_set.masks[0][0, 0] == 1 and data.test_set.masks[0][-1, -1] == 1


@pytest.mark.filterwarnings("ignore::scipy.stats.DegenerateDataWarning")  # BCa on 5 images
def test_folder_without_masks_gives_undefined_pixel_metrics(own_root: Path) -> None:
    data = _folder(own_root, mask=None)
    data.setup("test")
    assert data.test_set.labels.sum() == 3 and not data.test_set.masks.any()
    rng = np.random.default_rng(0)
    maps = rng.random((5, SIZE, SIZE)).astype(np.float32)
    scores = maps.reshape(5, -1).max(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and quietly: an image-level dataset is not a mistake
        metrics = compute_anomaly_metrics(scores, data.test_set.labels, maps, data.test_set.masks)
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert all(math.isnan(metrics[k]) for k in ("pixel_auroc", "pro", "pixel_f1max"))
    intervals = bootstrap_intervals(scores, data.test_set.labels, maps, data.test_set.masks, n_resamples=20)
    assert all(math.isnan(v) for v in intervals["pixel_auroc"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"normal": "nothing/*.jpg"}, r"normal pattern 'nothing/\*.jpg', resolved against '.*own': it matches nothing"),
        ({"test_abnormal": "test/defects"}, r"test_abnormal pattern 'test/defects'.*matches 1 path\(s\), none an image"),
        ({"test_abnormal": "test/*/*/*.jpg", "mask": "{parent}/{stem}_mask.png"},
         r"defective image '.*crack/000.jpg' has no mask at '.*crack/000_mask.png'"),
        ({"test_abnormal": "test/*/*.jpg", "test_normal": None}, r"image '.*ok/000.jpg' has no mask"),
        ({"test_normal": "test/defects/crack/*.jpg"}, r"crack/000.jpg' is listed by both test_normal .* and test_abnormal"),
        ({"test_normal": "good"}, r"listed by both normal \('good'\) and test_normal \('good'\)"),
        # Masks beside the images caught by a pattern: as defective images or as normal ones.
        ({"test_abnormal": "test/defects/*/*"}, r"000.png' is the mask of .*000.jpg' but is also listed as an image by test_abnormal"),
        ({"test_normal": "test/defects/*/*.png"}, r"000.png' is the mask of .*000.jpg' but is also listed as an image by test_normal"),
    ],
)  # fmt: skip
def test_folder_bad_layouts_are_named(own_root: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        _folder(own_root, **kwargs).setup("test")


def test_folder_files_that_are_not_images_and_good_defects(own_root: Path) -> None:
    (own_root / "notes").mkdir()
    (own_root / "notes" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"normal pattern 'notes/\*'.*matches 1 path\(s\), none an image"):
        _folder(own_root, normal="notes/*").setup("fit")
    _image(own_root / "test" / "good" / "000.jpg", 50)
    _mask(own_root / "test" / "good" / "000.png", (0, 1, 0, 1))
    with pytest.raises(DatasetError, match=r"in a folder named 'good'"):
        _folder(own_root, test_abnormal="test/*/*.jpg", test_normal=None,
                mask="{parent}/{stem}.png").setup("test")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _folder(own_root / "missing").setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"normal": None}, "needs normal"),
        ({"mask": "{parent}/{name}.png"}, r"placeholders are \{stem\}, \{defect\}, \{parent\}, \{root\}"),
        ({"category": "a,b"}, "only the name of the data"),
        ({"category": "all"}, "only the name of the data"),
    ],
)
def test_folder_bad_arguments(own_root: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _folder(own_root, **kwargs)


def test_folder_no_test_pattern(own_root: Path) -> None:
    data = _folder(own_root, test_normal=None, test_abnormal=None)
    data.setup("fit")
    with pytest.raises(DatasetError, match="no test images"):
        data.setup("test")


def test_folder_through_the_cli_with_arguments_only(own_root: Path, tmp_path: Path) -> None:
    cli = AnomalyCLI(args=[
        "--config", str(REPO / "configs" / "stpm" / "quick.yaml"),
        "--data", "folder", "--data.root", str(own_root / "test"), "--data.category", "mine",
        "--data.normal", str(own_root / "good"), "--data.test_normal", "ok",
        "--data.test_abnormal", "defects/*/*.jpg", "--data.mask", "{parent}/{stem}.png",
        "--data.image_size", str(SIZE), "--trainer.default_root_dir", str(tmp_path / "run"),
    ], run=False)  # fmt: skip
    data = cli.datamodule
    assert isinstance(data, FolderDataModule) and data.category == "mine"
    data.setup("test")
    assert _key(data.test_set.samples) == _key(_folder(own_root).test_samples("custom"))
    assert sorted(data.test_set.defect_types) == ["crack", "crack", "good", "good", "stain"]
    assert AnomalyCLI.run_folder(cli.config) == Path("runs") / "stpm" / "folder" / "mine" / "seed0"


# --------------------------------------------------------------------------- folder: real MVTec AD


@requires_mvtec
def test_folder_on_real_mvtec_layout_matches_the_mvtec_datamodule() -> None:
    root = Path(MVTEC_ROOT) / "bottle"
    folder = FolderDataModule(root=str(root), category="bottle", normal="train/good", test_normal="test/good",
                              test_abnormal="test/[!g]*/*.png", mask="{root}/ground_truth/{defect}/{stem}_mask.png")  # fmt: skip
    mvtec = MVTecDataModule(root=MVTEC_ROOT, category="bottle")
    assert _key(folder.train_samples("bottle")) == _key(mvtec.train_samples("bottle"))
    test = folder.test_samples("bottle")
    assert _key(test) == _key(mvtec.test_samples("bottle"))
    assert len(test) == 83 and sum(s.label for s in test) == 63
