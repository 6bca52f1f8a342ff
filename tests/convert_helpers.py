"""Builders for tests/test_convert.py: tiny images and every source layout, written to tmp_path."""

from __future__ import annotations

import csv
import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

import convert_to_hf_dataset


def image_bytes(seed: int = 0, mode: str = "RGB", fmt: str = "JPEG", size=(16, 16)) -> bytes:
    """Random-content image bytes in the given PIL mode and format."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    options = {}
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16))
    elif mode.startswith("P"):
        image = rgb.quantize(colors=8)
        if mode == "P+tRNS":  # palette entry 0 transparent
            options["transparency"] = 0
    else:
        image = rgb.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def bomb_png(pixels_side: int = 9500) -> bytes:
    """A valid 1-bit PNG of side x side pixels (over PIL's default limit), only ~12 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", pixels_side, pixels_side, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (pixels_side + 7) // 8)
    pixels = zlib.compress(row * pixels_side, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def prompt_folder(
    root: Path, folder: str, seeds, prompt: dict | bytes | None = None, seed0: int = 0
):
    """An InstructPix2Pix prompt folder; returns {(seed, side): bytes}."""
    directory = root / folder
    directory.mkdir(parents=True, exist_ok=True)
    if prompt is None:
        prompt = {
            "input": f"photo {folder}",
            "edit": f"edit {folder}",
            "output": f"result {folder}",
        }
    raw = prompt if isinstance(prompt, bytes) else json.dumps(prompt).encode()
    (directory / "prompt.json").write_bytes(raw)
    images = {}
    for seed in seeds:
        for side in (0, 1):
            images[seed, side] = write(
                directory / f"{seed}_{side}.jpg", image_bytes(seed0 + seed * 2 + side + int(folder))
            )
    return images


def zip_tree(source: Path, zip_path: Path, folders: list[str], prefix: str = "") -> None:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for folder in folders:
            for file in sorted((source / folder).iterdir()):
                zf.write(file, f"{prefix}{folder}/{file.name}")


def pair_files(root: Path, n: int, start: int = 0) -> list[dict]:
    """n image pairs under root/img/, as manifest records with relative paths."""
    records = []
    for i in range(start, start + n):
        write(root / "img" / f"{i}_in.jpg", image_bytes(100 + 2 * i))
        write(root / "img" / f"{i}_out.png", image_bytes(101 + 2 * i, fmt="PNG"))
        records.append(
            {
                "input_image": f"img/{i}_in.jpg",
                "edit_prompt": f"instruction {i}",
                "edited_image": f"img/{i}_out.png",
            }
        )
    return records


def write_manifest(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        fields = list(dict.fromkeys(k for r in records for k in r))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fields, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(records)
    return path


def run(*args: str | Path) -> int:
    return convert_to_hf_dataset.main([str(a) for a in args])


def load(dst: Path):
    import datasets

    return datasets.load_from_disk(str(dst))


def raw_rows(dst: Path) -> list[dict]:
    """Rows with images as stored ({"bytes", "path"}), not decoded."""
    import datasets

    ds = load(dst)
    for column in ("input_image", "edited_image"):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return list(ds)


def rejected(dst: Path) -> list[dict]:
    return [json.loads(line) for line in (dst / "rejected.jsonl").read_text().splitlines()]


def report(dst: Path) -> dict:
    return json.loads((dst / "conversion_report.json").read_text())


MB_FLAGS = (
    "--original_image_column",
    "source_img",
    "--edit_prompt_column",
    "instruction",
    "--edited_image_column",
    "target_img",
)


def hf_records(src: Path, n: int, target: str = "path") -> dict:
    """MagicBrush-like columns: source_img an Image feature, target_img a path string or bytes."""
    records = pair_files(src, n)
    targets = [src / r["edited_image"] for r in records]
    return {
        "source_img": [
            {"bytes": (src / r["input_image"]).read_bytes(), "path": r["input_image"]}
            for r in records
        ],
        "instruction": [r["edit_prompt"] for r in records],
        "target_img": [str(t) if target == "path" else t.read_bytes() for t in targets],
        "turn_index": list(range(n)),
    }


def hf_features(target: str = "path"):
    import datasets

    return datasets.Features(
        {
            "source_img": datasets.Image(),
            "instruction": datasets.Value("string"),
            "target_img": datasets.Value("string" if target == "path" else "binary"),
            "turn_index": datasets.Value("int32"),
        }
    )
