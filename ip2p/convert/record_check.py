"""Checking one record, in the worker that writes its shard.

An image is accepted only after a full decode (`Image.load()`): `verify()` alone misses truncated
data. PIL's DecompressionBombWarning is an error here, like DecompressionBombError. The EXIF
orientation that readers apply next is applied here too: a corrupt EXIF block passes `load()`.

The original encoded bytes are stored as they are, so a JPEG is never re-encoded. The output's
Image feature is `datasets.Image(mode="RGB")`, whose decoder calls PIL's `convert("RGB")`. That is
right for RGB, L, 1, CMYK, YCbCr and palette images, but wrong for alpha (it shows whatever colour
hides under transparent pixels, where `ip2p.images.to_rgb` composites over white) and for 16/32-bit
images (it clips to white, where `to_rgb` scales). Only those images are stored as a lossless PNG
of `to_rgb(image)`, so every reader gets the same RGB pixels as the rest of the kit.
"""

from __future__ import annotations

import io
import lzma
import os
import warnings
import zipfile
import zlib
from collections import OrderedDict

from PIL import ExifTags, Image, ImageFile, ImageOps

from ip2p.convert.records import (
    DECOMPRESSION_BOMB,
    EMPTY_IMAGE,
    EMPTY_INSTRUCTION,
    MISSING_IMAGE,
    MISSING_INSTRUCTION,
    TRUNCATED_IMAGE,
    UNDECODABLE_IMAGE,
    UNPARSEABLE_RECORD,
    UNREADABLE_IMAGE,
    ImageRef,
    Record,
    Rejection,
)
from ip2p.images import to_rgb

# Modes whose bytes are kept: PIL's convert("RGB") gives the same pixels as to_rgb for them.
KEPT_MODES = frozenset({"RGB", "RGBX", "L", "1", "CMYK", "YCbCr", "P"})

# What reading a damaged zip member raises: zipfile's own errors (a bad CRC is BadZipFile) and the
# decompressor's, which zipfile passes through (zlib.error for deflate, LZMAError for lzma).
ZIP_READ_ERRORS = (OSError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error, lzma.LZMAError)


class ZipCache:
    """The last few zip files a worker opened (reading the central directory costs time)."""

    def __init__(self, size: int = 2):
        self.size = size
        self._open: OrderedDict[str, zipfile.ZipFile] = OrderedDict()

    def get(self, path: str) -> zipfile.ZipFile:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        zf = zipfile.ZipFile(path)
        self._open[path] = zf
        if len(self._open) > self.size:
            self._open.popitem(last=False)[1].close()
        return zf

    def close(self) -> None:
        for zf in self._open.values():
            zf.close()
        self._open.clear()


