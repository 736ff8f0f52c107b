"""``adbench`` (or ``python -m adbench``): the suite's command line.

This module imports nothing heavy at the top, so ``adbench --help`` answers at once;
each command imports what it needs (torch, Lightning, the methods) when it runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

#: Every command, in the order ``--help`` lists them, with its one-line summary.
COMMANDS: dict[str, str] = {
    "fit": "train a method on a category (checkpoint selected on validation, run folder printed)",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split (metrics, maps, per-image scores)",
    "predict": "score a category's test split, or any folder / image with --data.path",
    "export": "export a checkpoint to ONNX or TorchScript, preprocessing inside",
    "models": "list the registered methods (names for --model)",
}

USAGE = """usage: adbench <command> [options]

Train, test, score and export visual anomaly detectors (one run folder per run).

commands:
{commands}

examples:
  adbench fit     --config configs/stpm/quick.yaml --data.category bottle --data.root MVTEC_ROOT
  adbench test    --config configs/stpm/quick.yaml --data.category bottle --data.root MVTEC_ROOT --ckpt_path best
  adbench predict --ckpt_path runs/stpm/bottle/seed0/checkpoints/best.ckpt --data.path FOLDER_OR_IMAGE
  adbench export  --ckpt_path runs/stpm/bottle/seed0/checkpoints/best.ckpt --format onnx

`adbench <command> --help` lists a command's options."""


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    return USAGE.format(
        commands="\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    )


#: Set to 1 to see the traceback of an input error (a missing folder, a corrupt file, bad weights).
TRACEBACK_VARIABLE = "ADBENCH_TRACEBACK"


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that report bad input, already with the file or value named: one line, no traceback.
    Imported late, so that ``--help`` stays light; anything else is a bug and keeps its traceback."""
    from adbench.checkpoints import LegacyCheckpointError
    from adbench.datamodules.base import DatasetError
    from adbench.datamodules.download import ChecksumError
    from adbench.models.weights import WeightsIntegrityError, WeightsUnavailableError

    return (FileNotFoundError, NotADirectoryError, FileExistsError, IsADirectoryError, PermissionError,
            DatasetError, ChecksumError, LegacyCheckpointError, WeightsIntegrityError, WeightsUnavailableError)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _run(argv)
    except Exception as error:
        if os.environ.get(TRACEBACK_VARIABLE) == "1" or not isinstance(error, _input_errors()):
            raise
        message = str(error)
        if "Original Traceback" in message:  # raised in a DataLoader worker: its message is the last line
            message = message.strip().splitlines()[-1].split(": ", 1)[-1] + " (in a DataLoader worker)"
        raise SystemExit(f"adbench {argv[0]}: error: {type(error).__name__}: {message} "
                         f"({TRACEBACK_VARIABLE}=1 shows the traceback)") from None


def _run(argv: list[str]) -> None:
    command = argv[0] if argv else None
    if command in (None, "-h", "--help"):
        print(usage())
        return
    if command not in COMMANDS and not command.startswith("-"):
        raise SystemExit(f"adbench: unknown command {command!r}; one of: {', '.join(COMMANDS)}")
    if command == "models":
        from adbench import models

        print("\n".join(models.list_models()))
    elif command == "export":
        from adbench.export import main as export_main

        export_main(argv[1:])
    elif command == "predict" and any(
        a == "--data.path" or a.startswith("--data.path=") for a in argv
    ):
        from adbench.api import predict_main

        predict_main(argv[1:])
    else:
        from adbench.cli import run_lightning_cli

        run_lightning_cli(argv, from_command_line=sys.argv[1:] == argv)


if __name__ == "__main__":
    main()
