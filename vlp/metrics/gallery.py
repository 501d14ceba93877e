"""A gallery of generated samples: prompts x samples as one PNG grid and an HTML page."""

from __future__ import annotations

import base64
import html
import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from vlp.io import atomic_path, atomic_write_text

_LABEL_WIDTH = 260  # pixels of prompt text left of each row of the PNG
_MIN_CELL = 96  # small samples are enlarged (nearest neighbour) to at least this side


def _grid_png(prompts: Sequence[str], samples: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """One row per prompt: its text, then its samples."""
    cell = max([_MIN_CELL, *(max(img.size) for row in samples for img in row)])
    cols = max((len(row) for row in samples), default=0)
    lines = [textwrap.wrap(p, 40)[:6] or [""] for p in prompts]
    heights = [max(cell, 14 * len(ls) + 8) for ls in lines]
    grid = Image.new("RGB", (_LABEL_WIDTH + cols * (cell + 4) + 4, sum(heights) + 4), (255,) * 3)
    draw = ImageDraw.Draw(grid)
    y = 4
    for text, row, height in zip(lines, samples, heights, strict=True):
        draw.multiline_text((6, y + 2), "\n".join(text), fill=(0, 0, 0), spacing=2)
        for k, img in enumerate(row):
            tile = img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (_LABEL_WIDTH + k * (cell + 4), y))
        y += height
    return grid


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def _base64_png(img: Image.Image) -> str:
    return base64.b64encode(_png_bytes(img.convert("RGB"))).decode("ascii")


def _gallery_html(prompts: Sequence[str], samples: Sequence[Sequence[Image.Image]]) -> str:
    """A page with a table row per prompt and its samples embedded as PNG data URIs."""
    rows = []
    for prompt, row in zip(prompts, samples, strict=True):
        cells = "".join(
            f'<td><img alt="sample {k + 1}" style="width:{max(_MIN_CELL, *img.size)}px;'
            f'image-rendering:pixelated" src="data:image/png;base64,{_base64_png(img)}"></td>'
            for k, img in enumerate(row)
        )
        rows.append(f"<tr><th>{html.escape(prompt)}</th>{cells}</tr>")
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Generated samples</title>'
        "<style>th{text-align:left;font-weight:normal;max-width:20em}td,th{padding:4px}"
        "</style></head><body><h1>Generated samples</h1><table>\n"
        + "\n".join(rows)
        + "\n</table></body></html>\n"
    )


def write_gallery(
    out_dir: Path, prompts: Sequence[str], samples: Sequence[Sequence[Image.Image]]
) -> tuple[Path, Path]:
    """Write `gallery.png` (a row per prompt: its text, then its samples) and `gallery.html`
    (the same as a table, images embedded) into `out_dir`, each atomically; returns both."""
    if len(prompts) != len(samples):
        raise ValueError(f"{len(prompts)} prompts but {len(samples)} rows of samples")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, page = out_dir / "gallery.png", out_dir / "gallery.html"
    with atomic_path(png) as tmp:
        tmp.write_bytes(_png_bytes(_grid_png(prompts, samples)))
    atomic_write_text(page, _gallery_html(prompts, samples))
    return png, page
