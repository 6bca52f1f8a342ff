"""Manifests: .jsonl, .json (one list of objects), .csv or .tsv, one record per pair.

Image paths are relative to the manifest's folder, or absolute. The main process streams the
manifest twice (count and type the columns, then cut it into work chunks of normalised JSON lines
in the temp folder), so memory stays flat however long it is; a .json list is the exception, since
it must be parsed whole (use .jsonl for millions of records). Workers read one chunk each.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from ip2p.convert.columns import LONE_SURROGATE, TypeTally, coerce, extra_columns, resolve_columns
from ip2p.convert.options import Plan, shard_size
from ip2p.convert.records import UNPARSEABLE_RECORD, ImageRef, Record
from ip2p.errors import UserError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
NOT_MANIFESTS = {
    "seeds.json",
    "dataset_info.json",
    "state.json",
    "dataset_dict.json",
    "conversion_report.json",
    "rejected.jsonl",
    "prompt.json",
}
RECORDS_PER_SHARD = 1000

Row = tuple[dict, "dict | None", "str | None"]  # origin, record, parse error


def find_manifest(path: Path) -> Path | None:
    """The manifest file `path` is or holds (top level only); None if there is none."""
    if path.is_file():
        return path if path.suffix.lower() in SUFFIXES else None
    if not path.is_dir():
        return None
    found = sorted(
        p
        for p in path.iterdir()
        if p.is_file()
        and p.suffix.lower() in SUFFIXES
        and p.name not in NOT_MANIFESTS
        and not p.name.startswith(".")
    )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UserError(
            f"{path} holds several manifests ({names}); pass the one to convert as --data_dir"
        )
    return found[0] if found else None


def iter_rows(path: Path) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _iter_jsonl(path)
    if suffix == ".json":
        return _iter_json_list(path)
    return _iter_delimited(path, "\t" if suffix == ".tsv" else ",")


def _as_row(origin: dict, value: object) -> Row:
    if isinstance(value, dict):
        return origin, value, None
    return origin, None, f"a JSON {type(value).__name__}, expected an object"


def _iter_jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            raw = raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError) as e:  # bad JSON or UTF-8; absurdly deep nesting
                yield {"line": number}, None, f"not valid JSON: {e}"
                continue
            yield _as_row({"line": number}, value)


def _iter_json_list(path: Path) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); a "
            ".json manifest is one list of objects (one object per line: name it .jsonl)"
        )
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise UserError(f"{path} nests JSON deeper than Python can parse; fix the file") from None
    if not isinstance(data, list):
        raise UserError(
            f"{path} holds a JSON {type(data).__name__}; a .json manifest must be a list of objects"
        )
    for index, value in enumerate(data):
        yield _as_row({"index": index}, value)


def _iter_delimited(path: Path, delimiter: str) -> Iterator[Row]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            previous = reader.line_num
            for fields in reader:
                origin, previous = {"line": previous + 1}, reader.line_num
                if not fields:
                    continue
                if len(fields) != len(header):
                    yield origin, None, f"{len(fields)} fields where the header has {len(header)}"
                else:
                    yield origin, dict(zip(header, fields)), None
        except UnicodeDecodeError as e:
            raise UserError(
                f"{path} is not UTF-8 text (near line {reader.line_num + 1}: {e.reason})"
            )
        except csv.Error as e:
            raise UserError(f"{path} line {reader.line_num}: cannot parse: {e}") from None


def csv_header(path: Path) -> list[str]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        return next(csv.reader(f, delimiter=delimiter), [])


def survey(path: Path, max_samples: int | None) -> tuple[int, list[str], TypeTally]:
    """First pass: how many records, which columns (first-seen order), which value types."""
    count, keys, tally = 0, {}, TypeTally()
    for _, record, _ in islice(iter_rows(path), max_samples):
        count += 1
        if record is not None:
            keys.update(dict.fromkeys(record))
            tally.observe(record)
    if path.suffix.lower() in (".csv", ".tsv"):
        keys = dict.fromkeys(csv_header(path))
    return count, list(keys), tally


def write_chunks(path: Path, work_dir: Path, size: int, max_samples: int | None) -> list[Path]:
    """Second pass: the records as normalised JSON lines, `size` per chunk file."""
    rows = islice(iter_rows(path), max_samples)
    chunks: list[Path] = []
    while batch := list(islice(rows, size)):
        chunks.append(work_dir / f"manifest-{len(chunks):05d}.jsonl")
        with open(chunks[-1], "wb") as out:
            for origin, record, error in batch:
                out.write(chunk_line(origin, record, error))
    return chunks


def chunk_line(origin: dict, record: dict | None, error: str | None) -> bytes:
    """One normalised JSON line. A record holding a lone surrogate (a \\ud800 escape: valid JSON,
    not valid UTF-8) becomes an unparseable one here, where it would otherwise crash the run."""
    item = {"o": origin, "e": error} if record is None else {"o": origin, "r": record}
    try:
        return (json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return chunk_line(origin, None, f"the record {LONE_SURROGATE}")


def plan(
    manifest: Path, flags: dict, work_dir: Path, num_proc: int, max_samples: int | None
) -> Plan:
    import datasets

    count, available, tally = survey(manifest, max_samples)
    if count == 0:
        raise UserError(f"no records in {manifest}: nothing to convert")
    mapping = resolve_columns(available, flags, f"manifest {manifest}")
    is_csv = manifest.suffix.lower() in (".csv", ".tsv")
    extras = {
        src: [out, "string" if is_csv else tally.column_type(src)]
        for src, out in extra_columns(available, mapping).items()
    }
    chunks = write_chunks(
        manifest, work_dir, shard_size(count, num_proc, RECORDS_PER_SHARD), max_samples
    )
    common = {
        "layout": "manifest",
        "root": str(manifest.parent.absolute()),
        "file": manifest.name,
        "columns": mapping,
        "extras": extras,
    }
    return Plan(
        layout="manifest",
        source=str(manifest),
        payloads=[{**common, "chunk": str(chunk)} for chunk in chunks],
        extra_features={out: datasets.Value(dtype) for out, dtype in extras.values()},
        expected_records=count,
        columns=mapping,
    )


def image_ref(value: object, root: str, column: str) -> ImageRef:
    if value is None or value == "":
        return ImageRef("absent", label=f"no value in column '{column}'")
    if not isinstance(value, str):
        return ImageRef(
            "absent", label=f"column '{column}' holds a {type(value).__name__}, not a path"
        )
    if "://" in value:
        return ImageRef("absent", label=f"{value}: URLs are not downloaded; give a local path")
    return ImageRef("file", location=os.path.join(root, value), label=value)


def iter_records(payload: dict, _zips=None) -> Iterator[Record]:
    columns, root = payload["columns"], payload["root"]
    with open(payload["chunk"], encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            origin = {"file": payload["file"], **item["o"]}
            if "r" not in item:
                yield Record(origin, failure=(UNPARSEABLE_RECORD, item["e"]))
                continue
            yield _record(origin, item["r"], columns, payload["extras"], root)


def _record(origin: dict, raw: dict, columns: dict, extras: dict, root: str) -> Record:
    return Record(
        origin,
        input_image=image_ref(raw.get(columns["input_image"]), root, columns["input_image"]),
        instruction=raw.get(columns["edit_prompt"]),
        edited_image=image_ref(raw.get(columns["edited_image"]), root, columns["edited_image"]),
        extras={out: coerce(raw.get(src), dtype) for src, (out, dtype) in extras.items()},
    )
