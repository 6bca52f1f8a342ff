"""What the layout readers hand to the shard writer: one source record and its image references.

A record is one candidate (input image, instruction, edited image) triple. The readers never open
images; they only say where the bytes live (`ImageRef`). Validation happens later, in the worker
process that writes the record's shard (`ip2p.convert.record_check`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Reason codes written to rejected.jsonl. Stable: users grep for them.
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
EMPTY_IMAGE = "empty_image"
TRUNCATED_IMAGE = "truncated_image"
UNDECODABLE_IMAGE = "undecodable_image"
DECOMPRESSION_BOMB = "decompression_bomb"
MISSING_INSTRUCTION = "missing_instruction"
EMPTY_INSTRUCTION = "empty_instruction"
UNPARSEABLE_RECORD = "unparseable_record"

REASONS = {
    MISSING_IMAGE: "no image value, or the file / zip member does not exist",
    UNREADABLE_IMAGE: "the file exists but cannot be read (permissions, I/O error)",
    EMPTY_IMAGE: "the image file is 0 bytes",
    TRUNCATED_IMAGE: "the image data ends early (a partial download or copy)",
    UNDECODABLE_IMAGE: "not an image PIL can decode, or corrupt image data",
    DECOMPRESSION_BOMB: "more pixels than PIL.Image.MAX_IMAGE_PIXELS allows",
    MISSING_INSTRUCTION: "no instruction (absent or null)",
    EMPTY_INSTRUCTION: "the instruction is blank",
    UNPARSEABLE_RECORD: "the record cannot be parsed (bad JSON line, bad prompt.json, CSV row)",
}

OUTPUT_COLUMNS = ("input_image", "edit_prompt", "edited_image")


@dataclass(frozen=True)
class ImageRef:
    """Where one image's encoded bytes live.

    kind: "file" (location = path), "zip" (location = zip path, member = name inside it),
    "bytes" (data), or "absent" (label says why). `label` is the path kept in the output's
    Image `path` field and shown in rejection details.
    """

    kind: str
    location: str = ""
    member: str = ""
    data: bytes | None = None
    label: str | None = None


@dataclass
class Record:
    """One source record. `origin` says where it came from (file, line / index / row, folder, seed).

    `failure` is set when the reader already knows the record is bad (a broken JSON line, a bad
    prompt.json): the worker then rejects it without reading anything.
    """

    origin: dict
    input_image: ImageRef | None = None
    instruction: object = None
    edited_image: ImageRef | None = None
    extras: dict = field(default_factory=dict)
    failure: tuple[str, str] | None = None


class Rejection(Exception):
    """A record that cannot become a row: a reason code, a human-readable detail, the column."""

    def __init__(self, reason: str, detail: str, column: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.column = column

    def as_json(self, origin: dict) -> dict:
        entry = dict(origin)
        if self.column is not None:
            entry["column"] = self.column
        entry["reason"] = self.reason
        entry["detail"] = self.detail
        return entry
