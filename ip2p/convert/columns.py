"""Which source columns become input_image / edit_prompt / edited_image, and how extras are typed.

Without a column flag the default name is used, or else the first known alias that exists
(the hub copy of InstructPix2Pix, UltraEdit, MagicBrush, HQ-Edit, AnyEdit).
A flag naming a column that does not exist is an error that lists the columns that do.
"""

from __future__ import annotations

import json

from ip2p.convert.records import OUTPUT_COLUMNS
from ip2p.errors import UserError

FLAGS = {
    "input_image": "--original_image_column",
    "edit_prompt": "--edit_prompt_column",
    "edited_image": "--edited_image_column",
}

ALIASES = {  # default first, then: hub IP2P, UltraEdit, MagicBrush, AnyEdit (HQ-Edit: default)
    "input_image": ("input_image", "original_image", "source_image", "source_img", "image_file"),
    "edit_prompt": ("edit_prompt", "instruction", "edit", "edit_instruction"),
    "edited_image": ("edited_image", "target_img", "output_image", "edited_file"),
}


def _listing(columns: list[str], limit: int = 40) -> str:
    shown = ", ".join(columns[:limit])
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > limit else "")


def resolve_columns(
    available: list[str], flags: dict[str, str | None], where: str
) -> dict[str, str]:
    """Map each output column to a source column, or raise a UserError naming the fix."""
    mapping = {}
    for out in OUTPUT_COLUMNS:
        wanted = flags.get(out)
        if wanted is not None:
            if wanted not in available:
                raise UserError(
                    f"column '{wanted}' ({FLAGS[out]}) not found in {where}; "
                    f"its columns are: {_listing(available)}"
                )
            mapping[out] = wanted
            continue
        found = next((name for name in ALIASES[out] if name in available), None)
        if found is None:
            raise UserError(
                f"no {out} column in {where} (looked for {', '.join(ALIASES[out])}); its columns "
                f"are: {_listing(available)}; name it with {FLAGS[out]} NAME"
            )
        mapping[out] = found
    if len(set(mapping.values())) < len(mapping):
        raise UserError(
            f"one source column is mapped to two outputs: {mapping}; fix the column flags"
        )
    return mapping


def extra_columns(available: list[str], mapping: dict[str, str]) -> dict[str, str]:
    """Source column -> output name for every unmapped column (renamed if it clashes)."""
    used = set(mapping.values())
    extras = {}
    for name in available:
        if name in used:
            continue
        out = name if name not in OUTPUT_COLUMNS else f"source_{name}"
        extras[name] = out
    return extras


class TypeTally:
    """Which JSON types each manifest column holds, to give its extras one Arrow type."""

    def __init__(self):
        self.kinds: dict[str, set[str]] = {}

    def observe(self, record: dict) -> None:
        for key, value in record.items():
            seen = self.kinds.setdefault(key, set())
            if value is not None:
                seen.add(_kind(value))

    def column_type(self, key: str) -> str:
        seen = self.kinds.get(key, set())
        if seen in ({"int"}, {"float"}, {"bool"}):
            return {"int": "int64", "float": "float64", "bool": "bool"}[next(iter(seen))]
        if seen == {"int", "float"}:
            return "float64"
        return "string"


INT64 = range(-(2**63), 2**63)


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):  # JSON ints are unbounded; one past int64 makes a string column
        return "int" if value in INT64 else "bigint"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "json"


LONE_SURROGATE = "holds a lone surrogate (a \\ud800-\\udfff escape), which is not valid text"


def holds_lone_surrogate(value: object) -> bool:
    """True where a parsed JSON value holds a lone surrogate: JSON's \\ud800 escape allows one,
    but UTF-8 files and Arrow strings cannot hold it (writing it raises UnicodeEncodeError)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def coerce(value: object, dtype: str) -> object:
    """A manifest value in its column's type. Lists and objects are kept as JSON text."""
    if value is None or dtype == "raw":
        return value
    if dtype == "string":
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if dtype == "float64":
        return float(value)
    if dtype == "int64":
        return int(value)
    return bool(value)
