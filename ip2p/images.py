"""Reading images the same way in every stage: EXIF orientation applied, any mode to 8-bit RGB."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ip2p.errors import UserError


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB from any PIL image (CMYK, RGBA, LA, P, L, 1, I;16, I, F).

    Alpha is composited over white (what a viewer shows), and 16/32-bit greyscale is scaled to
    8 bits rather than clipped, which is what PIL's own `convert("RGB")` would do.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        if image.mode == "F" and a.max() <= 1.0:
            peak = 1.0
        a = np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """Open a path or encoded bytes as upright RGB; a file that is not an image is a UserError."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except FileNotFoundError:
        raise UserError(f"image not found: {name}") from None
    except IsADirectoryError:
        raise UserError(f"expected an image file, got a folder: {name}") from None
    except PermissionError:
        raise UserError(f"image not readable (permission denied): {name}") from None
    with fp:
        try:
            image = Image.open(fp)
            image.load()
        except UnidentifiedImageError:
            raise UserError(f"not an image (unknown or corrupt format): {name}") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            detail = str(e).split(" <_io.")[0] or type(e).__name__
            raise UserError(f"not a readable image: {name} ({detail})") from None
    return to_rgb(image)
