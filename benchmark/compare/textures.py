"""Texture folders both sides read: procedural textures written once when no ``--texture-root`` is given,
and the check that both sides draw from the same files."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .pairs import CompareError


def write_procedural_textures(folder: Path, count: int = 32, size: int = 256, seed: int = 0) -> Path:
    """``count`` procedural textures as an ImageFolder (``folder/procedural/NNN.png``): EfficientAD's penalty
    images and GLASS's local-synthesis textures when no ``--texture-root`` is given (anomalib would otherwise
    download ImageNette, or use its own Perlin-noise sources)."""
    import numpy as np
    from PIL import Image

    from adbench.datamodules.synthesis import make_texture_source

    target = folder / "procedural"
    if len(list(target.glob("*.png"))) == count:
        return folder
    target.mkdir(parents=True, exist_ok=True)
    source, rng = make_texture_source("procedural"), np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(source.sample(rng, (size, size))).save(target / f"{i:03d}.png")
    return folder


def check_texture_files(root: str | os.PathLike[str], theirs: Iterable[str | os.PathLike[str]],
                        role: str = "texture") -> str:
    """:class:`CompareError` unless anomalib's files (``theirs``) are those our synthesis draws from under
    ``root`` (``FolderTextures``: every .jpg/.jpeg/.png, any case); ``role`` names the folder's use."""
    from adbench.datamodules.synthesis import FolderTextures

    ours = sorted(os.path.realpath(p) for p in FolderTextures(root).paths)
    other = sorted(os.path.realpath(p) for p in theirs)
    if ours != other:
        only = sorted(set(ours) ^ set(other))
        raise CompareError(f"{role} folder {root}: ours draws from {len(ours)} images, anomalib's from {len(other)}; "
                           f"they differ in {len(only)} (e.g. {only[:3]})")  # fmt: skip
    return f"{len(ours)} images of {root}, the same files for both sides ({role})"
