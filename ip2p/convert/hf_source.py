"""Existing Hugging Face datasets: a save_to_disk folder, parquet files, or what load_dataset reads.

The main process only learns the schema and the row counts; each worker reads its rows straight
from the Arrow (memory-mapped) or parquet files in small batches, so nothing is held whole and
nothing is copied into a cache first. Image columns may be Image features ({"bytes", "path"}),
path strings or raw bytes. A DatasetDict converts its `train` split unless --split names another.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ip2p.convert.columns import FLAGS, extra_columns, resolve_columns
from ip2p.convert.options import Plan, shard_size
from ip2p.convert.records import ImageRef, Record
from ip2p.errors import UserError

ROWS_PER_SHARD = 1000
BATCH_ROWS = 16
IMAGE_DTYPES = ("string", "large_string", "binary", "large_binary")


@contextlib.contextmanager
def quiet_datasets():
    """No datasets progress bars or info logs while reading sources (restored afterwards)."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars_were_off = datasets.are_progress_bars_disabled()
    verbosity = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.ERROR)
    try:
        yield datasets
    finally:
        ds_logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def parquet_splits(path: Path) -> dict[str, list[str]]:
    """Split name -> parquet files, named the way load_dataset would split them."""
    if path.is_file():
        return {"train": [str(path)]} if path.suffix == ".parquet" else {}
    if not path.is_dir():
        return {}
    from datasets.data_files import get_data_patterns, resolve_pattern

    try:
        patterns = get_data_patterns(str(path))
    except Exception:  # noqa: BLE001 - datasets raises EmptyDatasetError when nothing matches
        return {}
    splits = {}
    for split, globs in patterns.items():
        files = sorted(
            {f for g in globs for f in _matches(resolve_pattern, g, path) if f.endswith(".parquet")}
        )
        if files:
            splits[str(split)] = files
    return splits


def _matches(resolve_pattern, pattern: str, base: Path) -> list[str]:
    try:
        return resolve_pattern(pattern, str(base))
    except FileNotFoundError:  # a split pattern that matches no file
        return []


def pick_split(splits: list[str], wanted: str | None, where: str) -> str:
    name = wanted or "train"
    if name in splits:
        return name
    raise UserError(
        f"{where} has no split '{name}'; its splits are: {', '.join(splits)}; "
        "choose one with --split NAME"
    )


def open_source(path: Path, split: str | None, work_dir: Path):
    """(features, [(format, file, row group or None, rows)], description) of the split."""
    splits = {} if is_saved_dataset(path) else parquet_splits(path)
    if splits:
        files = splits[pick_split(list(splits), split, str(path))]
        return _parquet_blocks(files) + (f"parquet files in {path}",)
    with quiet_datasets() as datasets:
        dataset = _load(datasets, path, split, work_dir)
    files = [c["filename"] for c in dataset.cache_files]
    if not files:
        raise UserError(
            f"{path} was loaded in memory, not from Arrow files; unset "
            "HF_DATASETS_IN_MEMORY_MAX_SIZE and retry"
        )
    blocks = [("arrow", f, None, _arrow_table(f).num_rows) for f in files]
    return dataset.features, blocks, f"datasets {path}"


@contextlib.contextmanager
def offline():
    """load_dataset never touches the network here (the flags are read at import, so set both)."""
    import datasets
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _load(datasets, path: Path, split: str | None, work_dir: Path):
    if is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
    else:
        try:
            # a local folder is prepared inside the temp folder (removed at the end); a hub id is
            # looked up in the user's datasets cache, where an earlier load_dataset put it
            cache = str(work_dir / "hf-cache") if path.exists() else None
            with offline():
                loaded = datasets.load_dataset(str(path), cache_dir=cache)
        except Exception as e:  # noqa: BLE001 - any failure here means the source is not readable
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(
                f"datasets.load_dataset cannot read {path} offline ({type(e).__name__}: "
                f"{first[:200]})"
            ) from None
    if isinstance(loaded, datasets.Dataset):
        if split is not None:
            raise UserError(f"{path} is a single dataset without splits; drop --split")
        return loaded
    return loaded[pick_split(list(loaded), split, str(path))]


def _parquet_blocks(files: list[str]):
    import datasets

    features = datasets.Features.from_arrow_schema(_parquet_meta(files[0]).schema.to_arrow_schema())
    blocks = []
    for f in files:
        meta = _parquet_meta(f)
        if meta.schema.to_arrow_schema().names != list(features):
            raise UserError(f"{f} has other columns than {files[0]}; convert them separately")
        blocks += [
            ("parquet", f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)
        ]
    return features, blocks


