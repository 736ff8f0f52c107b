"""The report as a page a person scans: Markdown and one self-contained HTML file written side by side.

Metric tables are sorted by their own metric, best value per column in bold, a colour scale per
column, intervals small beside the value, a footnote number per row (stale records, warnings,
other environments) and sortable columns: a few lines of plain JavaScript, no network.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em 2em;color:#222;max-width:1500px}
h1{margin:.2em 0}h2{border-bottom:1px solid #ccc;padding-bottom:2px;margin-top:1.6em}
.meta{color:#555;font-size:.85em;margin:.2em 0}
.answer{background:#f4f8ff;border:1px solid #b8cdf0;border-radius:6px;padding:.6em 1em;margin:.8em 0}
.answer h2{margin-top:.2em}.answer li{margin:.25em 0}.answer b{font-size:1.02em}
.sig{color:#0a6b2d;font-weight:600}.nsig{color:#8a5a00;font-weight:600}.untested{color:#777}
table{border-collapse:collapse;margin:.4em 0 1em 0;font-size:.88em}
td,th{padding:2px 7px;text-align:right;border-bottom:1px solid #eee;white-space:nowrap}
td:first-child,th:first-child{text-align:left}
table.sortable th{cursor:pointer;background:#f2f2f2;user-select:none}
table.sortable th:after{content:' \\2195';color:#aaa;font-size:.8em}
table.sortable th[data-dir=desc]:after{content:' \\25BC';color:#333}
table.sortable th[data-dir=asc]:after{content:' \\25B2';color:#333}
small{color:#555;font-size:.75em}sup{color:#a00}
.notes{font-size:.8em;color:#444}
.scroll{overflow-x:auto}.gallery td{padding:1px;text-align:center;font-size:.75em}.gallery img{width:128px;display:block}
.gallery th{font-size:.75em;max-width:130px;white-space:normal}
img.figure{max-width:100%}
"""

#: Click a header: sort the body rows by that column (numbers by data-v, else text), again to reverse.
SORT_SCRIPT = """<script>
document.querySelectorAll('table.sortable').forEach(table => {
  table.querySelectorAll('thead th').forEach((th, column) => th.addEventListener('click', () => {
    const down = th.dataset.dir !== 'desc';
    table.querySelectorAll('thead th').forEach(h => delete h.dataset.dir);
    th.dataset.dir = down ? 'desc' : 'asc';
    const key = row => {
      const cell = row.cells[column];
      if (cell.dataset.v === undefined) return cell.textContent.trim();
      return cell.dataset.v === '' ? -Infinity : parseFloat(cell.dataset.v);
    };
    const body = table.tBodies[0];
    [...body.rows].sort((x, y) => {
      const a = key(x), b = key(y);
      const order = typeof a === 'number' ? (a === b ? 0 : a - b) : String(a).localeCompare(String(b));
      return down ? -order : order;
    }).forEach(row => body.appendChild(row));
  }));
});
</script>"""


def escape(text: object) -> str:
    return html.escape(str(text))


def percent(value: float) -> str:
    return "-" if pd.isna(value) else f"{100 * value:.1f}"


def colour(fraction: float) -> str:
    """Red (0) through yellow to green (1), light enough to read black text on."""
    if pd.isna(fraction):
        return ""
    return f"background:hsl({int(round(120 * float(np.clip(fraction, 0, 1))))},65%,84%)"


def _scale(values: pd.Series) -> Callable[[float], float]:
    low, high = values.min(), values.max()
    return lambda v: np.nan if pd.isna(v) or pd.isna(low) else (1.0 if high == low else (v - low) / (high - low))


class Cell:
    """One table cell: what it shows, the number it sorts and colours by, small text beside it."""

    def __init__(self, text: str, value: float = np.nan, small: str = "", style: str = "", title: str = "") -> None:
        self.text, self.value, self.small, self.style, self.title = text, value, small, style, title

    def html(self, bold: bool = False, shade: str = "") -> str:
        text = f"<b>{escape(self.text)}</b>" if bold else escape(self.text)
        small = f" <small>{escape(self.small)}</small>" if self.small else ""
        style = ";".join(s for s in (shade, self.style) if s)
        attributes = f" data-v='{'' if pd.isna(self.value) else f'{self.value:.6g}'}'"
        attributes += f" style='{style}'" if style else ""
        attributes += f" title='{escape(self.title)}'" if self.title else ""
        return f"<td{attributes}>{text}{small}</td>"

    def markdown(self) -> str:
        return self.text + (f" {self.small}" if self.small else "")


