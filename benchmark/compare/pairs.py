"""What is compared: the method pairs, our side's settings for each, and the anomalib check."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass
from typing import Any

from adbench.project import project_root

REPO = project_root()
ANOMALIB_VERSION = "2.7.0"


class CompareError(RuntimeError):
    """A comparison that cannot run as asked; the message says why and what to do."""


class AnomalibMissingError(CompareError):
    """anomalib is not importable from this interpreter."""


@dataclass(frozen=True)
class MethodPair:
    """One row group of the table: our config and anomalib's model of the same method."""

    name: str
    kind: str  # patchcore | stpm | draem | padim | fastflow | efficientad | glass
    our_config: str  # YAML under configs/ whose model.init_args define our side
    our_overrides: tuple[tuple[str, Any], ...] = ()
    coreset_ratio: float | None = None
    #: Our init args that take the comparison's image size (modules built for one input size).
    image_size_args: tuple[str, ...] = ()


METHODS: dict[str, MethodPair] = {
    "patchcore_1pct": MethodPair("patchcore_1pct", "patchcore", "configs/patchcore/quick.yaml",
                                 (("coreset_ratio", 0.01),), 0.01),
    "patchcore_10pct": MethodPair("patchcore_10pct", "patchcore", "configs/patchcore/quick.yaml",
                                  (("coreset_ratio", 0.10),), 0.10),
    "stpm": MethodPair("stpm", "stpm", "configs/stpm/quick.yaml"),
    # anomalib's Draem widths are fixed (128 / 64): the paper profile has exactly those.
    "draem": MethodPair("draem", "draem", "configs/draem/paper.yaml", (("lr_gamma", 1.0),)),
    "padim": MethodPair("padim", "padim", "configs/padim/quick.yaml"),
    # FastFlow's per-position LayerNorm is built on the feature grids of one image size, as anomalib's.
    "fastflow": MethodPair("fastflow", "fastflow", "configs/fastflow/quick.yaml", image_size_args=("norm_image_size",)),
    # anomalib's PDN hidden widths are fixed (128 / 256 / 256), its hard loss keeps the 0.999 quantile and it
    # pads the raw maps before normalising: the quick profile's x0.25 widths, 0.9 quantile and the paper's
    # order are set to those (see ANOMALIB_FIXED).
    "efficientad": MethodPair("efficientad", "efficientad", "configs/efficientad/quick.yaml",
                              (("width", 1.0), ("hard_quantile", 0.999), ("pad_raw_maps", True))),
    # anomalib's Glass fixes the ascent step (0.001), the shell radius (0.5) and labels a patch anomalous when any
    # of its pixels is: the quick profile's lite0-scaled step 0.0136, radius 6.8 and half-covered rule are set to
    # those (see ANOMALIB_FIXED); the noise std (0.5) is an argument of anomalib's Glass, so both keep ours.
    "glass": MethodPair("glass", "glass", "configs/glass/quick.yaml",
                        (("ascent_step_size", 0.001), ("projection_radius", 0.5), ("mask_threshold", 1e-6))),
}  # fmt: skip
SIDES = ("ours", "anomalib")

