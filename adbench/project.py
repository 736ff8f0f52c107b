"""Where the project's files are: the checkout that holds ``configs/`` and the lock.

In a clone (editable install) that is the folder above this package; after ``pip install .``
it is the working directory, from which the commands are run (``configs/...`` paths are relative).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    """The checkout holding ``configs/`` and ``requirements.lock``."""
    checkout = PACKAGE_DIR.parent
    return checkout if (checkout / "configs").is_dir() else Path.cwd()


def config_dir() -> Path:
    return project_root() / "configs"