def scan_table(rows: list[str], columns: dict[str, list[Cell]], labels: dict[str, str], scaled: set[str],
               higher_better: dict[str, bool], css_class: str = "sortable metric") -> tuple[str, str]:
    """HTML and Markdown of a table: ``rows`` (labels with footnote marks in ``labels``), ``columns``
    of cells; columns in ``scaled`` get a colour scale and their best value in bold."""
    head = "".join(f"<th>{escape(c)}</th>" for c in ["method", *columns])
    body = []
    shades = {}
    for name in scaled:
        values = pd.Series([c.value for c in columns[name]], dtype=float)
        scale = _scale(values if higher_better.get(name, True) else -values)
        best = values.max() if higher_better.get(name, True) else values.min()
        sign = 1 if higher_better.get(name, True) else -1
        shades[name] = ([colour(scale(sign * v)) for v in values], [bool(v == best) for v in values])
    for i, row in enumerate(rows):
        cells = [f"<td>{labels.get(row, escape(row))}</td>"]
        for name, column in columns.items():
            shade, bold = (shades[name][0][i], shades[name][1][i]) if name in shades else ("", False)
            cells.append(column[i].html(bold=bold, shade=shade))
        body.append("<tr>" + "".join(cells) + "</tr>")
    page = f"<table class='{css_class}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    markdown = pd.DataFrame({name: [c.markdown() for c in column] for name, column in columns.items()},
                            index=pd.Index(rows, name="method")).to_markdown()
    return page, markdown


def image_tag(path: Path, alt: str, css_class: str = "figure") -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img class='{css_class}' alt='{escape(alt)}' src='data:image/png;base64,{data}'>"


class Report:
    """Markdown and HTML written side by side."""

    def __init__(self, title: str) -> None:
        self.markdown = [f"# {title}", ""]
        self.html = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
                     f"<style>{STYLE}</style></head><body>", f"<h1>{escape(title)}</h1>"]

    def heading(self, text: str, level: int = 2, anchor: str = "") -> None:
        self.markdown += [f"{'#' * level} {text}", ""]
        ident = f" id='{escape(anchor)}'" if anchor else ""
        self.html.append(f"<h{level}{ident}>{escape(text)}</h{level}>")

    def text(self, text: str, css_class: str = "") -> None:
        self.markdown += [text, ""]
        self.html.append(f"<p class='{css_class}'>{escape(text)}</p>" if css_class else f"<p>{escape(text)}</p>")

    def raw(self, page: str, markdown: str) -> None:
        self.html.append(page)
        self.markdown += [markdown, ""]

    def table(self, frame: pd.DataFrame, index: bool = True) -> None:
        self.markdown += [frame.to_markdown(index=index), ""]
        self.html.append(frame.to_html(index=index, border=0, na_rep="-"))

    def links(self, intro: str, links: list[tuple[str, str]]) -> None:
        """A sentence and a list of (text, relative address) links."""
        self.markdown += [intro, "", *(f"- [{text}]({href})" for text, href in links), ""]
        self.html.append(f"<p>{escape(intro)}</p><ul class='notes'>" + "".join(
            f"<li><a href='{escape(href)}'>{escape(text)}</a></li>" for text, href in links) + "</ul>")

    def image(self, path: Path, alt: str) -> None:
        self.markdown += [f"![{alt}]({path.name})", ""]
        self.html.append(image_tag(path, alt))

    def write(self, markdown_path: Path, html_path: Path) -> None:
        markdown_path.write_text("\n".join(self.markdown) + "\n")
        html_path.write_text("\n".join([*self.html, SORT_SCRIPT, "</body></html>"]))
