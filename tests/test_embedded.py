"""The embedded dataset: MVTec layout, exact masks, determinism and safe generation."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adbench.datamodules import embedded
from adbench.datamodules.embedded import (
    ENV_VAR,
    NUM_PER_DEFECT,
    NUM_TEST_GOOD,
    NUM_TRAIN_GOOD,
    default_root,
    ensure_embedded_dataset,
)
from adbench.datamodules.embedded_render import (
    EMBEDDED_CATEGORIES,
    EMBEDDED_DEFECTS,
    MAX_DEFECT_FRACTION,
    MIN_DEFECT_FRACTION,
    render_sample,
)

#: Small image size for tests that only exercise the generation machinery.
SMALL = 32
REPO_ROOT = Path(__file__).resolve().parents[1]

ALL_DEFECTS = [
    (category, defect) for category in EMBEDDED_CATEGORIES for defect in EMBEDDED_DEFECTS[category]
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full-size dataset, generated once for the module."""
    return ensure_embedded_dataset(tmp_path_factory.mktemp("embedded") / "data")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_three_categories_with_two_or_three_defects_each() -> None:
    assert len(EMBEDDED_CATEGORIES) == 3
    assert set(EMBEDDED_DEFECTS) == set(EMBEDDED_CATEGORIES)
    for defects in EMBEDDED_DEFECTS.values():
        assert 2 <= len(defects) <= 3
        assert "good" not in defects


def test_layout_and_counts(dataset: Path) -> None:
    assert (dataset / embedded.MARKER_NAME).is_file()
    assert _names(dataset) == sorted([embedded.MARKER_NAME, *EMBEDDED_CATEGORIES])
    for category in EMBEDDED_CATEGORIES:
        folder = dataset / category
        defects = EMBEDDED_DEFECTS[category]
        assert _names(folder) == ["ground_truth", "test", "train"]
        assert _names(folder / "train") == ["good"]
        assert _names(folder / "test") == sorted(["good", *defects])
        assert _names(folder / "ground_truth") == sorted(defects)
        assert _names(folder / "train" / "good") == [f"{i:03d}.png" for i in range(NUM_TRAIN_GOOD)]
        assert _names(folder / "test" / "good") == [f"{i:03d}.png" for i in range(NUM_TEST_GOOD)]
        for defect in defects:
            assert _names(folder / "test" / defect) == [
                f"{i:03d}.png" for i in range(NUM_PER_DEFECT)
            ]
            assert _names(folder / "ground_truth" / defect) == [
                f"{i:03d}_mask.png" for i in range(NUM_PER_DEFECT)
            ]


def test_images_are_rgb_256(dataset: Path) -> None:
    images = [p for p in sorted(dataset.glob("*/*/*/*.png")) if p.parts[-3] != "ground_truth"]
    defects = sum(len(d) for d in EMBEDDED_DEFECTS.values())
    assert len(images) == 3 * (NUM_TRAIN_GOOD + NUM_TEST_GOOD) + defects * NUM_PER_DEFECT
    for path in images:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.mode == "RGB"
            assert image.size == (256, 256)


def test_masks_match_images_and_are_small(dataset: Path) -> None:
    for category, defect in ALL_DEFECTS:
        for i in range(NUM_PER_DEFECT):
            image_path = dataset / category / "test" / defect / f"{i:03d}.png"
            mask_path = dataset / category / "ground_truth" / defect / f"{i:03d}_mask.png"
            with Image.open(image_path) as image, Image.open(mask_path) as mask_image:
                assert mask_image.mode == "L"
                assert mask_image.size == image.size
                mask = np.asarray(mask_image)
            assert set(np.unique(mask)) <= {0, 255}
            area = (mask > 0).mean()
            assert MIN_DEFECT_FRACTION <= area <= MAX_DEFECT_FRACTION, (category, defect, i, area)


def test_good_images_have_no_masks(dataset: Path) -> None:
    for category in EMBEDDED_CATEGORIES:
        assert not (dataset / category / "ground_truth" / "good").exists()
    assert not list(dataset.glob("*/train/**/*_mask.png"))
    assert not list(dataset.glob("*/test/**/*_mask.png"))


def test_files_are_what_render_sample_draws(dataset: Path) -> None:
    # The seed of image i of split s in category c is [c, s, i]: 0 train, 1 test good,
    # 2 + k the k-th defect type.
    for c, category in enumerate(EMBEDDED_CATEGORIES):
        _, good, _ = render_sample(category, None, [c, 0, 7])
        assert np.array_equal(_read(dataset / category / "train" / "good" / "007.png"), good)
        k = len(EMBEDDED_DEFECTS[category]) - 1
        defect = EMBEDDED_DEFECTS[category][k]
        _, image, mask = render_sample(category, defect, [c, 2 + k, 3])
        assert np.array_equal(_read(dataset / category / "test" / defect / "003.png"), image)
        saved_mask = _read(dataset / category / "ground_truth" / defect / "003_mask.png")
        assert np.array_equal(saved_mask > 0, mask)


def test_good_images_vary(dataset: Path) -> None:
    # Normal variation is part of the task: no two training images may be identical.
    for category in EMBEDDED_CATEGORIES:
        first, second = (
            _read(dataset / category / "train" / "good" / name).astype(np.int16)
            for name in ("000.png", "001.png")
        )
        assert np.abs(first - second).mean() > 2.0


