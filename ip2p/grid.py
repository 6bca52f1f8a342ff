"""A labelled image grid: validation during training and the guidance sweep at inference.

    grid = make_grid([[a, b], [c, d]], row_labels=["image 1", "image 2"], col_labels=["x", "y"])

Rows x columns of equal-size cells (every image is resized to the first one's size). A left margin
holds the row labels and a top margin the column labels, each only when labels are given; a title,
when given, sits in a band above everything. Text uses PIL's default font, so nothing is downloaded.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

PAD = 4  # pixels between a label and the cell edge
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_size(text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    """(width, height) of one line of `text` drawn at (0, 0); the height is one for any letters."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = draw.textbbox((0, 0), text, font=font)[2]
    return width, draw.textbbox((0, 0), "Ag|" + text, font=font)[3]


def _margins(row_labels, col_labels, title, font) -> tuple[int, int, int]:
    """(left margin, column-label band height, title band height) in pixels; 0 when absent."""
    left = max(_text_size(t, font)[0] for t in row_labels) + 2 * PAD if row_labels else 0
    top = max(_text_size(t, font)[1] for t in col_labels) + 2 * PAD if col_labels else 0
    title_h = _text_size(title, font)[1] + 2 * PAD if title else 0
    return left, top, title_h


def _check_shape(images, row_labels, col_labels) -> tuple[int, int]:
    if not images or not images[0]:
        raise ValueError("make_grid needs at least one row with at least one image")
    cols = len(images[0])
    if any(len(row) != cols for row in images):
        raise ValueError(f"every row must have {cols} images; got {[len(r) for r in images]}")
    if row_labels is not None and len(row_labels) != len(images):
        raise ValueError(f"{len(row_labels)} row labels for {len(images)} rows")
    if col_labels is not None and len(col_labels) != cols:
        raise ValueError(f"{len(col_labels)} column labels for {cols} columns")
    return len(images), cols


def make_grid(
    images: list[list[Image.Image]],
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    title: str | None = None,
) -> Image.Image:
    """Paste `images[r][c]` into a grid of equal cells, with optional row/column labels, title.

    The cells are as wide as the widest image and as tall as the tallest: an image of another shape
    (an aspect-ratio bucket's) keeps it, centred in its cell."""
    rows, cols = _check_shape(images, row_labels, col_labels)
    cell_w = max(image.size[0] for row in images for image in row)
    cell_h = max(image.size[1] for row in images for image in row)
    font = _font()
    left, top, title_h = _margins(row_labels, col_labels, title, font)
    width = max(left + cols * cell_w, _text_size(title, font)[0] + 2 * PAD if title else 0)
    grid = Image.new("RGB", (width, title_h + top + rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((PAD, PAD), title, fill=INK, font=font)
    for c, label in enumerate(col_labels or []):
        draw.text((left + c * cell_w + PAD, title_h + PAD), label, fill=INK, font=font)
    for r, row in enumerate(images):
        y = title_h + top + r * cell_h
        if row_labels:
            middle = y + max(0, (cell_h - _text_size(row_labels[r], font)[1]) // 2)
            draw.text((PAD, middle), row_labels[r], fill=INK, font=font)
        for c, image in enumerate(row):
            cell = image.convert("RGB")
            grid.paste(cell, (left + c * cell_w + (cell_w - cell.size[0]) // 2, y + (cell_h - cell.size[1]) // 2))
    return grid