def _parquet_meta(path: str):
    try:
        return pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as e:
        reason = " ".join(str(e).split())
        raise UserError(
            f"{path} is not a readable parquet file ({reason}); re-download it"
        ) from None


def _arrow_table(path: str) -> pa.Table:
    source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source).read_all()


def check_image_column(features, column: str, out: str) -> None:
    import datasets

    feature = features[column]
    if isinstance(feature, datasets.Image):
        return
    if isinstance(feature, datasets.Value) and feature.dtype in IMAGE_DTYPES:
        return
    raise UserError(
        f"column '{column}' ({FLAGS[out]}) holds {feature}, not images (an Image "
        "feature, paths or bytes); name the image column with the flag"
    )


def pieces(blocks: list, size: int, limit: int | None) -> tuple[list[list[dict]], int]:
    """Shards of row ranges (arrow) or row groups (parquet) of about `size` rows; the total."""
    shards, current, filled, row = [], [], 0, 0
    for fmt, file, group, rows in blocks:
        rows = rows if limit is None else min(rows, limit - row)
        if rows <= 0:
            break
        step = size if fmt == "arrow" else rows
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            current.append(
                {
                    "format": fmt,
                    "file": file,
                    "group": group,
                    "start": start,
                    "stop": stop,
                    "row": row + start,
                }
            )
            filled += stop - start
            if filled >= size:
                shards.append(current)
                current, filled = [], 0
        row += rows
    if current:
        shards.append(current)
    return shards, row


def plan(
    path: Path,
    flags: dict,
    split: str | None,
    work_dir: Path,
    num_proc: int,
    max_samples: int | None,
) -> Plan:
    features, blocks, description = open_source(path, split, work_dir)
    mapping = resolve_columns(list(features), flags, description)
    for out in ("input_image", "edited_image"):
        check_image_column(features, mapping[out], out)
    available = sum(block[3] for block in blocks)
    wanted = available if max_samples is None else min(max_samples, available)
    if wanted == 0:
        raise UserError(f"{description} has no rows: nothing to convert")
    shards, total = pieces(blocks, shard_size(wanted, num_proc, ROWS_PER_SHARD), max_samples)
    extras = extra_columns(list(features), mapping)
    root = str(path.absolute()) if path.exists() else os.getcwd()
    common = {"layout": "hf", "root": root, "columns": mapping, "extras": extras}
    return Plan(
        layout="hf",
        source=description,
        payloads=[{**common, "pieces": shard} for shard in shards],
        extra_features={out: features[src] for src, out in extras.items()},
        expected_records=total,
        columns=mapping,
    )


def iter_rows(piece: dict) -> Iterator[dict]:
    """The piece's rows as dicts; a file pyarrow cannot read is the user's to fix."""
    try:
        yield from _rows(piece)
    except (pa.ArrowException, OSError) as e:
        reason = " ".join(str(e).split())
        raise UserError(f"{piece['file']}: cannot read rows ({reason}); re-download it") from None


def _rows(piece: dict) -> Iterator[dict]:
    if piece["format"] == "parquet":
        batches = pq.ParquetFile(piece["file"]).iter_batches(
            BATCH_ROWS, row_groups=[piece["group"]]
        )
    else:
        table = _arrow_table(piece["file"])
        batches = table.slice(piece["start"], piece["stop"] - piece["start"]).to_batches(BATCH_ROWS)
    wanted = piece["stop"] - piece["start"]
    for batch in batches:
        for row in batch.to_pylist():
            if wanted == 0:
                return
            wanted -= 1
            yield row


def image_ref(value: object, root: str, column: str) -> ImageRef:
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return ImageRef("bytes", data=data, label=path)
        value = path
    if isinstance(value, (bytes, bytearray)):
        return ImageRef("bytes", data=bytes(value))
    if isinstance(value, str) and value:
        return ImageRef("file", location=os.path.join(root, value), label=value)
    return ImageRef("absent", label=f"no image in column '{column}'")


def _file_label(path: str, root: str) -> str:
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else os.path.basename(path)


def iter_records(payload: dict, _zips=None) -> Iterator[Record]:
    columns, root, extras = payload["columns"], payload["root"], payload["extras"]
    for piece in payload["pieces"]:
        origin = {"file": _file_label(piece["file"], root)}
        for index, row in enumerate(iter_rows(piece), start=piece["row"]):
            yield Record(
                {**origin, "row": index},
                input_image=image_ref(
                    row.get(columns["input_image"]), root, columns["input_image"]
                ),
                instruction=row.get(columns["edit_prompt"]),
                edited_image=image_ref(
                    row.get(columns["edited_image"]), root, columns["edited_image"]
                ),
                extras={out: row.get(src) for src, out in extras.items()},
            )