@pytest.mark.parametrize(("category", "defect"), ALL_DEFECTS)
def test_defect_changes_pixels_only_inside_mask(category: str, defect: str) -> None:
    c = EMBEDDED_CATEGORIES.index(category)
    for i in range(3):
        clean, defective, mask = render_sample(category, defect, [c, 9, i])
        assert clean.shape == defective.shape == (256, 256, 3)
        assert mask.shape == (256, 256) and mask.dtype == bool
        assert MIN_DEFECT_FRACTION <= mask.mean() <= MAX_DEFECT_FRACTION
        diff = np.abs(clean.astype(np.int16) - defective.astype(np.int16)).max(axis=-1)
        assert diff[~mask].max() == 0, "defect leaked outside its mask"
        # The mask is tight: nearly every masked pixel really changed, and visibly so.
        assert (diff[mask] > 0).mean() > 0.9
        assert diff[mask].mean() > 15


@pytest.mark.parametrize("category", EMBEDDED_CATEGORIES)
def test_good_sample_has_empty_mask(category: str) -> None:
    clean, defective, mask = render_sample(category, None, [0, 0, 0])
    assert np.array_equal(clean, defective)
    assert not mask.any()


def test_render_sample_is_deterministic_and_seed_dependent() -> None:
    first = render_sample("disc", "chip", [2, 3, 5], image_size=64)
    again = render_sample("disc", "chip", [2, 3, 5], image_size=64)
    other = render_sample("disc", "chip", [2, 3, 6], image_size=64)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[1], other[1])


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="category"):
        render_sample("bottle", None, 0)
    with pytest.raises(ValueError, match="defect"):
        render_sample("weave", "crack", 0)
    with pytest.raises(ValueError, match="image_size"):
        ensure_embedded_dataset(Path("unused"), image_size=8)


def test_generation_is_byte_identical(tmp_path: Path) -> None:
    first = ensure_embedded_dataset(tmp_path / "a", image_size=SMALL)
    second = ensure_embedded_dataset(tmp_path / "b", image_size=SMALL)
    files_a, files_b = _files(first), _files(second)
    assert (
        len(files_a)
        == 3 * (NUM_TRAIN_GOOD + NUM_TEST_GOOD)
        + 2 * NUM_PER_DEFECT * sum(len(d) for d in EMBEDDED_DEFECTS.values())
        + 1
    )
    assert files_a == files_b


def test_second_call_does_not_regenerate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = ensure_embedded_dataset(tmp_path / "data", image_size=SMALL)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def fail(*args: object) -> None:
        raise AssertionError("dataset was regenerated")

    monkeypatch.setattr(embedded, "_write_dataset", fail)
    assert ensure_embedded_dataset(tmp_path / "data", image_size=SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_env_var_sets_default_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "from-env"))
    assert default_root() == tmp_path / "from-env"
    root = ensure_embedded_dataset(image_size=SMALL)
    assert root == tmp_path / "from-env"
    assert (root / embedded.MARKER_NAME).is_file()
    assert (root / EMBEDDED_CATEGORIES[0] / "train" / "good" / "000.png").is_file()


def test_default_root_is_versioned_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = tmp_path / ".cache" / "adbench" / f"embedded-v{embedded.DATASET_VERSION}-128"
    assert default_root(128) == expected


def test_empty_existing_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    root = ensure_embedded_dataset(tmp_path / "data", image_size=SMALL)
    assert (root / embedded.MARKER_NAME).is_file()


def test_half_written_or_foreign_folder_is_never_used(tmp_path: Path) -> None:
    half = tmp_path / "half"
    (half / EMBEDDED_CATEGORIES[0] / "train" / "good").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        ensure_embedded_dataset(half, image_size=SMALL)
    # A complete dataset of another image size does not count either.
    other = ensure_embedded_dataset(tmp_path / "other", image_size=SMALL)
    with pytest.raises(FileExistsError):
        ensure_embedded_dataset(other, image_size=SMALL + 8)


def test_losing_the_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data"
    write = embedded._write_dataset

    def write_while_another_process_finishes(root: Path, image_size: int) -> None:
        write(root, image_size)
        # Another process completes and renames its copy into place first.
        winner = tmp_path / "winner"
        winner.mkdir()
        write(winner, image_size)
        (winner / embedded.MARKER_NAME).write_text(embedded._marker_text(image_size))
        (winner / "winner.txt").write_text("first")
        winner.rename(target)

    monkeypatch.setattr(embedded, "_write_dataset", write_while_another_process_finishes)
    assert ensure_embedded_dataset(target, image_size=SMALL) == target
    assert (target / "winner.txt").read_text() == "first"
    assert _names(tmp_path) == ["data"], "the loser's temporary copy was not removed"


@pytest.mark.slow
def test_concurrent_processes_agree(tmp_path: Path) -> None:
    # Load the module file directly: the package __init__ pulls in torch and Lightning,
    # which would make three cold interpreters slow without testing anything more.
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('embedded', sys.argv[2])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"print(module.ensure_embedded_dataset(sys.argv[1], image_size={SMALL}))\n"
    )
    target = tmp_path / "shared"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(target), embedded.__file__],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == str(target)
    assert _names(tmp_path) == ["shared"]
    reference = ensure_embedded_dataset(tmp_path / "reference", image_size=SMALL)
    assert _files(target) == _files(reference)
