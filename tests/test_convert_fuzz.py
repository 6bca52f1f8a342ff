"""Fuzz stage 1: seeded random sources in every layout, good records mixed with corrupt ones.

Each round builds one small source from a seeded RNG (InstructPix2Pix prompt folders, loose and
in zip shards, with or without seeds.json; a JSONL / .json / CSV / TSV manifest; an HF
save_to_disk dataset) and converts it in-process with `convert_to_hf_dataset.main`. The converter
must never raise. It exits 0, with every generated record either written or in rejected.jsonl
(counted exactly as generated, every good record written, every written image decoding as RGB), or
exits 2 with one error line when no record at all is convertible.

Every generated record carries its expected outcome: OK (must be written, with this instruction),
REJECT (must be rejected, with one of the listed reasons) or MAYBE (damage a decoder may or may not
notice, e.g. a JPEG cut in its last bytes or bit flips in its entropy-coded data).

    IP2P_FUZZ_ROUNDS=200 python -m pytest tests/test_convert_fuzz.py -q   # a longer local run
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from convert_helpers import image_bytes, load, raw_rows, rejected, report, run
from PIL import Image, features

from ip2p.convert.records import (
    EMPTY_IMAGE,
    EMPTY_INSTRUCTION,
    MISSING_IMAGE,
    MISSING_INSTRUCTION,
    REASONS,
    TRUNCATED_IMAGE,
    UNDECODABLE_IMAGE,
    UNPARSEABLE_RECORD,
    UNREADABLE_IMAGE,
)

ROUNDS = int(os.environ.get("IP2P_FUZZ_ROUNDS", "12"))  # rounds per layout
OK, MAYBE, REJECT = "ok", "maybe", "reject"


# ---------------------------------------------------------------- expected outcomes


@dataclass(frozen=True)
class Part:
    """One thing the converter checks: its outcome and the rejection reasons it may give."""

    outcome: str = OK
    reasons: frozenset = frozenset()


GOOD = Part()


def bad(*reasons: str) -> Part:
    return Part(REJECT, frozenset(reasons))


def maybe(*reasons: str) -> Part:
    return Part(MAYBE, frozenset(reasons))


DAMAGED = maybe(TRUNCATED_IMAGE, UNDECODABLE_IMAGE)  # decoders may or may not notice


def combine(*parts: Part) -> Part:
    """A record's outcome from its parts in the converter's check order (record, instruction,
    input image, edited image): the first certain rejection ends the checks."""
    outcome, reasons = OK, set()
    for part in parts:
        if part.outcome == OK:
            continue
        reasons |= part.reasons
        if part.outcome == REJECT:
            return Part(REJECT, frozenset(reasons))
        outcome = MAYBE
    return Part(outcome, frozenset(reasons))


@dataclass
class Expected:
    key: object  # the record's origin: manifest line / index, HF row, (folder, seed)
    part: Part
    text: str | None = None  # the edit_prompt an OK record must be written with


@dataclass
class Source:
    args: list
    records: list[Expected]
    row_key: Callable[[dict], object]  # a written row -> its record's key
    rejected_key: Callable[[dict], object]  # a rejected.jsonl entry -> its record's key


# ---------------------------------------------------------------- images


def _good_kinds() -> list[tuple[str, str]]:
    kinds = [
        ("RGB", "JPEG"),
        ("RGB", "PNG"),
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("P", "PNG"),
        ("P+tRNS", "PNG"),
        ("LA", "PNG"),
        ("I;16", "PNG"),
        ("RGBA", "PNG"),
        ("1", "PNG"),
        ("RGB", "EXIF"),  # a JPEG with an Orientation tag: readers rotate it
    ]
    return kinds + ([("RGB", "WEBP")] if features.check("webp") else [])


GOOD_KINDS = _good_kinds()
FAULTS = ["truncated", "random", "empty", "missing", "bitflip", "bad_exif"]


def exif_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90
    exif[0x010F] = "fuzz camera"
    exif[0x0110] = "model x"
    exif[0x011A] = 72.0  # XResolution (a rational)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def good_image(rng: random.Random) -> bytes:
    mode, fmt = rng.choice(GOOD_KINDS)
    size = (rng.randint(4, 24), rng.randint(4, 24))
    if fmt == "EXIF":
        return exif_jpeg(rng.randrange(1 << 30), size)
    return image_bytes(rng.randrange(1 << 30), mode=mode, fmt=fmt, size=size)


def plain_image(rng: random.Random) -> bytes:
    fmt = rng.choice(["JPEG", "PNG"])
    return image_bytes(rng.randrange(1 << 30), fmt=fmt, size=(rng.randint(8, 24), 16))


def flip_bits(data: bytes, lo: int, hi: int, rng: random.Random, flips: int) -> bytes:
    out = bytearray(data)
    for _ in range(flips):
        out[rng.randrange(lo, max(lo + 1, hi))] ^= 1 << rng.randrange(8)
    return bytes(out)


def body_range(data: bytes) -> tuple[int, int]:
    """The entropy-coded data of a JPEG (after SOS) or the first IDAT payload of a PNG."""
    if data.startswith(b"\x89PNG"):
        at = data.find(b"IDAT")
        length = struct.unpack(">I", data[at - 4 : at])[0]
        return at + 4, at + 4 + length
    at = data.find(b"\xff\xda")
    return at + 2 + struct.unpack(">H", data[at + 2 : at + 4])[0], len(data) - 2


def damaged_image(rng: random.Random, fault: str) -> tuple[bytes | None, Part]:
    """Bytes for one image fault (None: the file is not written) and what the converter must do."""
    if fault == "missing":
        return None, bad(MISSING_IMAGE)
    if fault == "empty":
        return b"", bad(EMPTY_IMAGE)
    if fault == "random":  # a text prefix no image format claims, then noise
        return b"fuzz: not an image " + rng.randbytes(rng.randint(0, 300)), bad(UNDECODABLE_IMAGE)
    if fault == "bad_exif":
        data = exif_jpeg(rng.randrange(1 << 30), (rng.randint(4, 24), 12))
        start = data.find(b"Exif") + 6
        return flip_bits(data, start, start + 90, rng, rng.randint(1, 4)), DAMAGED
    data = plain_image(rng)
    if fault == "truncated":
        return data[: rng.randrange(1, len(data))], DAMAGED
    lo, hi = body_range(data)
    return flip_bits(data, lo, hi, rng, rng.randint(1, 8)), DAMAGED


def some_image(rng: random.Random, fault_rate: float) -> tuple[bytes | None, Part]:
    if rng.random() < fault_rate:
        return damaged_image(rng, rng.choice(FAULTS))
    return good_image(rng), GOOD


# ---------------------------------------------------------------- instructions

ABSENT = object()  # the key is left out of the record
UNICODE = [
    "把天空变成日落 🌅",
    "اجعلها ثلجية",
    "e\u0301clair, ñandú, Ω≈ç√",
    "zero\u200bwidth\u200djoiner",
    "tab\tand\nnewline inside",
    "family 👩\u200d👩\u200d👧 emoji",
    "line\u2028separator",
    'quotes "double", \'single\', comma, semicolon;',
    "nul \x00 inside",
]


def good_instruction(rng: random.Random, uid: str, numbers: bool = True) -> tuple[object, str]:
    """A value the converter must accept, and the edit_prompt it must write for it."""
    kind = rng.choice(["plain", "unicode", "long", "padded"] + ["number"] * numbers)
    if kind == "number":
        value = rng.choice([rng.randint(-10**6, 10**6), rng.randint(0, 999) / 8])
        return value, str(value)  # a number is taken as its text
    text = {
        "plain": f"make it {rng.choice(['snowy', 'red', 'night'])} {uid}",
        "unicode": f"{rng.choice(UNICODE)} {uid}",
        "long": f"{uid} " + "very long instruction " * rng.randint(200, 900),
        "padded": f" \t {uid} with spaces \n ",
    }[kind]
    return text, text.strip()


BAD_INSTRUCTIONS = [
    (None, bad(MISSING_INSTRUCTION)),
    (ABSENT, bad(MISSING_INSTRUCTION)),
    ("", bad(EMPTY_INSTRUCTION)),
    (" \t\n\u00a0\u3000 ", bad(EMPTY_INSTRUCTION)),
    (["make it red"], bad(UNPARSEABLE_RECORD)),
    ({"text": "make it red"}, bad(UNPARSEABLE_RECORD)),
    (True, bad(UNPARSEABLE_RECORD)),
    ("lone surrogate \ud800 escape", bad(UNPARSEABLE_RECORD)),  # JSON allows it, UTF-8 does not
]
BLANK_INSTRUCTIONS = BAD_INSTRUCTIONS[2:4]  # the faults a CSV cell or an Arrow string can hold


def some_instruction(
    rng: random.Random, uid: str, fault_rate: float, faults: list = BAD_INSTRUCTIONS
) -> tuple[object, Part, str | None]:
    if rng.random() < fault_rate:
        value, part = rng.choice(faults)
        return value, part, None
    value, text = good_instruction(rng, uid, numbers=faults is BAD_INSTRUCTIONS)
    return value, GOOD, text


def dump(value: object, rng: random.Random) -> str:
    """JSON text, raw UTF-8 or \\u-escaped at random (escaped where it must be: lone surrogates)."""
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(value)


# ---------------------------------------------------------------- manifests

URL = "https://example.com/pair.jpg"
BAD_PATHS = [
    (None, bad(MISSING_IMAGE)),
    (ABSENT, bad(MISSING_IMAGE)),
    ("", bad(MISSING_IMAGE)),
    (7, bad(MISSING_IMAGE)),
    (["img/a.jpg"], bad(MISSING_IMAGE)),
    ({"path": "img/a.jpg"}, bad(MISSING_IMAGE)),
    (False, bad(MISSING_IMAGE)),
    (URL, bad(MISSING_IMAGE)),
    ("img", bad(MISSING_IMAGE)),  # a folder
    ("img/nul\x00byte.jpg", bad(MISSING_IMAGE)),
]
NAMES = ["p{}.jpg", "p{}.png", "ünïcødé {}.jpeg", "sub dir/p{}.webp", "P{}.JPG"]


def image_value(
    rng: random.Random, root: Path, n: int, fault_rate: float, typed: bool
) -> tuple[object, Part]:
    """A manifest's image value (typed: JSON may hold non-strings) and its file, if any."""
    if rng.random() < fault_rate / 3:
        choices = [
            c for c in BAD_PATHS if typed or (isinstance(c[0], str) and "\x00" not in c[0])
        ]
        return rng.choice(choices)
    data, part = some_image(rng, fault_rate)
    name = "img/" + rng.choice(NAMES).format(n)
    path = root / name
    if data is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return (str(path) if rng.random() < 0.2 else name), part


