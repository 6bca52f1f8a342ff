"""The output folder: built in a temp folder beside it, published by one rename, or not at all.

    DST/
      data-00000-of-000NN.arrow ...   the rows (Arrow IPC streams, what save_to_disk writes)
      dataset_info.json, state.json   what datasets.load_from_disk reads
      content_fingerprint.json        the rows' content fingerprint (ip2p.fingerprint), with the
                                      data files' sizes and times, for the latent cache's key
      rejected.jsonl                  one line per rejected source record
    (with --val_fraction: DST/train/ and DST/validation/ each hold data files and metadata, and
    DST/dataset_dict.json lists them; rejected.jsonl and the report stay at the top)
      conversion_report.json          counts, reasons, time, pairs/s

The shard files are written by the workers directly into the temp folder; the two metadata files
come from datasets itself (saving an empty dataset with the same features), with the list of data
files filled in, so no row is ever copied a second time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ip2p.errors import UserError
from ip2p.fingerprint import combine, write_content_record


def temp_path(dst: Path, kind: str = "tmp") -> Path:
    return dst.parent / f".{dst.name}.{kind}-{os.getpid()}"


def check_destination(dst: Path, src: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise UserError(
            f"--output_dir {dst} already exists; pass --overwrite to replace it (done only "
            "once the new dataset is complete) or choose another folder"
        )
    src = src.absolute()
    if dst == src or dst in src.parents:
        raise UserError(
            f"--output_dir {dst} is or holds the --data_dir {src}; choose another folder"
        )


@contextlib.contextmanager
def staged_output(dst: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh temp folder beside `dst`, renamed to `dst` if the block succeeds, removed if not."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_path(dst)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        publish(staging, dst, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(staging: Path, dst: Path, overwrite: bool) -> None:
    """Rename `staging` to `dst`; an existing `dst` (--overwrite) is removed only afterwards."""
    old = None
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise UserError(f"--output_dir {dst} appeared while converting; nothing was replaced")
        old = temp_path(dst, "old")
        dst.rename(old)
    try:
        staging.rename(dst)
    except BaseException:
        if old is not None:
            old.rename(dst)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def name_data_files(staging: Path, results: list, split: str = "") -> list[str]:
    """Move the non-empty shard files to data-IIIII-of-NNNNN.arrow, in shard order.

    `split` "validation" takes the shards' held-out files instead of their training ones.
    """
    rows, path = ("val_rows", "val_path") if split == "validation" else ("rows", "data_path")
    filled = [r for r in sorted(results, key=lambda r: r.index) if getattr(r, rows) > 0]
    names = []
    for i, result in enumerate(filled):
        names.append(f"data-{i:05d}-of-{len(filled):05d}.arrow")
        os.replace(getattr(result, path), staging / names[-1])
    return names


def write_split_dict(staging: Path, splits: list[str]) -> None:
    """dataset_dict.json: what makes load_from_disk return a DatasetDict of the sub-folders."""
    (staging / "dataset_dict.json").write_text(json.dumps({"splits": splits}))


def split_fingerprint(results: list, split: str = "") -> tuple[str, int]:
    """The content fingerprint of one split (ip2p.fingerprint) from the shards' row digests, in
    the order of the rows in the data files; and the number of rows."""
    digests = b"".join(r.val_digests if split == "validation" else r.digests
                       for r in sorted(results, key=lambda r: r.index))
    return combine(digests), len(digests) // 32


def write_dataset_metadata(
    staging: Path, scratch: Path, data_files: list[str], features, source: str, results: list,
    split: str = "",
) -> str:
    """dataset_info.json and state.json as datasets writes them, listing our data files, and the
    record of the split's content fingerprint (CONTENT_FILE); returns the fingerprint.

    state.json's `_fingerprint` becomes the content's too: the template's depends on the features
    and the path only, so datasets would give a reconverted folder with changed rows the same one.
    """
    from ip2p.convert.hf_source import quiet_datasets

    with quiet_datasets() as datasets:
        info = datasets.DatasetInfo(
            description=f"InstructPix2Pix edit pairs converted from {source}", features=features
        )
        empty = datasets.Dataset.from_dict(
            {name: [] for name in features}, features=features, info=info
        )
        empty.save_to_disk(str(scratch / "template"))
    shutil.copyfile(scratch / "template" / "dataset_info.json", staging / "dataset_info.json")
    state = json.loads((scratch / "template" / "state.json").read_text())
    state["_data_files"] = [{"filename": name} for name in data_files]
    fingerprint, rows = split_fingerprint(results, split)
    state["_fingerprint"] = fingerprint[:16]
    (staging / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    write_content_record(staging, data_files, fingerprint, rows)
    return fingerprint


def merge_rejected(results: list, out: Path) -> int:
    """Concatenate the shards' rejected parts in shard order; the number of lines written."""
    lines = 0
    with open(out, "w", encoding="utf-8") as merged:
        for result in sorted(results, key=lambda r: r.index):
            with open(result.rejected_path, encoding="utf-8") as part:
                for line in part:
                    merged.write(line)
                    lines += 1
    return lines


def rows_on_disk(staging: Path) -> int:
    """Rows as datasets.load_from_disk sees them (memory-mapped, cheap): the real check."""
    from ip2p.convert.hf_source import quiet_datasets

    with quiet_datasets() as datasets:
        loaded = datasets.load_from_disk(str(staging))
        rows = loaded.num_rows
        return sum(rows.values()) if isinstance(rows, dict) else rows
