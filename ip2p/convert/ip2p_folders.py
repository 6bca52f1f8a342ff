"""The original InstructPix2Pix release: prompt folders, loose or inside shard-NN.zip files.

A prompt folder has a numeric name (`0000132/`) and holds prompt.json (`edit`, plus `input` or
`caption`, plus `output`) and image pairs `{seed}_0.jpg` (input) and `{seed}_1.jpg` (edited).
An optional seeds.json (`[[folder, [seed, ...]], ...]`) restricts which seeds are taken (a folder
listed twice is taken once, with the seeds of both entries).
Zips are read in place, never extracted.

Every seed pair is one record. A folder with no pair at all is one record too (rejected), so
nothing disappears without a line in rejected.jsonl. Order: loose folders by name, then each zip
(by zip name) by folder name; a folder id seen twice is taken from its first place only.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

from ip2p.convert.columns import LONE_SURROGATE, coerce, holds_lone_surrogate
from ip2p.convert.options import Plan, chunked, shard_size
from ip2p.convert.records import (
    MISSING_IMAGE,
    MISSING_INSTRUCTION,
    UNPARSEABLE_RECORD,
    ImageRef,
    Record,
)
from ip2p.convert.record_check import ZIP_READ_ERRORS, ZipCache
from ip2p.errors import UserError

SEED_FILE = re.compile(r"^(\d+)_([01])\.(jpe?g|png|webp)$", re.IGNORECASE)
EXTENSIONS = ("jpg", "jpeg", "png", "webp", "JPG", "JPEG", "PNG", "WEBP")
FOLDERS_PER_SHARD = 300
COLUMNS = {
    "input_image": "{seed}_0.jpg",
    "edit_prompt": "prompt.json: edit",
    "edited_image": "{seed}_1.jpg",
}


@dataclass(frozen=True)
class Unit:
    """One prompt folder. container: zip path relative to the root, or None for a loose folder.
    path: the folder inside the zip or relative to the root; None when seeds.json names a folder
    that exists nowhere. seeds: None until listed (loose folders are listed by the worker)."""

    folder: str
    container: str | None
    path: str | None
    seeds: tuple[int, ...] | None

    @property
    def where(self) -> str:
        if self.path is None:
            return self.folder
        return self.path if self.container is None else f"{self.container}/{self.path}"


def seeds_in(names) -> tuple[int, ...]:
    return tuple(sorted({int(m.group(1)) for m in map(SEED_FILE.match, names) if m}))


def _numeric_dirs(root: Path) -> Iterator[os.DirEntry]:
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.isdigit() and entry.is_dir():
                yield entry


def _zip_has_prompts(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith("/prompt.json") for name in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def looks_like_ip2p(root: Path) -> bool:
    if not root.is_dir():
        return False
    if (root / "seeds.json").is_file():
        return True
    if any(Path(e.path, "prompt.json").is_file() for e in islice(_numeric_dirs(root), 20)):
        return True
    return any(_zip_has_prompts(z) for z in sorted(root.glob("*.zip"))[:2])


def scan_loose(root: Path) -> list[Unit]:
    names = sorted(e.name for e in _numeric_dirs(root))
    return [Unit(name, None, name, None) for name in names]


def scan_zip(root: Path, zip_path: Path) -> list[Unit]:
    """The prompt folders inside one zip, with their seeds, from its central directory."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(
            f"{zip_path} is not a readable zip file ({e}); re-download it or move it out of {root}"
        ) from None
    folders: dict[str, list[str]] = {}
    for name in names:
        parent, _, base = name.rpartition("/")
        if parent.rpartition("/")[2].isdigit() and not name.startswith("__MACOSX"):
            folders.setdefault(parent, []).append(base)
    container = zip_path.name
    return [
        Unit(p.rpartition("/")[2], container, p, seeds_in(b)) for p, b in sorted(folders.items())
    ]


def first_places(units: list[Unit]) -> tuple[list[Unit], int]:
    """Each folder id once, at its first place; and how many repeats were dropped."""
    seen: set[str] = set()
    kept = []
    for unit in units:
        if unit.folder not in seen:
            seen.add(unit.folder)
            kept.append(unit)
    return kept, len(units) - len(kept)