#: What anomalib 2.7.0 fixes (no argument of its model changes it), so our side's config must say
#: the same: Padim always keeps a random channel subset, regularises each covariance with 0.01 I
#: (MultiVariateGaussian) and blurs with sigma 4 (its AnomalyMapGenerator's default); Fastflow's CNN
#: branch takes timm out_indices [1, 2, 3], layer-normalises them with a scale and shift per position,
#: clamps its couplings at 2, maps -exp(-0.5 mean z^2) and trains with Adam lr 1e-3, weight decay 1e-5;
#: EfficientAd's PDN hidden widths are 128/256/256 (S; 256/512/512 M), its hard loss keeps distances
#: above their 0.999 quantile, it always has the autoencoder and the penalty, normalises maps by their
#: 0.9 / 0.995 quantiles measured on and applied to its raw maps after padding and resizing them, and
#: declares an lr drop x 0.1 at 95 % of the steps (a StepLR that Lightning steps once per epoch: see
#: the package docs).
#: Glass always synthesises both ways, moves its Gaussian anomalies by steps of 0.001 with a truncated projection
#: onto the shell [0.5, 1] around each normal feature every 5 steps (svd=0, the "manifold" projection), labels a
#: patch anomalous when any pixel of its cell is masked (a max-pool of the mask; on our binary masks, a cell mean
#: >= 1e-6 is the same rule), uses a focal loss with gamma 2, adaptor weight decay 1e-5 and a map blurred with
#: sigma 4, and trains its discriminator at twice the adaptor's lr (checked apart: it is a ratio).
ANOMALIB_FIXED: dict[str, dict[str, Any]] = {
    "padim": {"random_channels": True, "epsilon": 0.01, "sigma": 4.0},
    "fastflow": {"layers": [1, 2, 3], "layer_norm": "position", "clamp": 2.0, "map_kind": "probability",
                 "lr": 1e-3, "weight_decay": 1e-5},
    "efficientad": {"width": 1.0, "hard_quantile": 0.999, "autoencoder": True, "penalty": True,
                    "map_quantiles": [0.9, 0.995], "pad_raw_maps": True, "lr_drop_at": 0.95, "lr_drop_factor": 0.1},
    "glass": {"global_synthesis": True, "local_synthesis": True, "ascent_step_size": 0.001, "projection_every": 5,
              "projection_radius": 0.5, "mask_threshold": 1e-6, "focal_gamma": 2.0, "adaptor_weight_decay": 1e-5,
              "sigma": 4.0},
}  # fmt: skip


def _find_spec(name: str) -> Any:
    # A seam of its own so that the tests can pretend anomalib is missing.
    return importlib.util.find_spec(name)


def require_anomalib() -> str:
    """anomalib's installed version; :class:`AnomalibMissingError` with the fix when absent."""
    if _find_spec("anomalib") is None:
        raise AnomalibMissingError(
            f"anomalib is not installed in this Python ({sys.executable}). The comparison runs in its "
            f"own virtualenv because anomalib pins jsonargparse<4.47: run `make compare` (it creates "
            f".venv-compare with anomalib=={ANOMALIB_VERSION} and runs this script), or, once it "
            f"exists, `.venv-compare/bin/python -m adbench.benchmark.compare ...`. To run only our side, "
            f"pass --sides ours."
        )
    try:
        version = importlib.metadata.version("anomalib")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != ANOMALIB_VERSION:
        print(
            f"warning: anomalib {version} is installed; this comparison was written against "
            f"{ANOMALIB_VERSION} (`make compare` installs it)",
            file=sys.stderr,
        )
    return version


def our_init_args(pair: MethodPair, draem_width: tuple[int, int]) -> tuple[str, dict[str, Any]]:
    """Our model's class path and init args: the pair's config with its overrides applied."""
    import yaml

    config = yaml.safe_load((REPO / pair.our_config).read_text())
    model = config["model"]
    init_args = dict(model.get("init_args") or {})
    init_args.update(dict(pair.our_overrides))
    if pair.kind == "draem":
        init_args["recon_base_width"], init_args["disc_base_width"] = draem_width
    return model["class_path"], init_args


def check_anomalib_fixed(kind: str, init_args: dict[str, Any]) -> None:
    """:class:`CompareError` where our init args differ from a setting anomalib fixes (:data:`ANOMALIB_FIXED`)."""

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    differ = [f"{key}: ours {plain(init_args.get(key))!r}, anomalib {value!r}"
              for key, value in ANOMALIB_FIXED.get(kind, {}).items()
              if plain(init_args.get(key)) != value]  # fmt: skip
    if kind == "glass":  # one learning_rate argument: the adaptor's, and twice it for the discriminator
        adaptor, discriminator = init_args.get("adaptor_lr"), init_args.get("discriminator_lr")
        if adaptor is None or discriminator is None or discriminator != 2 * adaptor:
            differ.append(f"discriminator_lr: ours {discriminator!r}, anomalib 2 x adaptor_lr ({adaptor!r})")
    if differ:
        raise CompareError(
            f"anomalib's {kind} fixes settings our config changes: {'; '.join(differ)}"
        )


def layer_names(backbone: str, layers: list[int]) -> list[str]:
    """timm module names of ``features_only`` out_indices (what anomalib's layer names mean)."""
    import timm
    import torch

    with torch.device("meta"):
        body = timm.create_model(
            backbone, features_only=True, out_indices=tuple(layers), pretrained=False
        )
    return list(body.feature_info.module_name())
