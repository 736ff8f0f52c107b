"""EfficientAD's pair, offline and the same on both sides: one teacher and one set of penalty images.

anomalib's ``EfficientAd.prepare_pretrained_model`` downloads a pretrained PDN teacher into
``get_pretrained_weights_dir()`` (``platformdirs.user_cache_path("anomalib") / "pre_trained"``, so
``$XDG_CACHE_HOME/anomalib/pre_trained`` on Linux) unless its ``efficientad_pretrained_weights``
folder exists; its penalty reads ``ImageFolder(imagenet_dir)`` and downloads ImageNette unless the
folder exists. Here our teacher (distilled once, or from our teacher cache) is written, on
anomalib's PDN key names, into a private ``XDG_CACHE_HOME`` for the anomalib worker, and both sides
get the same ImageFolder-compatible penalty folder (DTD, or procedural textures written once).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .pairs import CompareError

#: anomalib's PDN convolutions, in forward order (torch_model.Small/MediumPatchDescriptionNetwork).
ANOMALIB_PDN_CONVS = {"small": ("conv1", "conv2", "conv3", "conv4"),
                      "medium": ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6")}  # fmt: skip
ANOMALIB_PDN_POOLS = ("avgpool1", "avgpool2")
TEACHER_FOLDER = "efficientad_pretrained_weights"


def anomalib_teacher_file(cache_home: str | os.PathLike[str], size: str) -> Path:
    """Where anomalib's ``prepare_pretrained_model`` reads the ``size`` teacher with ``XDG_CACHE_HOME=cache_home``."""
    return Path(cache_home) / "anomalib" / "pre_trained" / TEACHER_FOLDER / f"pretrained_teacher_{size}.pth"


def _our_conv_indices(size: str) -> list[int]:
    """Positions of our PDN's convolutions (``adbench.models.efficientad.PDN``, an ``nn.Sequential``)."""
    import torch
    from torch import nn

    from adbench.models.efficientad import PDN

    with torch.device("meta"):
        pdn = PDN(size)
    return [i for i, layer in enumerate(pdn) if isinstance(layer, nn.Conv2d)]


def _key_pairs(size: str) -> dict[str, str]:
    names = ANOMALIB_PDN_CONVS[size]
    indices = _our_conv_indices(size)
    if len(indices) != len(names):
        raise CompareError(f"our PDN {size} has {len(indices)} convolutions, anomalib's {len(names)}")
    return {f"{i}.{p}": f"{n}.{p}" for i, n in zip(indices, names, strict=True) for p in ("weight", "bias")}


def to_anomalib_pdn(state: dict[str, Any], size: str) -> dict[str, Any]:
    """Our PDN state dict on anomalib's key names (``0.weight`` -> ``conv1.weight``, ...)."""
    pairs = _key_pairs(size)
    if set(state) != set(pairs):
        raise CompareError(f"our PDN {size} state dict has keys {sorted(state)}, expected {sorted(pairs)}")
    return {pairs[key]: value for key, value in state.items()}


def from_anomalib_pdn(state: dict[str, Any], size: str) -> dict[str, Any]:
    """anomalib's PDN state dict on our key names (the inverse of :func:`to_anomalib_pdn`)."""
    back = {theirs: ours for ours, theirs in _key_pairs(size).items()}
    if set(state) != set(back):
        raise CompareError(f"anomalib's PDN {size} state dict has keys {sorted(state)}, expected {sorted(back)}")
    return {back[key]: value for key, value in state.items()}


def check_pdn_architecture(ours: Any, theirs: Any, size: str) -> str:
    """:class:`CompareError` naming the first layer where our PDN (``nn.Sequential``) and anomalib's differ
    in channels, kernel, stride or padding (convolutions and average poolings, in forward order)."""
    from torch import nn

    convs = [layer for layer in ours if isinstance(layer, nn.Conv2d)]
    pools = [layer for layer in ours if isinstance(layer, nn.AvgPool2d)]
    names = ANOMALIB_PDN_CONVS[size]
    if len(convs) != len(names) or len(pools) != len(ANOMALIB_PDN_POOLS):
        raise CompareError(f"PDN {size}: ours has {len(convs)} convolutions and {len(pools)} poolings, anomalib's "
                           f"{len(names)} and {len(ANOMALIB_PDN_POOLS)}")  # fmt: skip
    for position, (mine, name) in enumerate(zip(convs, names, strict=True)):
        other = getattr(theirs, name)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding"):
            if getattr(mine, attr) != getattr(other, attr):
                raise CompareError(
                    f"PDN {size} convolution {position + 1} (ours layer {list(ours).index(mine)}, anomalib {name}): "
                    f"{attr} ours {getattr(mine, attr)}, anomalib {getattr(other, attr)}; the teacher cannot be "
                    "shared (check the pair's width / out_channels)"
                )
    for position, (mine, name) in enumerate(zip(pools, ANOMALIB_PDN_POOLS, strict=True)):
        other = getattr(theirs, name)
        for attr in ("kernel_size", "stride", "padding"):
            if getattr(mine, attr) != getattr(other, attr):
                raise CompareError(f"PDN {size} pooling {position + 1} (anomalib {name}): {attr} ours "
                                   f"{getattr(mine, attr)}, anomalib {getattr(other, attr)}")  # fmt: skip
    return f"{len(convs)} convolutions and {len(pools)} poolings alike (channels, kernel, stride, padding)"


