"""The converter's settings: what the CLI flags resolve to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("auto", "ip2p", "manifest", "hf")


@dataclass
class ConvertOptions:
    data_dir: str
    output_dir: str
    format: str = "auto"
    original_image_column: str | None = None  # None: the default name or a known alias
    edit_prompt_column: str | None = None
    edited_image_column: str | None = None
    split: str | None = None  # HF sources only; None: "train"
    num_proc: int = 1
    max_samples: int | None = None
    overwrite: bool = False
    val_fraction: float = 0.0  # > 0: a DatasetDict with train and validation splits
    val_seed: int = 0

    def column_flags(self) -> dict[str, str | None]:
        """Requested source column per output column (None where the user gave no flag)."""
        return {
            "input_image": self.original_image_column,
            "edit_prompt": self.edit_prompt_column,
            "edited_image": self.edited_image_column,
        }

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().absolute()


def shard_size(num_items: int, num_proc: int, cap: int) -> int:
    """Items per shard: about 4 shards per process (load balance), at most `cap` (memory, files)."""
    per = -(-num_items // max(1, 4 * num_proc))
    return max(1, min(cap, per))


def chunked(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@dataclass
class Plan:
    """What a layout reader found, before any image is read: the work, split into shards.

    payloads: one small picklable dict per shard, read back by the layout's `iter_records`.
    extra_features: output name -> datasets feature of every kept extra column.
    expected_records: the records the shards will yield, where known in advance.
    """

    layout: str
    source: str
    payloads: list[dict]
    extra_features: dict
    expected_records: int | None
    columns: dict[str, str] | None = None
    notes: dict = field(default_factory=dict)
