"""What adbench keeps in a Lightning checkpoint besides the weights, in one place.

``checkpoint["adbench"]`` holds the registered method's name (written by AnomalyModule), the
validation thresholds and the input size (written by AnomalyEvaluator): what
``adbench.load`` needs to score new images. Checkpoints written before the suite's modules
moved under ``adbench.`` name their class as ``models.stpm.STPM``; they are refused with the
command that upgrades them:

    python -m adbench.checkpoints upgrade OLD.ckpt [NEW.ckpt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

CHECKPOINT_KEY = "adbench"
#: Module prefixes of the suite before the ``adbench.`` namespace.
LEGACY_PREFIXES = ("models.", "datamodules.", "callbacks.", "benchmark.")
_CLASS_PATH = "_class_path"  # LightningCLI's key in ``hyper_parameters``


class LegacyCheckpointError(ValueError):
    """A checkpoint naming its class by a module path from before the ``adbench.`` namespace."""


def metadata(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The adbench entry of a loaded checkpoint (empty when there is none)."""
    return checkpoint.get(CHECKPOINT_KEY) or {}


def update_metadata(checkpoint: dict[str, Any], **values: Any) -> None:
    checkpoint.setdefault(CHECKPOINT_KEY, {}).update(values)


def legacy_class_path(checkpoint: dict[str, Any]) -> str | None:
    """The pre-namespace class path a checkpoint's hyperparameters name, if any."""
    class_path = (checkpoint.get("hyper_parameters") or {}).get(_CLASS_PATH)
    return class_path if isinstance(class_path, str) and class_path.startswith(LEGACY_PREFIXES) else None


def check_not_legacy(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Raise :class:`LegacyCheckpointError`, saying how to upgrade, for a pre-namespace checkpoint
    (``checkpoint``: loaded from ``path``)."""
    class_path = legacy_class_path(checkpoint)
    if class_path:
        raise LegacyCheckpointError(
            f"checkpoint {str(path)!r} names its class {class_path!r}, a module path from before adbench's "
            f"modules moved under 'adbench.'; upgrade it with: python -m adbench.checkpoints upgrade {path}")


def upgrade(source: str | Path, target: str | Path | None = None) -> Path:
    """Write ``source`` with its class path under ``adbench.`` (to ``target``, default
    ``<name>-upgraded.ckpt``); the weights and everything else are kept as they are."""
    import torch

    source = Path(source)
    target = Path(target) if target else source.with_name(f"{source.stem}-upgraded{source.suffix}")
    state = torch.load(source, map_location="cpu", weights_only=False)
    class_path = legacy_class_path(state)
    if class_path:
        state["hyper_parameters"][_CLASS_PATH] = f"adbench.{class_path}"
    torch.save(state, target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m adbench.checkpoints", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("upgrade", help="rewrite a pre-namespace checkpoint's class path")
    command.add_argument("source")
    command.add_argument("target", nargs="?")
    args = parser.parse_args(argv)
    print(upgrade(args.source, args.target))


if __name__ == "__main__":
    main(sys.argv[1:])