def manifest_record(
    rng: random.Random, root: Path, uid: str, n: int, fault_rate: float, typed: bool, meta
) -> tuple[dict, Part, str | None]:
    """One record as a dict (ABSENT values left out), its expected outcome and instruction."""
    faults = BAD_INSTRUCTIONS if typed else BLANK_INSTRUCTIONS
    instruction, text_part, text = some_instruction(rng, uid, fault_rate / 2, faults)
    source, source_part = image_value(rng, root, 2 * n, fault_rate, typed)
    edited, edited_part = image_value(rng, root, 2 * n + 1, fault_rate, typed)
    record = {
        "input_image": source,
        "edit_prompt": instruction,
        "edited_image": edited,
        "uid": uid,
        "meta": meta(rng),
    }
    record = {k: v for k, v in record.items() if v is not ABSENT}
    part = combine(text_part, source_part, edited_part)
    return record, part, text if part.outcome != REJECT else None


META = {  # the extra column's values: one Arrow type for the column, whatever they hold
    "ints": lambda rng: rng.choice([rng.randint(-5, 5), 2**70, None]),
    "floats": lambda rng: rng.choice([rng.random(), 3, float("inf"), None]),
    "mixed": lambda rng: rng.choice([1, "x", 2.5, True, None, ["a", 1], {"k": [None]}]),
}

