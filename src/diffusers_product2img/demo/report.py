"""The demo's report: one list of blocks rendered as ``report.md`` and a self-contained ``report.html``.

Images are referenced by paths relative to the report folder, so the folder can be moved or zipped.
:func:`image_grid` draws the comparison grids (input cutout | name | real image | one column per model).
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Report", "format_table", "mean_std", "fmt_mean_std", "image_grid"]


def format_table(header: Sequence[str], rows: Sequence[Sequence], align_right_from: int = 1) -> str:
    """A GitHub markdown table."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" if i < align_right_from else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) of the non-missing values."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def fmt_mean_std(values: Sequence[float | None], mult: float = 1.0, decimals: int = 1) -> str:
    m, s = mean_std(values)
    if m is None:
        return "-"
    if len([v for v in values if v is not None]) == 1:
        return f"{m * mult:.{decimals}f}"
    return f"{m * mult:.{decimals}f} ± {s * mult:.{decimals}f}"


@dataclass
class _Block:
    kind: str  # heading | text | table | image | pre
    payload: dict = field(default_factory=dict)


_INLINE = [(re.compile(r"`([^`]+)`"), r"<code>\1</code>"), (re.compile(r"\*\*([^*]+)\*\*"), r"<b>\1</b>")]


def _inline_html(text: str) -> str:
    out = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


class Report:
    """Blocks of a report; :meth:`write` renders them as markdown and HTML."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[_Block] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(_Block("heading", {"text": text, "level": level}))

    def text(self, text: str) -> None:
        self.blocks.append(_Block("text", {"text": text}))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(_Block("bullets", {"items": list(items)}))

    def table(self, header: Sequence[str], rows: Sequence[Sequence], caption: str | None = None) -> None:
        self.blocks.append(_Block("table", {"header": list(header), "rows": [list(r) for r in rows],
                                            "caption": caption}))

    def image(self, path: str, caption: str) -> None:
        self.blocks.append(_Block("image", {"path": path, "caption": caption}))

    def pre(self, text: str) -> None:
        self.blocks.append(_Block("pre", {"text": text}))

    # rendering ---------------------------------------------------------------------------
    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            p = b.payload
            if b.kind == "heading":
                out += ["#" * p["level"] + " " + p["text"], ""]
            elif b.kind == "text":
                out += [p["text"], ""]
            elif b.kind == "bullets":
                out += [f"- {item}" for item in p["items"]] + [""]
            elif b.kind == "table":
                if p["caption"]:
                    out += [f"*{p['caption']}*", ""]
                out += [format_table(p["header"], p["rows"]), ""]
            elif b.kind == "image":
                out += [f"![{p['caption']}]({p['path']})", "", f"*{p['caption']}*", ""]
            elif b.kind == "pre":
                out += ["```", p["text"], "```", ""]
        return "\n".join(out)

    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for b in self.blocks:
            p = b.payload
            if b.kind == "heading":
                level = min(6, p["level"])
                body.append(f"<h{level}>{_inline_html(p['text'])}</h{level}>")
            elif b.kind == "text":
                body.append(f"<p>{_inline_html(p['text'])}</p>")
            elif b.kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in p["items"]) + "</ul>")
            elif b.kind == "table":
                rows = "".join("<tr>" + "".join(f"<td>{_inline_html(str(v))}</td>" for v in r) + "</tr>"
                               for r in p["rows"])
                head = "".join(f"<th>{_inline_html(str(h))}</th>" for h in p["header"])
                cap = f"<caption>{_inline_html(p['caption'])}</caption>" if p["caption"] else ""
                body.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b.kind == "image":
                body.append(f'<figure><img src="{html.escape(p["path"])}" alt="{html.escape(p["caption"])}">'
                            f"<figcaption>{_inline_html(p['caption'])}</figcaption></figure>")
            elif b.kind == "pre":
                body.append(f"<pre>{html.escape(p['text'])}</pre>")
        style = (
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "td:first-child,th:first-child{text-align:left}caption{text-align:left;font-style:italic;margin-bottom:4px}"
            "figure{margin:1em 0}img{max-width:100%;image-rendering:pixelated}figcaption{font-style:italic}"
            "pre{background:#f6f6f6;padding:8px;overflow-x:auto}code{background:#f2f2f2;padding:0 3px}"
        )
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")

    def write(self, out_dir: str | os.PathLike) -> dict[str, str]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out / "report.md", "html": out / "report.html"}
        for key, text in (("markdown", self.markdown()), ("html", self.html())):
            tmp = paths[key].with_name(f".{paths[key].name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, paths[key])
        return {k: str(v) for k, v in paths.items()}


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def _checker(size: tuple[int, int], cell: int = 8) -> Image.Image:
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    board = np.where(((x // cell) + (y // cell)) % 2 == 0, 235, 205).astype(np.uint8)
    return Image.fromarray(board).convert("RGB")


def image_grid(rows: Sequence[dict], columns: Sequence[str], cell: int = 128, name_width: int = 190) -> Image.Image:
    """A comparison grid: one row per product, columns ``cutout | name | <columns...>``.

    Each row is ``{"cutout": RGBA image, "name": str, "images": {column: image}}``; a missing
    image leaves its cell blank. Images are scaled to ``cell`` px (nearest: the demo's images are tiny).
    """
    font = ImageFont.load_default()
    header_h = 22
    width = cell + name_width + cell * len(columns)
    grid = Image.new("RGB", (width, header_h + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    labels = ["cutout", "name", *columns]
    xs = [0, cell] + [cell + name_width + i * cell for i in range(len(columns))]
    for x, label in zip(xs, labels):
        draw.text((x + 4, 4), label, fill="black", font=font)
    for r, row in enumerate(rows):
        y = header_h + r * cell
        cutout = row["cutout"].convert("RGBA").resize((cell, cell), Image.Resampling.NEAREST)
        back = _checker((cell, cell))
        back.paste(cutout, (0, 0), cutout)
        grid.paste(back, (0, y))
        for i, line in enumerate(_wrap(row["name"], draw, font, name_width - 10)[:8]):
            draw.text((cell + 5, y + 6 + 13 * i), line, fill="black", font=font)
        for j, column in enumerate(columns):
            image = row["images"].get(column)
            if image is not None:
                grid.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                           (cell + name_width + j * cell, y))
        draw.line([(0, y), (width, y)], fill=(200, 200, 200))
    return grid
