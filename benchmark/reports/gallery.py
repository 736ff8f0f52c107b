"""The same test images side by side across methods: one row per image, one column per method.

Images are chosen by a fixed rule, never by how they look: per category, among the images every
method has a picture of, the first :data:`PER_DEFECT` file names of each defect type and the first
:data:`GOOD` good one. Each method is shown by its lowest finished seed.

The cells are cut from the pictures the visualisation callback already writes per test image
(``jobs/<job>/anomaly_maps/<defect>_<name>.png``: input | ground truth | heat overlay | map at the
validation threshold with the truth outlined in green): the first two columns show the input and
the ground truth, each method's cell its thresholded map. Cells are 128-px JPEG thumbnails
(4.7 KB each in base64, measured on bottle and transistor: 7 methods x 15 MVTec categories x ~11
images, with input and truth, come to about 7 MB).

``jobs/`` is never committed, so the thumbnails shown are also kept beside the report
(``gallery/<category>/<image>/<column>.jpg``, listed with their source job and its finish time
in ``leaderboard_gallery.csv``): a report rebuilt from a committed folder shows the same gallery
while the records are the ones the pictures came from, and a method whose jobs still have their
pictures replaces its stored cells.
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from adbench.benchmark.orchestration.records import FINISHED
from adbench.benchmark.reports.html import Report, escape
from adbench.callbacks.visualization import BAR_WIDTH, TITLE_HEIGHT

PER_DEFECT, GOOD = 2, 1
THUMBNAIL = 128
PANELS = ("input", "ground truth", "heat overlay", "map at validation threshold")
MAPS_FOLDER = "anomaly_maps"
STORE = "gallery"
INDEX = "leaderboard_gallery.csv"
INPUT, TRUTH = "input", "ground truth"


def choose_images(names: list[str], per_defect: int = PER_DEFECT, good: int = GOOD) -> list[str]:
    """The first ``per_defect`` names (sorted) of each defect type and the first ``good`` good ones;
    a name is ``<defect>_<image stem>``."""
    chosen: dict[str, list[str]] = {}
    for name in sorted(names):
        defect = name.rsplit("_", 1)[0]
        if len(chosen.setdefault(defect, [])) < (good if defect == "good" else per_defect):
            chosen[defect].append(name)
    return [n for defect in sorted(chosen, key=lambda d: (d == "good", d)) for n in chosen[defect]]


def panel(path: Path, index: int) -> Image.Image:
    """Panel ``index`` (0 input, 1 truth, 2 heat overlay, 3 thresholded map) of a four-panel picture."""
    picture = Image.open(path).convert("RGB")
    width = (picture.width - BAR_WIDTH) // 4
    return picture.crop((index * width, TITLE_HEIGHT, (index + 1) * width, picture.height))


def thumbnail(image: Image.Image) -> bytes:
    """The JPEG bytes of ``image`` shrunk to fit :data:`THUMBNAIL` pixels."""
    image = image.copy()
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def image_cell(jpeg: bytes, alt: str) -> str:
    return f"<td><img alt='{escape(alt)}' src='data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}'></td>"


def file_name(column: str) -> str:
    """A column's thumbnail file name: ``rstpm (quick)`` -> ``rstpm_quick.jpg``."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", column).strip("_") + ".jpg"


@dataclass
class Source:
    """Where one method's pictures of one category come from: a job's four-panel pictures
    (``folder``) or the thumbnails a previous report kept (``stored``: image -> column -> file)."""

    job: str
    finished: str
    names: set[str]
    folder: Path | None = None
    stored: dict[str, dict[str, Path]] | None = None

    def cell(self, name: str, column: str, index: int) -> bytes:
        if self.folder is not None:
            return thumbnail(panel(self.folder / f"{name}.png", index))
        assert self.stored is not None
        return self.stored[name][column].read_bytes()


def _text(value: object) -> str:
    """A record field as the index stores it (a missing one as "")."""
    return "" if pd.isna(value) else str(value)


def job_sources(runs: pd.DataFrame, results_dir: Path, rows: list[str]) -> dict[str, dict[str, Source]]:
    """category -> row -> the pictures of the row's lowest finished seed there that still has them."""
    done = runs[runs.status.isin(FINISHED)].sort_values("seed")
    sources: dict[str, dict[str, Source]] = {}
    for category in dict.fromkeys(done.category):
        for row in rows:
            jobs = done[(done.category == category) & (done.row == row)]
            for job, finished in zip(jobs.job_id, jobs.finished, strict=True):
                folder = results_dir / "jobs" / str(job) / MAPS_FOLDER
                names = {p.stem for p in folder.glob("*.png")} if folder.is_dir() else set()
                if names:
                    sources.setdefault(str(category), {})[row] = Source(str(job), _text(finished), names, folder)
                    break
    return sources