LINE_FAULTS = [  # whole JSONL lines that are records but not objects
    b'{"input_image": "img/p0.jpg", "edit_prompt": "cut',
    b"[1, 2, 3]",
    b"42",
    b'"just a string"',
    b"null",
    b"true",
    b'{"edit_prompt": "caf\xe9 latin-1 bytes"}',
    b"[" * 50_000 + b"]" * 50_000,  # nested deeper than Python's recursion limit
]


def build_json_manifest(tmp: Path, rng: random.Random, all_bad: bool) -> Source:
    """A JSONL manifest (one line per record, blank lines between) or, at random, a .json list."""
    root = tmp / "src"
    root.mkdir()
    as_list = rng.random() < 0.25
    fault_rate = 1.0 if all_bad else rng.uniform(0.2, 0.6)
    meta = META[rng.choice(list(META))]
    lines, records, uids = [], [], {}
    for n in range(rng.randint(15, 35)):
        if not as_list and rng.random() < 0.15:
            lines.append(rng.choice([b"", b"   ", b"\t\r"]))  # blank: not a record
        key = n if as_list else len(lines) + 1
        if rng.random() < fault_rate / 4:
            if as_list:
                value = rng.choice([[1, 2], 42, "text", None, True])
                lines.append(dump(value, rng).encode())
            else:
                lines.append(rng.choice(LINE_FAULTS))
            records.append(Expected(key, bad(UNPARSEABLE_RECORD)))
            continue
        uid = f"u{n}"
        record, part, text = manifest_record(rng, root, uid, n, fault_rate, True, meta)
        if all_bad and part.outcome != REJECT:
            record["edit_prompt"], part, text = None, bad(MISSING_INSTRUCTION), None
        lines.append(dump(record, rng).encode())
        records.append(Expected(key, part, text))
        uids[uid] = key
    if as_list:
        path = root / "pairs.json"
        path.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]")
    else:
        path = root / "pairs.jsonl"
        bom = b"\xef\xbb\xbf" if rng.random() < 0.3 else b""
        path.write_bytes(bom + b"\n".join(lines) + b"\n")
    origin = "index" if as_list else "line"
    return Source(
        [rng.choice([path, root])],
        records,
        row_key=lambda row: uids[row["uid"]],
        rejected_key=lambda entry: entry[origin],
    )


