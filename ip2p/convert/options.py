"""The converter's settings: the fields of ConvertOptions are convert_to_hf_dataset.py's flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ip2p.cli_args import flag

FORMATS = ("auto", "ip2p", "manifest", "hf")


@dataclass
class ConvertOptions:
    """Every flag of `convert_to_hf_dataset.py` (the field name is the flag name)."""

    data_dir: str = field(metadata={"help": "the source: a folder, a manifest file, or (--format hf) "
                                            "a dataset id"})
    output_dir: str = field(metadata={"help": "where the dataset is written; must not exist unless "
                                              "--overwrite"})
    format: str = flag("auto", "source layout (default: detect)", choices=FORMATS)
    # None: the default name or a known alias
    original_image_column: str | None = flag(None, "source column of the input image (default: "
                                                 "input_image or an alias)")
    edit_prompt_column: str | None = flag(None, "source column of the instruction (default: "
                                              "edit_prompt or an alias)")
    edited_image_column: str | None = flag(None, "source column of the edited image (default: "
                                               "edited_image or an alias)")
    split: str | None = flag(None, "HF DatasetDict split to convert (default: train)")
    num_proc: int = flag(1, "worker processes that read and check images")
    max_samples: int | None = flag(None, "convert only the first N records (in a stable order)")
    overwrite: bool = flag(False, "replace an existing --output_dir once the new one is complete")
    # > 0: a DatasetDict with train and validation splits
    val_fraction: float = flag(0.0, "set aside this share of the pairs as a 'validation' split (the "
                                  "trainer logs its held-out loss); the output is then a DatasetDict "
                                  "with train and validation")
    val_seed: int = flag(0, "which pairs are held out")

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