def read_ref(ref: ImageRef | None, zips: ZipCache, column: str) -> bytes:
    """The encoded bytes behind a reference; a missing or unreadable source is a Rejection."""
    if ref is None or ref.kind == "absent":
        detail = ref.label if ref is not None and ref.label else "no image value"
        raise Rejection(MISSING_IMAGE, detail, column)
    if ref.kind == "bytes":
        return ref.data or b""
    if ref.kind == "zip":
        return _read_zip_member(ref, zips, column)
    try:
        with open(ref.location, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        raise Rejection(MISSING_IMAGE, f"file not found: {ref.location}", column) from None
    except IsADirectoryError:
        raise Rejection(
            MISSING_IMAGE, f"a folder, not an image file: {ref.location}", column
        ) from None
    except OSError as e:
        raise Rejection(UNREADABLE_IMAGE, f"{ref.location}: {e.strerror or e}", column) from None
    except ValueError as e:  # a NUL character in the path: no file can have that name
        detail = f"not a valid file path ({e}): {ref.location!r}"
        raise Rejection(MISSING_IMAGE, detail, column) from None


def _read_zip_member(ref: ImageRef, zips: ZipCache, column: str) -> bytes:
    try:
        return zips.get(ref.location).read(ref.member)
    except KeyError:
        raise Rejection(MISSING_IMAGE, f"{ref.member} not in {ref.location}", column) from None
    except ZIP_READ_ERRORS as e:
        raise Rejection(UNREADABLE_IMAGE, f"{ref.location}:{ref.member}: {e}", column) from None


def decode(data: bytes, label: str, column: str) -> Image.Image:
    """Fully decoded PIL image, or a Rejection saying why not."""
    if not data:
        raise Rejection(EMPTY_IMAGE, f"0 bytes: {label}", column)
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have switched it on
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF / palette chatter from PIL
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
            check_orientation(image, label, column)
            return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejection(DECOMPRESSION_BOMB, f"{label}: {e}", column) from None
    except Rejection:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure on foreign bytes is bad data
        truncated = isinstance(e, EOFError) or "truncated" in str(e).lower()
        reason = TRUNCATED_IMAGE if truncated else UNDECODABLE_IMAGE
        raise Rejection(reason, f"{label}: {type(e).__name__}: {e}", column) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def check_orientation(image: Image.Image, label: str, column: str) -> None:
    """Apply the EXIF orientation the way every reader does after decoding (datasets' Image
    feature, `ip2p.images.to_rgb`). A corrupt EXIF block passes `load()` but raises there (e.g. an
    ASCII value under a numeric tag), so such an image would be written and then fail to read."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation) is not None:  # what datasets checks
            ImageOps.exif_transpose(image)
    except Exception as e:  # noqa: BLE001 - PIL's EXIF writer raises TypeError, struct.error, ...
        detail = f"{label}: corrupt EXIF data ({type(e).__name__}: {e})"
        raise Rejection(UNDECODABLE_IMAGE, detail, column) from None


def needs_rgb_png(image: Image.Image) -> bool:
    """True where datasets' convert("RGB") would not give the to_rgb pixels (alpha, >8 bits)."""
    if image.mode == "P":
        return "transparency" in image.info
    return image.mode not in KEPT_MODES


def rgb_png(image: Image.Image, label: str, column: str) -> bytes:
    try:
        rgb = to_rgb(image)
    except (ValueError, OSError) as e:
        raise Rejection(UNDECODABLE_IMAGE, f"{label}: mode {image.mode}: {e}", column) from None
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return buffer.getvalue()


def check_image(ref: ImageRef | None, zips: ZipCache, column: str) -> tuple[dict, str | None]:
    """The Image value to store ({"bytes", "path"}) and the source mode if it was re-encoded."""
    data = read_ref(ref, zips, column)
    label = (ref.label if ref is not None else None) or "<bytes>"
    image = decode(data, label, column)
    path = ref.label if ref is not None else None
    if needs_rgb_png(image):
        return {"bytes": rgb_png(image, label, column), "path": path}, image.mode
    return {"bytes": data, "path": path}, None


def check_instruction(value: object, column: str = "edit_prompt") -> str:
    if value is None:
        raise Rejection(MISSING_INSTRUCTION, "no instruction", column)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Rejection(UNPARSEABLE_RECORD, f"instruction is a {type(value).__name__}", column)
    text = str(value).strip()
    if not text:
        raise Rejection(EMPTY_INSTRUCTION, "instruction is blank", column)
    return text


def check_record(record: Record, zips: ZipCache) -> tuple[dict, list[str]]:
    """The output row's three main columns, and the modes of images re-encoded to RGB PNG."""
    if record.failure is not None:
        raise Rejection(*record.failure)
    text = check_instruction(record.instruction)
    source, source_mode = check_image(record.input_image, zips, "input_image")
    edited, edited_mode = check_image(record.edited_image, zips, "edited_image")
    modes = [m for m in (source_mode, edited_mode) if m is not None]
    return {"input_image": source, "edit_prompt": text, "edited_image": edited}, modes


def file_ref(path: str, label: str | None = None) -> ImageRef:
    return ImageRef("file", location=os.fspath(path), label=label or os.fspath(path))