def line_breaks(text: str) -> int:
    """Physical lines as the csv module counts them (newline="": \\r\\n, \\r or \\n)."""
    return len(re.findall(r"\r\n|\r|\n", text))


def build_csv_manifest(tmp: Path, rng: random.Random, all_bad: bool) -> Source:
    """A CSV or TSV manifest: rows with the wrong number of fields, blank lines, quoted text."""
    root = tmp / "src"
    root.mkdir()
    delimiter = rng.choice([",", "\t"])
    fault_rate = 1.0 if all_bad else rng.uniform(0.2, 0.6)
    header = ["input_image", "edit_prompt", "edited_image", "uid", "meta"]
    text, line = _csv_row(header, delimiter), 2
    records, uids = [], {}
    for n in range(rng.randint(15, 35)):
        if rng.random() < 0.15:
            text += "\n"  # a blank line: not a record
            line += 1
        uid = f"u{n}"
        if rng.random() < fault_rate / 4:
            fields = [uid] * rng.choice([1, 2, 4, 6, 9])  # wrong number of fields
            row = _csv_row(fields, delimiter) if rng.random() < 0.8 else "   \n"
            records.append(Expected(line, bad(UNPARSEABLE_RECORD)))
        else:
            meta = lambda r: r.choice(["", "x", "1", "ünï"])  # noqa: E731
            record, part, value = manifest_record(rng, root, uid, n, fault_rate, False, meta)
            if all_bad and part.outcome != REJECT:
                record["edit_prompt"], part, value = "", bad(EMPTY_INSTRUCTION), None
            row = _csv_row([record[k] for k in header], delimiter)
            records.append(Expected(line, part, value))
            uids[uid] = line
        text += row
        line += line_breaks(row)
    path = root / ("pairs.csv" if delimiter == "," else "pairs.tsv")
    path.write_text(text, encoding="utf-8", newline="")
    return Source(
        [rng.choice([path, root])],
        records,
        row_key=lambda row: uids[row["uid"]],
        rejected_key=lambda entry: entry["line"],
    )