def load_seeds_json(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    try:
        entries = json.loads(path.read_bytes())
    except (ValueError, OSError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise UserError(f"{path} cannot be read as JSON ({e}); fix or remove it") from None
    if not isinstance(entries, list):
        raise UserError(f"{path} must be a list of [folder, [seeds]] entries")
    return merge_seed_entries([_seeds_entry(path, i, entry) for i, entry in enumerate(entries)])


def merge_seed_entries(entries: list) -> list[tuple[str, tuple[int, ...]]]:
    """One entry per folder, its seeds united: a folder listed twice must not be converted twice."""
    merged: dict[str, set[int]] = {}
    for folder, seeds in entries:
        merged.setdefault(folder, set()).update(seeds)
    return [(folder, tuple(sorted(seeds))) for folder, seeds in merged.items()]


def _seeds_entry(path: Path, index: int, entry: object) -> tuple[str, tuple[int, ...]]:
    ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)
    if not ok or not all(str(s).isdigit() for s in entry[1]):
        raise UserError(
            f"{path} entry {index} is {str(entry)[:80]}; expected [folder, [seed, ...]]"
        )
    return str(entry[0]), tuple(sorted({int(s) for s in entry[1]}))


def restrict(units: list[Unit], entries: list) -> tuple[list[Unit], int]:
    """Units for the folders seeds.json lists, with its seeds; and how many folders it skips."""
    place = {u.folder: (i, u) for i, u in enumerate(units)}
    found, missing = [], []
    for folder, seeds in sorted(entries):
        if folder in place:
            index, unit = place[folder]
            found.append((index, replace(unit, seeds=seeds)))
        else:
            missing.append(Unit(folder, None, None, seeds))
    kept = [u for _, u in sorted(found, key=lambda pair: pair[0])]
    return kept + missing, len(units) - len(found)


def list_seeds(root: Path, unit: Unit) -> tuple[int, ...]:
    try:
        return seeds_in(os.listdir(root / unit.path))
    except OSError:
        return ()


def take_first(units: list[Unit], limit: int, root: Path) -> list[Unit]:
    """The units holding the first `limit` records, the last one cut short."""
    taken, total = [], 0
    for unit in units:
        if total >= limit:
            break
        seeds = unit.seeds if unit.seeds is not None else list_seeds(root, unit)
        seeds = seeds[: limit - total]
        taken.append(replace(unit, seeds=seeds))
        total += max(1, len(seeds))
    return taken


def plan(root: Path, num_proc: int, max_samples: int | None) -> Plan:
    import datasets

    if not root.is_dir():
        raise UserError(
            f"{root} is not a folder; the InstructPix2Pix layout is a folder of prompt "
            "folders and/or shard-NN.zip files"
        )
    units = scan_loose(root) + [u for z in sorted(root.glob("*.zip")) for u in scan_zip(root, z)]
    units, repeats = first_places(units)
    notes = {"duplicate_folders_ignored": repeats}
    if (root / "seeds.json").is_file():
        units, notes["folders_not_in_seeds_json"] = restrict(
            units, load_seeds_json(root / "seeds.json")
        )
    if not units:
        raise UserError(
            f"no prompt folders (numeric names like 0000132/) found in {root} or its zips"
        )
    if max_samples is not None:
        units = take_first(units, max_samples, root)
    known = all(u.seeds is not None for u in units)
    size = shard_size(len(units), num_proc, FOLDERS_PER_SHARD)
    return Plan(
        layout="ip2p",
        source=str(root),
        payloads=[
            {"layout": "ip2p", "root": str(root.absolute()), "units": c}
            for c in chunked(units, size)
        ],
        extra_features={
            "input_caption": datasets.Value("string"),
            "output_caption": datasets.Value("string"),
            "folder": datasets.Value("string"),
            "seed": datasets.Value("int64"),
        },
        expected_records=sum(max(1, len(u.seeds)) for u in units) if known else None,
        columns=COLUMNS,
        notes=notes,
    )


def parse_prompt(raw: bytes | None) -> tuple[dict, tuple[str, str] | None]:
    if raw is None:
        return {}, (MISSING_INSTRUCTION, "no prompt.json in the folder")
    try:
        prompt = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        return {}, (UNPARSEABLE_RECORD, f"prompt.json is not valid JSON: {e}")
    if not isinstance(prompt, dict):
        return {}, (
            UNPARSEABLE_RECORD,
            f"prompt.json holds a JSON {type(prompt).__name__}, not an object",
        )
    if holds_lone_surrogate(prompt):  # Arrow cannot store it: the shard writer would raise
        return {}, (UNPARSEABLE_RECORD, f"prompt.json {LONE_SURROGATE}")
    return prompt, None


class FolderView:
    """Names and bytes inside one prompt folder, loose or zipped."""

    def __init__(self, root: str, unit: Unit, zips: ZipCache):
        self.unit, self.zip = unit, None
        if unit.container is not None:
            self.zip_path = os.path.join(root, unit.container)
            self.zip = zips.get(self.zip_path)
            self.names = None
        else:
            self.dir = os.path.join(root, unit.path)
            try:
                self.names = set(os.listdir(self.dir))
            except OSError:
                self.names = set()

    def has(self, name: str) -> bool:
        if self.zip is None:
            return name in self.names
        try:
            self.zip.getinfo(f"{self.unit.path}/{name}")
            return True
        except KeyError:
            return False

    def read(self, name: str) -> bytes | None:
        if not self.has(name):
            return None
        if self.zip is None:
            with open(os.path.join(self.dir, name), "rb") as f:
                return f.read()
        return self.zip.read(f"{self.unit.path}/{name}")

    def image(self, seed: int, side: int) -> ImageRef:
        name = next(
            (f"{seed}_{side}.{ext}" for ext in EXTENSIONS if self.has(f"{seed}_{side}.{ext}")), None
        )
        if name is None:
            return ImageRef("absent", label=f"{self.unit.where}/{seed}_{side}.jpg not found")
        label = f"{self.unit.where}/{name}"
        if self.zip is None:
            return ImageRef("file", location=os.path.join(self.dir, name), label=label)
        return ImageRef(
            "zip", location=self.zip_path, member=f"{self.unit.path}/{name}", label=label
        )


def iter_records(payload: dict, zips: ZipCache) -> Iterator[Record]:
    for unit in payload["units"]:
        yield from unit_records(payload["root"], unit, zips)


def unit_records(root: str, unit: Unit, zips: ZipCache) -> Iterator[Record]:
    if unit.path is None:
        for seed in unit.seeds or (None,):
            detail = f"folder {unit.folder} is listed in seeds.json but was not found"
            yield Record(_origin(unit, seed), failure=(MISSING_IMAGE, detail))
        return
    view = FolderView(root, unit, zips)
    try:
        prompt, failure = parse_prompt(view.read("prompt.json"))
    except ZIP_READ_ERRORS as e:  # unreadable file, damaged zip member
        prompt, failure = {}, (UNPARSEABLE_RECORD, f"prompt.json cannot be read: {e}")
    seeds = unit.seeds if unit.seeds is not None else seeds_in(view.names)
    if not seeds:
        failure = failure or (MISSING_IMAGE, "no {seed}_0.jpg + {seed}_1.jpg pair in the folder")
        yield Record(_origin(unit, None), failure=failure)
    captions = {
        "input_caption": coerce(prompt.get("input", prompt.get("caption")), "string"),
        "output_caption": coerce(prompt.get("output"), "string"),
    }
    for seed in seeds:
        yield Record(
            _origin(unit, seed),
            input_image=view.image(seed, 0),
            instruction=prompt.get("edit"),
            edited_image=view.image(seed, 1),
            extras={**captions, "folder": unit.folder, "seed": seed},
            failure=failure,
        )


def _origin(unit: Unit, seed: int | None) -> dict:
    return {"file": unit.where, "folder": unit.folder, "seed": seed}