def prepare_teacher(class_path: str, init_args: dict[str, Any], penalty_root: str, out_dir: Path,
                    cache_home: Path) -> tuple[Path, str, Path]:  # fmt: skip
    """Our teacher once (its file if ``teacher_weights`` names one, else distilled or from ``teacher_cache``),
    written as ``out_dir/teacher.pth`` (our bare state dict) and as anomalib's teacher file under
    ``cache_home``; returns (our file, its SHA-256, anomalib's file)."""
    import importlib

    import torch

    from adbench.models.weights import sha256_file

    module_name, class_name = class_path.rsplit(".", 1)
    args = {**init_args, "penalty_source": penalty_root}
    model = getattr(importlib.import_module(module_name), class_name)(**args)
    model.obtain_teacher()  # distils (cached in teacher_cache) unless the file or the cache has it
    state = {key: value.detach().cpu().contiguous() for key, value in model.teacher.state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = out_dir / "teacher.pth"
    torch.save(state, ours)
    theirs = anomalib_teacher_file(cache_home, init_args["model_size"])
    theirs.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_anomalib_pdn(state, init_args["model_size"]), theirs)
    return ours, sha256_file(ours), theirs


def check_teacher_weights(theirs: Any, teacher_file: str, size: str, out_channels: int, width: float) -> str:
    """Every tensor of anomalib's loaded teacher equals ours (key-mapped), and so do the two PDNs' outputs
    on one random image (ours on ImageNet-normalised input: anomalib normalises inside its PDN)."""
    import torch

    from adbench.models.efficientad import PDN, load_teacher
    from adbench.models.weights import IMAGENET_NORMALISATION, sha256_file

    ours_state = load_teacher(teacher_file)
    expected = to_anomalib_pdn(ours_state, size)
    got = theirs.state_dict()
    if set(got) != set(expected):
        raise CompareError(f"anomalib's teacher has tensors {sorted(got)}, ours mapped {sorted(expected)}")
    for key, value in got.items():
        if value.shape != expected[key].shape or not torch.equal(value.detach().cpu(), expected[key]):
            raise CompareError(f"anomalib's teacher {key} differs from ours ({teacher_file}): it did not load our "
                               "file (check XDG_CACHE_HOME)")  # fmt: skip
    ours = PDN(size, out_channels, width).eval()
    ours.load_state_dict(ours_state)
    check_pdn_architecture(ours, theirs, size)
    image = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET_NORMALISATION)
    was = theirs.training
    theirs.eval()
    with torch.no_grad():
        a, b = ours((image - mean) / std), theirs(image.to(next(theirs.parameters()).device)).cpu()
    theirs.train(was)
    diff = float((a - b).abs().max())
    if diff > 1e-4 * max(1.0, float(a.abs().max())):
        raise CompareError(f"same teacher weights, different outputs (max abs diff {diff:g}): the PDNs differ")
    return (f"{len(got)} teacher tensors identical to ours ({Path(teacher_file).name}, sha256 "
            f"{sha256_file(teacher_file)[:12]}); outputs on a random image agree (max abs diff {diff:.1e})")  # fmt: skip


def check_penalty_folder(root: str | os.PathLike[str]) -> str:
    """:class:`CompareError` unless anomalib's ``ImageFolder`` reads the images our penalty draws from."""
    from torchvision.datasets import ImageFolder

    from .textures import check_texture_files

    try:
        theirs = [p for p, _ in ImageFolder(str(root)).samples]
    except (FileNotFoundError, RuntimeError) as error:
        raise CompareError(f"penalty folder {root} is not ImageFolder-compatible (class subfolders of images), "
                           f"which anomalib's EfficientAd needs: {error}") from error  # fmt: skip
    return check_texture_files(root, theirs, role="penalty")