def _csv_row(fields: list, delimiter: str) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter, lineterminator="\n").writerow(fields)
    return buffer.getvalue()


# ---------------------------------------------------------------- HF save_to_disk


def build_hf(tmp: Path, rng: random.Random, all_bad: bool) -> Source:
    """A save_to_disk dataset: input an Image feature, edited paths (string) or bytes (binary)."""
    import datasets

    saved = tmp / "saved"
    files = tmp / "files"
    edited_as = rng.choice(["string", "binary"])
    fault_rate = 1.0 if all_bad else rng.uniform(0.2, 0.6)
    columns = {"uid": [], "input_image": [], "edit_prompt": [], "edited_image": []}
    records = []
    for n in range(rng.randint(15, 35)):
        uid = f"u{n}"
        faults = [(None, bad(MISSING_INSTRUCTION))] + BLANK_INSTRUCTIONS
        value, text_part, text = some_instruction(rng, uid, fault_rate / 2, faults)
        source, source_part = _hf_image(rng, fault_rate)
        edited, edited_part = (_hf_path if edited_as == "string" else _hf_bytes)(
            rng, files, n, fault_rate
        )
        part = combine(text_part, source_part, edited_part)
        if all_bad and part.outcome != REJECT:
            value, part = None, bad(MISSING_INSTRUCTION)
        for column, v in zip(columns, (uid, source, value, edited)):
            columns[column].append(v)
        records.append(Expected(n, part, text if part.outcome != REJECT else None))
    features = datasets.Features(
        {
            "uid": datasets.Value("string"),
            "input_image": datasets.Image(),
            "edit_prompt": datasets.Value("string"),
            "edited_image": datasets.Value(edited_as),
        }
    )
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(saved))
    index = {uid: n for n, uid in enumerate(columns["uid"])}
    return Source(
        [saved],
        records,
        row_key=lambda row: index[row["uid"]],
        rejected_key=lambda entry: entry["row"],
    )


def _hf_image(rng: random.Random, fault_rate: float) -> tuple[object, Part]:
    data, part = some_image(rng, fault_rate)
    if data is None:  # a null cell (datasets' Image encoder itself reads a path-only value)
        return None, part
    return {"bytes": data, "path": rng.choice([None, "orig.jpg"])}, part


def _hf_path(rng: random.Random, files: Path, n: int, fault_rate: float) -> tuple[object, Part]:
    if rng.random() < fault_rate / 4:
        return rng.choice([None, "", "nul\x00.jpg"]), bad(MISSING_IMAGE)
    data, part = some_image(rng, fault_rate)
    path = files / f"{n}.png"
    if data is not None:
        files.mkdir(exist_ok=True)
        path.write_bytes(data)
    return str(path), part


def _hf_bytes(rng: random.Random, _files: Path, _n: int, fault_rate: float) -> tuple[object, Part]:
    data, part = some_image(rng, fault_rate)
    return data, part  # None: a null cell, MISSING_IMAGE


# ---------------------------------------------------------------- InstructPix2Pix folders

EXTENSIONS = ["jpg", "jpeg", "png", "webp", "JPG"]


def good_prompt(rng: random.Random, folder: str) -> tuple[dict, str]:
    edit, text = good_instruction(rng, f"f{folder}")
    caption = rng.choice(["input", "caption"])
    prompt = {caption: rng.choice([f"photo {folder}", 5, ["odd", "caption"]]), "edit": edit}
    if rng.random() < 0.8:
        prompt["output"] = f"result {folder}"
    return prompt, text


