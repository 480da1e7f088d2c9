"""A picture of what training sees: per record, the original image, the corrupted image and the
question with its chosen and rejected answers (`mdpo-data preview`)."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Sequence

from .corruption import CorruptionConfig, ImagePool, corrupt_image
from .records import PreferenceRecord, load_image

TILE = 160  # pixels per image tile
TEXT_WIDTH = 460
PAD = 8


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _fit(image, size: int):
    """Scale to fit a size×size tile (nearest-neighbour when enlarging small images, so pixels stay visible)."""
    from PIL import Image

    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(new, Image.NEAREST if scale > 1 else Image.BICUBIC)


def render_preview(
    records: Sequence[PreferenceRecord],
    out_path: str | os.PathLike,
    n: int = 8,
    config: CorruptionConfig = CorruptionConfig(),
    epoch: int = 0,
    pool: Sequence[PreferenceRecord] | None = None,
) -> Path:
    """Write a PNG grid of the first `n` records: original | corrupted | text. Returns its path."""
    from PIL import Image, ImageDraw

    shown = list(records[: max(1, n)])  # a RecordTable reads only these
    if not shown:
        raise ValueError("render_preview: no records to show")
    pool_obj = None
    if config.strategy == "random_image":
        pool_obj = ImagePool(pool if pool is not None else records)
    title_font, body_font = _font(15), _font(13)
    line_height, wrap, header = 17, 58, 28
    blocks = []  # per record: the text lines (the default font has ASCII glyphs only: "+" / "-")
    for record in shown:
        lines = [(f"[{record.index}] {record.sample_id}", (90, 90, 90))]
        lines += [(s, (0, 0, 0)) for s in textwrap.wrap("Q: " + record.display_question, wrap)[:4]]
        lines += [(s, (0, 120, 0)) for s in textwrap.wrap("+ " + record.chosen, wrap)[:6]]
        lines += [(s, (180, 0, 0)) for s in textwrap.wrap("- " + record.rejected, wrap)[:6]]
        blocks.append(lines)
    heights = [max(TILE, len(lines) * line_height) + 2 * PAD for lines in blocks]
    width = 2 * TILE + TEXT_WIDTH + 4 * PAD
    sheet = Image.new("RGB", (width, header + sum(heights)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    area = f", area {config.area[0]:.0%}-{config.area[1]:.0%}" if config.strategy == "crop" else ""
    draw.text((PAD, 6), f"original | corrupted ({config.strategy}{area}, seed {config.seed}, epoch {epoch})"
              " | question, chosen (+), rejected (-)", fill=(0, 0, 0), font=title_font)
    top = header
    for record, lines, row_height in zip(shown, blocks, heights):
        original = load_image(record)
        corrupted = corrupt_image(original, record.sample_id, epoch, config, pool=pool_obj, own_path=record.image_path)
        for col, image in enumerate((original, corrupted)):
            tile = _fit(image, TILE)
            x = PAD + col * (TILE + PAD)
            sheet.paste(tile, (x, top + PAD))
            draw.rectangle((x - 1, top + PAD - 1, x + tile.width, top + PAD + tile.height), outline=(160, 160, 160))
        x, y = 2 * (TILE + PAD) + PAD, top + PAD
        for text, colour in lines:
            draw.text((x, y), text, fill=colour, font=body_font)
            y += line_height
        top += row_height
        draw.line((0, top - 1, width, top - 1), fill=(220, 220, 220))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
