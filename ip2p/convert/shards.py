"""One shard of the work, run in a worker process (or in-process with --num_proc 1).

A shard reads its records, checks each one (full image decode) and streams the good ones into
its own Arrow file in small record batches; the rejected ones go, one JSON line each, into its own
rejected part file. Memory per worker is one batch (at most FLUSH_ROWS rows or FLUSH_BYTES of
image bytes), whatever the size of the input.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import pyarrow as pa

from ip2p.convert import hf_source, ip2p_folders, manifest
from ip2p.convert.records import Record, Rejection
from ip2p.convert.record_check import ZipCache, check_record
from ip2p.fingerprint import row_digest

READERS = {
    "ip2p": ip2p_folders.iter_records,
    "manifest": manifest.iter_records,
    "hf": hf_source.iter_records,
}
FLUSH_ROWS = 64
FLUSH_BYTES = 64 << 20
PROGRESS_EVERY = 8


@dataclass
class ShardJob:
    index: int
    payload: dict
    schema: pa.Schema
    data_path: str
    rejected_path: str
    val_fraction: float = 0.0  # --val_fraction: this share of the good rows goes to val_path
    val_seed: int = 0
    val_path: str = ""


@dataclass
class ShardResult:
    index: int
    data_path: str
    rejected_path: str
    val_path: str = ""
    records: int = 0
    rows: int = 0
    val_rows: int = 0
    rejected: Counter = field(default_factory=Counter)
    reencoded: Counter = field(default_factory=Counter)  # source mode -> images stored as RGB PNG
    digests: bytes = b""  # ip2p.fingerprint.row_digest of each row written, in order
    val_digests: bytes = b""


class ArrowShardWriter:
    """Rows -> an Arrow IPC stream file (what load_from_disk memory-maps), a batch at a time."""

    def __init__(self, path: str, schema: pa.Schema):
        self.path, self.schema = path, schema
        self.pending: list[dict] = []
        self.pending_bytes = 0
        self.rows = 0
        self.digests = bytearray()  # what the latent cache's key is made of (ip2p.fingerprint)
        self._writer = None

    def add(self, row: dict, nbytes: int) -> None:
        self.pending.append(row)
        self.digests += row_digest(row["input_image"]["bytes"], row["edit_prompt"], row["edited_image"]["bytes"])
        self.pending_bytes += nbytes
        if len(self.pending) >= FLUSH_ROWS or self.pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        batch = pa.RecordBatch.from_pylist(self.pending, schema=self.schema)
        if self._writer is None:
            self._writer = pa.ipc.new_stream(self.path, self.schema)
        self._writer.write_batch(batch)
        self.rows += len(self.pending)
        self.pending, self.pending_bytes = [], 0

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()


_worker_progress = None  # set in pool workers by init_worker


def init_worker(counter) -> None:
    """Pool initializer: report progress through a shared counter the main process polls."""
    global _worker_progress
    _worker_progress = partial(_add_to, counter)


def _add_to(counter, n: int) -> None:
    with counter.get_lock():
        counter.value += n


def held_out(origin: dict, seed: int, fraction: float) -> bool:
    """Whether a record goes to the validation split: a hash of where it came from, so the
    split is the same whatever the number of processes, shards or records around it."""
    key = json.dumps(origin, sort_keys=True, ensure_ascii=True, default=str) + f"/{seed}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 < fraction


def convert_shard(job: ShardJob, progress=None) -> ShardResult:
    progress = progress or _worker_progress or (lambda n: None)
    result = ShardResult(job.index, job.data_path, job.rejected_path, job.val_path)
    writer, zips = ArrowShardWriter(job.data_path, job.schema), ZipCache()
    val_writer = ArrowShardWriter(job.val_path, job.schema) if job.val_fraction > 0 else None
    try:
        with open(job.rejected_path, "w", encoding="utf-8") as rejected:
            for record in READERS[job.payload["layout"]](job.payload, zips):
                held = val_writer is not None and held_out(record.origin, job.val_seed, job.val_fraction)
                convert_record(record, zips, val_writer if held else writer, rejected, result)
                if result.records % PROGRESS_EVERY == 0:
                    progress(PROGRESS_EVERY)
        writer.close()
        if val_writer is not None:
            val_writer.close()
    finally:
        zips.close()
    progress(result.records % PROGRESS_EVERY)
    result.rows, result.val_rows = writer.rows, val_writer.rows if val_writer is not None else 0
    result.digests = bytes(writer.digests)
    result.val_digests = bytes(val_writer.digests) if val_writer is not None else b""
    if result.records != result.rows + result.val_rows + sum(result.rejected.values()):
        raise RuntimeError(
            f"internal error: shard {job.index} saw {result.records} records but wrote "
            f"{result.rows} + {result.val_rows} rows and {sum(result.rejected.values())} rejections"
        )
    return result


def convert_record(
    record: Record, zips: ZipCache, writer: ArrowShardWriter, rejected, result
) -> None:
    result.records += 1
    try:
        row, modes = check_record(record, zips)
    except Rejection as r:
        rejected.write(json.dumps(r.as_json(record.origin), ensure_ascii=False) + "\n")
        result.rejected[r.reason] += 1
        return
    result.reencoded.update(modes)
    row.update(record.extras)
    writer.add(row, len(row["input_image"]["bytes"]) + len(row["edited_image"]["bytes"]))