def some_prompt(rng: random.Random, folder: str, fault_rate: float):
    """prompt.json bytes (None: no file), the record-level failure, the instruction, its text."""
    prompt, text = good_prompt(rng, folder)
    if rng.random() >= fault_rate / 2:
        return json.dumps(prompt).encode(), GOOD, GOOD, text
    fault = rng.randrange(9)
    if fault == 0:
        return None, bad(MISSING_INSTRUCTION), GOOD, None
    if fault == 1:
        return b'{"edit": "unterminated', bad(UNPARSEABLE_RECORD), GOOD, None
    if fault == 2:
        return b'["not", "an", "object"]', bad(UNPARSEABLE_RECORD), GOOD, None
    if fault == 3:
        return b'{"edit": "caf\xe9"}', bad(UNPARSEABLE_RECORD), GOOD, None
    if fault == 4:
        return b"[" * 50_000 + b"]" * 50_000, bad(UNPARSEABLE_RECORD), GOOD, None
    if fault == 5:  # text JSON allows but UTF-8 cannot hold, in the caption
        prompt["input"] = "sky \udc00"
        return json.dumps(prompt).encode(), bad(UNPARSEABLE_RECORD), GOOD, None
    if fault == 6:
        del prompt["edit"]
        return json.dumps(prompt).encode(), GOOD, bad(MISSING_INSTRUCTION), None
    value, part = rng.choice([v for v in BAD_INSTRUCTIONS if v[0] is not ABSENT])
    prompt["edit"] = value
    if isinstance(value, str) and "\ud800" in value:  # the whole prompt.json is unusable
        return json.dumps(prompt).encode(), part, GOOD, None
    return json.dumps(prompt).encode(), GOOD, part, None


@dataclass
class Folder:
    name: str
    place: str  # "loose" or a zip file name
    failure: Part
    instruction: Part
    text: str | None
    files: dict  # member name -> bytes
    sides: dict  # seed -> (input Part, edited Part)


def make_folder(rng: random.Random, name: str, place: str, fault_rate: float) -> Folder:
    prompt, failure, instruction, text = some_prompt(rng, name, fault_rate)
    files, sides = {}, {}
    if prompt is not None:
        files["prompt.json"] = prompt
    for seed in rng.sample(range(1, 10**6), rng.choice([0, 1, 1, 2, 2, 3])):
        parts, found = [], False
        for side in (0, 1):
            data, part = some_image(rng, fault_rate / 2)
            if data is not None:
                files[f"{seed}_{side}.{rng.choice(EXTENSIONS)}"] = data
                found = True
            parts.append(part)
        if found:  # a seed with neither image is not in the folder at all
            sides[seed] = tuple(parts)
    if rng.random() < 0.3:  # files that are not seed images
        files.update({"notes.txt": b"hello", "5_2.jpg": b"x", "abc_0.jpg": b"x"})
    return Folder(name, place, failure, instruction, text, files, sides)


def folder_records(folder: Folder, seeds) -> list[Expected]:
    """The records one folder yields for its taken seeds (one record if it has none)."""
    if not seeds:
        failure = folder.failure if folder.failure.outcome == REJECT else bad(MISSING_IMAGE)
        return [Expected((folder.name, None), failure)]
    records = []
    for seed in seeds:
        source, edited = folder.sides.get(seed, (bad(MISSING_IMAGE), bad(MISSING_IMAGE)))
        part = combine(folder.failure, folder.instruction, source, edited)
        records.append(Expected((folder.name, seed), part, folder.text))
    return records


def write_loose(root: Path, folder: Folder) -> None:
    directory = root / folder.name
    directory.mkdir(parents=True)
    for name, data in folder.files.items():
        (directory / name).write_bytes(data)


