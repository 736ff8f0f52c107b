"""The same test images side by side across methods: one row per image, one column per method.

Images are chosen by a fixed rule, never by how they look: per category, among the images every
method has a picture of, the first :data:`PER_DEFECT` file names of each defect type and the first
:data:`GOOD` good one. Each method is shown by its lowest finished seed.

The cells are cut from the pictures the visualisation callback already writes per test image
(``jobs/<job>/anomaly_maps/<defect>_<name>.png``: input | ground truth | heat overlay | map at the
validation threshold with the truth outlined in green), so any sweep folder that still has them
gets a gallery without rerunning anything: the first two columns show the input and the ground
truth, each method's cell its thresholded map. Cells are 128-px JPEG thumbnails embedded in the page
(4.7 KB each in base64, measured on bottle and transistor: 7 methods x 15 MVTec categories x ~11
images, with input and truth, come to about 7 MB).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pandas as pd
from PIL import Image

from adbench.benchmark.reports.html import escape
from adbench.callbacks.visualization import BAR_WIDTH, TITLE_HEIGHT

PER_DEFECT, GOOD = 2, 1
THUMBNAIL = 128
PANELS = ("input", "ground truth", "heat overlay", "map at validation threshold")
MAPS_FOLDER = "anomaly_maps"


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


def thumbnail(image: Image.Image, alt: str) -> str:
    image = image.copy()
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return f"<img alt='{escape(alt)}' src='data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def map_folders(runs: pd.DataFrame, results_dir: Path, rows: list[str]) -> dict[str, dict[str, Path]]:
    """category -> row -> the anomaly-map folder of the row's lowest finished seed there (rows in order)."""
    done = runs[runs.status.isin(("ok", "warning"))].sort_values("seed")
    folders: dict[str, dict[str, Path]] = {}
    for category in dict.fromkeys(done.category):
        for row in rows:
            jobs = done[(done.category == category) & (done.row == row)].job_id
            found = [results_dir / "jobs" / str(j) / MAPS_FOLDER for j in jobs]
            found = [f for f in found if f.is_dir() and any(f.glob("*.png"))]
            if found:
                folders.setdefault(str(category), {})[row] = found[0]
    return folders


def gallery(runs: pd.DataFrame, results_dir: Path, rows: list[str]) -> tuple[str, str, pd.DataFrame] | None:
    """(HTML, Markdown, cells) of the gallery, or None when no job has its pictures. ``cells``: one row per
    category, image and method with the picture's path relative to ``results_dir`` (for W&B)."""
    folders = map_folders(runs, results_dir, rows)
    if not folders:
        return None
    parts, markdown, cells_frame = [], [], []
    for category, by_row in folders.items():
        common = set.intersection(*({p.stem for p in f.glob("*.png")} for f in by_row.values()))
        chosen = choose_images(sorted(common))
        methods = list(by_row)
        head = "".join(f"<th>{escape(h)}</th>" for h in ["image", "input", "ground truth", *methods])
        body = []
        for name in chosen:
            first = by_row[methods[0]] / f"{name}.png"
            cells = [f"<td>{escape(name)}</td>",
                     f"<td>{thumbnail(panel(first, 0), f'{category} {name} input')}</td>",
                     f"<td>{thumbnail(panel(first, 1), f'{category} {name} ground truth')}</td>"]
            cells += [f"<td>{thumbnail(panel(by_row[m] / f'{name}.png', 3), f'{category} {name} {m}')}</td>"
                      for m in methods]  # fmt: skip
            body.append("<tr>" + "".join(cells) + "</tr>")
            cells_frame += [{"category": category, "image": name, "method": m,
                             "picture": (by_row[m] / f"{name}.png").relative_to(results_dir).as_posix()}
                            for m in methods]  # fmt: skip
        missing = [r for r in rows if r not in by_row]
        note = f" No pictures for: {', '.join(missing)}." if missing else ""
        parts.append(f"<h3>{escape(category)}</h3><p class='notes'>{len(chosen)} images, {len(methods)} methods."
                     f"{escape(note)}</p><div class='scroll'><table class='gallery' data-category='{escape(category)}'>"
                     f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")
        markdown.append(f"- {category}: {len(chosen)} images x {len(methods)} methods ({', '.join(chosen)})")
    return "".join(parts), "\n".join(markdown), pd.DataFrame(cells_frame)
