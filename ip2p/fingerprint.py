"""Content fingerprints: what the latent cache is keyed by (shared/DESIGN.md, "Conventions").

A cache entry may be reused only when everything it was computed from is the same, so every
fingerprint here hashes content, never a path or a name that a rewrite keeps:

- a dataset: every row's input-image bytes, instruction and edited-image bytes, in order
  (`row_digest` per row, sha256 over the row digests). datasets' own `_fingerprint` is not that:
  for a folder written through an empty template (as the converter writes state.json) it depends
  on the features and the path only, so a reconverted folder with changed pairs kept it.
  convert_to_hf_dataset.py records the fingerprint of what it wrote (CONTENT_FILE in each split's
  folder, with the data files' sizes and times); the trainer takes it from there when it applies to
  exactly the files it loaded, and computes it from the rows otherwise (any save_to_disk folder, a
  hub dataset, a --max_train_samples subset).
- a frozen encoder: every tensor of its state dict in the dtype it computes in, plus that dtype.
- a tokenizer: every file `save_pretrained` writes for it (vocabulary, merges, settings).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

CONTENT_FILE = "content_fingerprint.json"
CONVERTER_COLUMNS = ("input_image", "edit_prompt", "edited_image")  # what the converter writes


def row_digest(original: bytes, prompt: str, edited: bytes) -> bytes:
    """One edit pair: its two images' stored bytes and its instruction, length-prefixed."""
    h = hashlib.sha256()
    for part in (original, prompt.encode("utf-8"), edited):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def combine(row_digests: bytes) -> str:
    """The dataset's fingerprint from its rows' digests, concatenated in row order."""
    return hashlib.sha256(row_digests).hexdigest()


def _image_bytes(value) -> bytes:
    # An undecoded Image feature is {"bytes", "path"}; the bytes are what the trainer decodes, and
    # a row that only names a file is that file's bytes. A plain path or bytes column works the same.
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        return Path(value).read_bytes()
    return repr(value).encode()


def compute_dataset_fingerprint(ds, columns: tuple[str, str, str], batch_size: int = 256) -> str:
    """Hash the rows themselves (images undecoded): what any dataset gets, subsets included."""
    import datasets

    original_col, prompt_col, edited_col = columns
    rows = ds.select_columns(list(dict.fromkeys(columns)))
    for name in (original_col, edited_col):
        if isinstance(rows.features[name], datasets.Image):
            rows = rows.cast_column(name, datasets.Image(decode=False))
    digests = bytearray()
    for batch in rows.iter(batch_size=batch_size):
        for o, p, e in zip(batch[original_col], batch[prompt_col], batch[edited_col]):
            digests += row_digest(_image_bytes(o), p or "", _image_bytes(e))
    return combine(bytes(digests))


def data_file_stats(folder: Path, names: list[str]) -> list[dict]:
    stats = []
    for name in names:
        st = (folder / name).stat()
        stats.append({"filename": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return stats


def write_content_record(folder: Path, data_files: list[str], fingerprint: str, num_rows: int) -> None:
    """The converter's record of what it wrote into `folder` (one split)."""
    record = {"fingerprint": fingerprint, "num_rows": num_rows, "columns": list(CONVERTER_COLUMNS),
              "rows": "sha256 over each row's sha256 of (input image bytes, instruction, edited image bytes)",
              "data_files": data_file_stats(folder, data_files)}
    (folder / CONTENT_FILE).write_text(json.dumps(record, indent=1) + "\n")


def recorded_dataset_fingerprint(ds, columns: tuple[str, str, str]) -> str | None:
    """The converter's recorded fingerprint, if it describes exactly the rows of `ds`: the whole
    split (no subset, no reordering), the converter's columns, and data files of the recorded size
    and modification time (a rewrite of the folder by anything else changes them)."""
    if ds._indices is not None or tuple(columns) != CONVERTER_COLUMNS or not ds.cache_files:
        return None
    files = [Path(f["filename"]) for f in ds.cache_files]
    folder = files[0].parent
    record_path = folder / CONTENT_FILE
    if any(f.parent != folder for f in files) or not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        same = (record["num_rows"] == len(ds) and record["columns"] == list(CONVERTER_COLUMNS)
                and record["data_files"] == data_file_stats(folder, [f.name for f in files]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record["fingerprint"] if same else None


def dataset_fingerprint(ds, columns: tuple[str, str, str], log=print) -> str:
    """The content fingerprint of the training rows: recorded by the converter, or computed."""
    recorded = recorded_dataset_fingerprint(ds, columns)
    if recorded is not None:
        log(f"dataset content fingerprint {recorded[:12]}: recorded by convert_to_hf_dataset.py")
        return recorded
    start = time.perf_counter()
    fingerprint = compute_dataset_fingerprint(ds, columns)
    log(f"dataset content fingerprint {fingerprint[:12]}: computed from {len(ds)} rows in "
        f"{time.perf_counter() - start:.1f} s")
    return fingerprint


def module_fingerprint(module) -> str:
    """Every tensor of the state dict, bytes as held (so an fp16 and an fp32 copy differ)."""
    import torch  # here, not at the top: the converter imports this module, and its --help must be fast

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # numpy has no bf16; bytes are bytes
    return h.hexdigest()[:20]


def tokenizer_fingerprint(tokenizer) -> str:
    """The files that define the tokenizer, as transformers writes them."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                h.update(path.relative_to(tmp).as_posix().encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:20]