def write_zip(path: Path, folders: list[Folder], rng: random.Random) -> None:
    prefix = rng.choice(["", "clip-filtered-dataset/"])
    method = rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        zf.writestr("__MACOSX/0000001/._1_0.jpg", b"resource fork")
        for folder in folders:
            if not folder.files or rng.random() < 0.3:  # an empty folder exists only as this
                zf.writestr(f"{prefix}{folder.name}/", b"")
            for name, data in folder.files.items():
                zf.writestr(f"{prefix}{folder.name}/{name}", data)


def corrupt_zip_member(path: Path, folder: Folder, rng: random.Random) -> None:
    """Overwrite bytes inside one member's stored data: its CRC (or inflate) must fail."""
    with zipfile.ZipFile(path) as zf:
        infos = [
            i for i in zf.infolist()
            if i.filename.rpartition("/")[0].endswith(folder.name) and i.compress_size > 2
        ]
    if not infos:
        return
    info = rng.choice(infos)
    data = bytearray(path.read_bytes())
    header = info.header_offset  # the local header: 30 bytes, the name, an extra field
    name_len, extra_len = struct.unpack("<HH", data[header + 26 : header + 30])
    start = header + 30 + name_len + extra_len
    at = start + rng.randrange(info.compress_size - 1)  # not the last byte: it may hold padding
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    member = info.filename.rpartition("/")[2]
    if member == "prompt.json":
        folder.failure = bad(UNPARSEABLE_RECORD)
        return
    pair = re.match(r"(\d+)_([01])\.", member)
    if pair is None:  # not a seed image: nothing reads it
        return
    seed, side = int(pair.group(1)), int(pair.group(2))
    sides = list(folder.sides[seed])
    sides[side] = bad(UNREADABLE_IMAGE)  # reading fails before any decoding
    folder.sides[seed] = tuple(sides)


def build_ip2p(tmp: Path, rng: random.Random, all_bad: bool) -> Source:
    """Loose prompt folders and zip shards, repeats across them, and sometimes a seeds.json."""
    root = tmp / "release"
    root.mkdir()
    fault_rate = 1.0 if all_bad else rng.uniform(0.2, 0.6)
    names = [f"{n:07d}" for n in sorted(rng.sample(range(2, 10**7), rng.randint(6, 14)))]
    places = ["loose", "loose", "shard-00.zip", "shard-01.zip"]
    folders = [make_folder(rng, name, rng.choice(places), fault_rate) for name in names]
    if all_bad:
        for folder in folders:
            folder.failure = bad(MISSING_INSTRUCTION)
            folder.files.pop("prompt.json", None)
    for folder in folders:
        if folder.place == "loose":
            write_loose(root, folder)
    (root / "thumbs").mkdir()  # not a prompt folder
    (root / "README.txt").write_text("not a prompt folder")
    repeat = rng.choice(folders)  # the same folder id again, later: ignored
    shadow = Folder(repeat.name, "", GOOD, GOOD, None, {}, {})
    shadow.files = {"prompt.json": b'{"edit": "shadow"}', "9_0.jpg": plain_image(rng)}
    shadow.files["9_1.png"] = plain_image(rng)
    for place in ("shard-00.zip", "shard-01.zip"):  # loose folders come first, then zips by name
        inside = [f for f in folders if f.place == place]
        if place > repeat.place and rng.random() < 0.5:
            inside.append(shadow)
        if inside:
            write_zip(root / place, inside, rng)
        if inside and inside != [shadow] and rng.random() < 0.5:
            target = rng.choice([f for f in inside if f is not shadow])
            corrupt_zip_member(root / place, target, rng)
    taken = {f.name: (f, sorted(f.sides)) for f in folders}
    if rng.random() < 0.4:
        taken = write_seeds_json(root, folders, rng)
    records = [r for folder, seeds in taken.values() for r in folder_records(folder, seeds)]
    return Source(
        [root],
        records,
        row_key=lambda row: (row["folder"], row["seed"]),
        rejected_key=lambda entry: (entry["folder"], entry["seed"]),
    )