def stored_sources(runs: pd.DataFrame, results_dir: Path, rows: list[str]) -> dict[str, dict[str, Source]]:
    """category -> row -> the thumbnails a previous report kept (its ``leaderboard_gallery.csv``), with
    each image's input and truth. Kept only while their job's record is the one they were cut from
    (same job, same finish time, finished): a rerun job or a deleted record drops them."""
    index = results_dir / INDEX
    if not index.is_file():
        return {}
    cells = pd.read_csv(index, dtype=str, keep_default_na=False)
    if not {"category", "image", "column", "job", "finished", "picture"} <= set(cells.columns):
        return {}  # an index written before the thumbnails were kept
    done = runs[runs.status.isin(FINISHED)]
    current = {(str(r), str(j), _text(f)) for r, j, f in zip(done.row, done.job_id, done.finished, strict=True)}
    cells = cells[[(results_dir / p).is_file() for p in cells.picture]]
    sources: dict[str, dict[str, Source]] = {}
    for category, part in cells.groupby("category", sort=False):
        shared: dict[str, dict[str, Path]] = {}
        for image, column, picture in part[part.column.isin((INPUT, TRUTH))][["image", "column", "picture"]].values:
            shared.setdefault(image, {})[column] = results_dir / picture
        for column, mine in part[part.column.isin(rows)].groupby("column", sort=False):
            job, finished = str(mine.job.iloc[0]), str(mine.finished.iloc[0])
            if (column, job, finished) not in current:
                continue
            stored = {image: {**shared[image], column: results_dir / picture}
                      for image, picture in zip(mine.image, mine.picture, strict=True)
                      if {INPUT, TRUTH} <= set(shared.get(image, {}))}
            if stored:
                sources.setdefault(str(category), {})[str(column)] = Source(job, finished, set(stored), stored=stored)
    return sources


def gallery(runs: pd.DataFrame, results_dir: Path, rows: list[str],
            output_dir: Path | None = None) -> tuple[str, str, pd.DataFrame] | None:
    """(HTML, Markdown, index) of the gallery, or None when no method has pictures. Writes every cell's
    thumbnail under ``output_dir/gallery`` (default ``results_dir``); ``index``: one row per category,
    image and column (input, ground truth, each method) with its source job and thumbnail path
    relative to ``output_dir`` (for W&B and for the next rebuild)."""
    output_dir = results_dir if output_dir is None else output_dir
    fresh, kept = job_sources(runs, results_dir, rows), stored_sources(runs, results_dir, rows)
    categories = list(dict.fromkeys([*fresh, *kept]))
    if not categories:
        return None
    parts, markdown, index = [], [], []
    for category in categories:
        by_row = {**kept.get(category, {}), **fresh.get(category, {})}  # a job's own pictures win
        methods = [r for r in rows if r in by_row]
        chosen = choose_images(sorted(set.intersection(*(by_row[m].names for m in methods))))
        # Input and truth from one method's source, the same for every image of the category.
        first = by_row[next((m for m in methods if by_row[m].folder is not None), methods[0])]
        columns = [(INPUT, first, 0), (TRUTH, first, 1), *((m, by_row[m], 3) for m in methods)]
        body = []
        for name in chosen:
            cells = [f"<td>{escape(name)}</td>"]
            for column, source, panel_index in columns:
                jpeg = source.cell(name, column, panel_index)
                picture = Path(STORE, category, name, file_name(column))
                (output_dir / picture).parent.mkdir(parents=True, exist_ok=True)
                if not (output_dir / picture).is_file() or (output_dir / picture).read_bytes() != jpeg:
                    (output_dir / picture).write_bytes(jpeg)
                cells.append(image_cell(jpeg, f"{category} {name} {column}"))
                index.append({"category": category, "image": name, "column": column, "job": source.job,
                              "finished": source.finished, "picture": picture.as_posix()})
            body.append("<tr>" + "".join(cells) + "</tr>")
        head = "".join(f"<th>{escape(h)}</th>" for h in ["image", INPUT, TRUTH, *methods])
        missing = [r for r in rows if r not in by_row]
        stored = [m for m in methods if by_row[m].folder is None]
        kept_note = ("" if not stored else " Kept from an earlier build (jobs/ folders are not committed): "
                     + ("every method." if stored == methods else f"{', '.join(stored)}."))
        note = (f" No pictures for: {', '.join(missing)}." if missing else "") + kept_note
        parts.append(f"<h3>{escape(category)}</h3><p class='notes'>{len(chosen)} images, {len(methods)} methods."
                     f"{escape(note)}</p><div class='scroll'><table class='gallery' data-category='{escape(category)}'>"
                     f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")
        markdown.append(f"- {category}: {len(chosen)} images x {len(methods)} methods ({', '.join(chosen)})")
    return "".join(parts), "\n".join(markdown), pd.DataFrame(index)


def section(report: Report, runs: pd.DataFrame, results_dir: Path, rows: list[str], output_dir: Path,
            with_gallery: bool = True) -> None:
    """The report's gallery section; its cells are indexed in ``output_dir / INDEX``. ``with_gallery=False``
    leaves the pictures out and says so (they show the dataset's test images)."""
    report.heading("Anomaly maps, the same test images across methods", anchor="gallery")
    if not with_gallery:
        report.text("Left out of this build (--no-gallery): its pictures show the dataset's test images, which "
                    "this folder does not carry. Build the report without the flag, next to the data, to see them.")
        return
    shown = gallery(runs, results_dir, rows, output_dir)
    if shown is None:
        report.text("No anomaly maps here: this results folder keeps neither jobs/<job>/anomaly_maps nor the "
                    f"thumbnails of an earlier build ({STORE}/); build the report from the sweep's local "
                    "folder to see them.")
        return
    page, markdown, cells = shown
    cells.to_csv(output_dir / INDEX, index=False)
    count = len(cells[["category", "image"]].drop_duplicates())
    report.text(f"{count} test images, chosen by a fixed rule (per category, the first {PER_DEFECT} file names of "
                f"each defect type and the first {GOOD} good one), never by how they look; each method's lowest "
                "seed. Cells: the map thresholded at the method's validation threshold (red), the ground truth "
                "outlined in green.")
    report.raw(page, markdown)
