"""Optional download of the official MVTec AD archive, verified by SHA-256.

Only for users with internet access: nothing in the suite downloads unless asked
(``MVTecDataModule(download=True)`` or ``adbench ... --data.download true``).
The archive is streamed to a ``.part`` file, checked against its published
SHA-256 before anything is extracted, and extracted member by member with
tarfile's ``data`` filter (no absolute paths, no links out of the target).

Extraction never half-fills a category: members go to a temporary folder beside the
target, a completion marker is written into each category folder, and only then is the
folder renamed into place (atomic on one file system). A run killed mid-way leaves only
the temporary folder, which the next run removes; a refused archive leaves nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

MVTEC_URL = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
    "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz"
)
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"

_CHUNK = 1 << 20
#: The archive's file name in the dataset root.
ARCHIVE_NAME = "mvtec_anomaly_detection.tar.xz"
#: Written into a category folder once its extraction is complete (before it is moved into place).
COMPLETE_MARKER = ".adbench-extracted"
_TEMPORARY_PREFIX = ".adbench-extract-"


class ChecksumError(RuntimeError):
    """The downloaded file is not the one that was published."""


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, destination: str | Path, sha256: str) -> Path:
    """Download ``url`` to ``destination`` unless a file with the right checksum is there.

    A mismatching download is deleted and reported; a finished good file is
    never downloaded twice.
    """
    destination = Path(destination)
    if destination.is_file() and sha256_of(destination) == sha256:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name) as bar:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise ConnectionError(f"could not download {url}: {error}") from error
    actual = sha256_of(partial)
    if actual != sha256:
        partial.unlink(missing_ok=True)
        raise ChecksumError(
            f"SHA-256 of the file downloaded from {url} is {actual}, expected {sha256}; "
            "the file was deleted"
        )
    os.replace(partial, destination)
    return destination


def _top_folder(member_name: str) -> str:
    parts = [p for p in Path(member_name).parts if p not in (".", "/")]
    return parts[0] if parts else ""


def is_extracted(folder: str | Path) -> bool:
    """Whether ``folder`` is a category this module extracted completely."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def needs_extraction(folder: str | Path, archive_name: str = ARCHIVE_NAME) -> bool:
    """Whether the category ``folder`` must be (re-)extracted: it is absent, or it has no completion
    marker while its root holds the archive ``archive_name`` (extracted in place by an older,
    killed run: maybe half). A folder of the user's own, without the archive beside it, never needs it."""
    folder = Path(folder)
    return not folder.is_dir() or (not is_extracted(folder) and (folder.parent / archive_name).is_file())


@contextlib.contextmanager
def _staged_extraction(root: Path, archive_name: str) -> Iterator[Path]:
    """A fresh staging folder inside ``root`` to extract into. When the block ends without error,
    each category folder in it gets :data:`COMPLETE_MARKER` and moves atomically into ``root``;
    a folder already there is kept unless :func:`needs_extraction` says it is a half extraction
    of this archive. The staging folder is removed either way."""
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(_TEMPORARY_PREFIX + "*"):  # a killed extraction's
        shutil.rmtree(leftover, ignore_errors=True)
    temporary = root / f"{_TEMPORARY_PREFIX}{uuid.uuid4().hex}"
    try:
        yield temporary
        for extracted in sorted(p for p in temporary.iterdir() if p.is_dir()):
            (extracted / COMPLETE_MARKER).write_text(f"extracted from {archive_name}\n")
            target = root / extracted.name
            if target.exists() and needs_extraction(target, archive_name):
                shutil.rmtree(target)  # an older, possibly half, extraction of this root's archive
            if not target.exists():
                os.replace(extracted, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def extract_category(archive: str | Path, root: str | Path, category: str | None = None) -> Path:
    """Extract one category (or all, when ``category`` is None) of an MVTec archive into ``root``.

    Each category lands in ``root`` complete (with :data:`COMPLETE_MARKER`) or not at all. A
    folder already there is kept, unless it has no marker and ``root`` holds the archive
    (an older, possibly half, extraction of it): then it is replaced.
    """
    root = Path(root)
    with _staged_extraction(root, Path(archive).name) as temporary, tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if category is None or _top_folder(m.name) == category]
        if not members:
            raise FileNotFoundError(f"category {category!r} is not in archive {archive}")
        tar.extractall(temporary, members=members, filter="data")
    return root / category if category else root


def download_category(root: str | Path, category: str | None, url: str, sha256: str, archive_name: str) -> Path:
    """Fetch a tar archive whose top-level folders are categories into ``root`` (verified, as
    ``archive_name``), then extract ``category`` (all when ``None``) atomically."""
    archive = download_file(url, Path(root) / archive_name, sha256)
    return extract_category(archive, root, category)


#: Folders of a ZIP archive that hold no data: macOS resource forks.
_ZIP_IGNORED = ("__MACOSX",)


def _zip_member_parts(archive: Path, name: str) -> tuple[str, ...]:
    """A ZIP member's path parts, refused when it could land outside the target (zip slip)."""
    posix = name.replace("\\", "/")  # ZIPs written on Windows may use backslashes
    parts = PurePosixPath(posix).parts
    if posix.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
        raise ValueError(f"refusing archive {str(archive)!r}: member {name!r} has an absolute path or '..'")
    return tuple(p for p in parts if p != ".")


def extract_zip_category(archive: str | Path, root: str | Path, category: str | None = None) -> Path:
    """Extract one category (or all, when ``category`` is None) of a ZIP archive into ``root``.

    The rules of :func:`extract_category`: each category lands complete (with
    :data:`COMPLETE_MARKER`) or not at all, by way of a temporary folder and an atomic move;
    an unsafe member (absolute path, ``..``) refuses the whole archive before anything is
    written. Many ZIPs wrap their content in one folder (BTAD's ``BTech_Dataset_transformed/``):
    a single top folder that is not ``category`` itself is stripped.
    """
    archive, root = Path(archive), Path(root)
    with zipfile.ZipFile(archive) as zf:
        members = [(info, _zip_member_parts(archive, info.filename)) for info in zf.infolist()]
        members = [(info, parts) for info, parts in members if parts and parts[0] not in _ZIP_IGNORED]
        tops = {parts[0] for _, parts in members}
        if len(tops) == 1 and category not in tops:
            members = [(info, parts[1:]) for info, parts in members if len(parts) > 1]
        members = [(info, parts) for info, parts in members if category is None or parts[0] == category]
        if not any(not info.is_dir() for info, _ in members):
            raise FileNotFoundError(f"category {category!r} is not in archive {archive}")
        with _staged_extraction(root, archive.name) as temporary:
            for info, parts in members:
                target = temporary.joinpath(*parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
    return root / category if category else root


def download_mvtec(
    root: str | Path,
    category: str | None = None,
    url: str | None = None,
    sha256: str | None = None,
) -> Path:
    """Fetch the official archive into ``root`` (verified), then extract ``category``.

    ``url``/``sha256`` default to the module's :data:`MVTEC_URL`/:data:`MVTEC_SHA256`,
    read at call time so a mirror can be configured by setting them.
    """
    return download_category(root, category, url or MVTEC_URL, sha256 or MVTEC_SHA256, ARCHIVE_NAME)