def write_seeds_json(root: Path, folders: list[Folder], rng: random.Random) -> dict:
    """seeds.json for some folders (others are skipped), with seeds and folders that do not
    exist, and a folder listed twice; the folders taken and their seeds."""
    listed = rng.sample(folders, rng.randint(1, len(folders)))
    ghost = Folder("0000001", "", bad(MISSING_IMAGE), GOOD, None, {}, {})
    entries, taken = [], {}
    for folder in listed + [ghost] * (rng.random() < 0.5):
        seeds = [s for s in folder.sides if rng.random() < 0.8]
        seeds += [rng.randrange(10**6, 2 * 10**6)] * (rng.random() < 0.3)  # not in the folder
        taken[folder.name] = (folder, sorted(set(seeds)))
        written = [str(s) if rng.random() < 0.2 else s for s in seeds]
        if len(written) > 1 and rng.random() < 0.3:  # the same folder in two entries
            entries += [[folder.name, written[:1]], [folder.name, written[1:]]]
        else:
            entries.append([folder.name, written])
    rng.shuffle(entries)
    (root / "seeds.json").write_text(json.dumps(entries))
    return taken


# ---------------------------------------------------------------- the checks

BUILDERS = {
    "ip2p": build_ip2p,
    "json_manifest": build_json_manifest,
    "csv_manifest": build_csv_manifest,
    "hf": build_hf,
}
CASES = [(layout, seed, False) for layout in BUILDERS for seed in range(ROUNDS)]
CASES += [(layout, 10_000, True) for layout in BUILDERS]  # nothing convertible: exit 2


def check_exit_2(source: Source, err: str, dst: Path) -> None:
    assert all(r.part.outcome != OK for r in source.records), "a good record was not written"
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    if "records were rejected" in errors[0]:
        assert f"all {len(source.records)} records were rejected" in errors[0]
    assert not dst.exists()


def check_output(source: Source, dst: Path) -> None:
    counts = report(dst)
    assert counts["records_found"] == counts["rows_written"] + counts["rejected"]
    assert counts["records_found"] == len(source.records), "records lost or invented"
    dataset = load(dst)
    assert len(dataset) == counts["rows_written"]
    entries = rejected(dst)
    assert len(entries) == counts["rejected"]
    assert all(e["reason"] in REASONS and e["detail"] for e in entries)

    written = {source.row_key(row): row for row in raw_rows(dst)}
    refused = {source.rejected_key(entry): entry for entry in entries}
    expected = {record.key: record for record in source.records}
    assert len(expected) == len(source.records), "generator bug: two records with one key"
    assert len(written) == len(dataset) and len(refused) == len(entries), "a record twice"
    assert set(written) | set(refused) == set(expected) and not set(written) & set(refused)
    for key, record in expected.items():
        if record.part.outcome == OK:
            assert key in written, f"good record {key} not written: {refused.get(key)}"
        if record.part.outcome == REJECT:
            assert key in refused, f"bad record {key} written"
        if key in written and record.text is not None:
            assert written[key]["edit_prompt"] == record.text, key
        if key in refused:
            assert refused[key]["reason"] in record.part.reasons, (key, refused[key])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PIL's notes on damaged, skippable EXIF
        for row in dataset:
            assert row["input_image"].mode == "RGB" and row["edited_image"].mode == "RGB"


@pytest.mark.parametrize(
    "layout,seed,all_bad", CASES, ids=[f"{c[0]}-{c[1]}{'-all_bad' * c[2]}" for c in CASES]
)
def test_converter_never_crashes_and_never_loses_a_record(
    tmp_path, capsys, layout, seed, all_bad
):
    rng = random.Random(f"{layout}-{seed}")
    source = BUILDERS[layout](tmp_path, rng, all_bad)
    dst = tmp_path / "out"
    extra = ["--num_proc", "2"] if (layout, seed) == ("json_manifest", 0) else []
    capsys.readouterr()
    code = run("--data_dir", *source.args, "--output_dir", dst, *extra)
    err = capsys.readouterr().err
    assert code in (0, 2)
    if all_bad:
        assert code == 2
    if code == 2:
        check_exit_2(source, err, dst)
    else:
        check_output(source, dst)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
