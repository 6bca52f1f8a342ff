"""Stage 1: convert edit pairs into the HF dataset the trainer reads.

Reads the InstructPix2Pix release (prompt folders, loose or in shard-NN.zip, with seeds.json),
a manifest (.jsonl, .json, .csv, .tsv) or an existing HF dataset (save_to_disk, parquet), and
writes a `datasets.load_from_disk` folder with input_image, edit_prompt, edited_image (+ extras),
plus rejected.jsonl and conversion_report.json.

Usage examples:
    python convert_to_hf_dataset.py --data_dir clip-filtered-dataset --output_dir data/ip2p \\
        --num_proc 16
    python convert_to_hf_dataset.py --data_dir pairs/train.jsonl --output_dir data/mine
    python convert_to_hf_dataset.py --data_dir magicbrush/ --output_dir data/magicbrush \\
        --original_image_column source_img --edit_prompt_column instruction \\
        --edited_image_column target_img
    python convert_to_hf_dataset.py --data_dir pairs.csv --output_dir data/try \\
        --max_samples 100 --overwrite
"""

from __future__ import annotations

import sys

from ip2p.cli_args import FlagParser
from ip2p.convert import REASONS, ConvertOptions, convert
from ip2p.errors import cli

LAYOUTS = (
    """\
layouts (--format auto detects them in this order):
  hf        an existing HF dataset: a save_to_disk folder, a folder of parquet files (split by
            file name like load_dataset: data/train-*.parquet), or, with --format hf, anything
            datasets.load_dataset reads offline. A DatasetDict converts its train split unless
            --split names another. Image columns: Image features, paths or bytes.
              --data_dir magicbrush/ --original_image_column source_img \\
                --edit_prompt_column instruction --edited_image_column target_img
              --data_dir ultraedit/   (source_image, edit_prompt, edited_image: found by alias)
  ip2p      the InstructPix2Pix release: prompt folders named like 0000132/, each with
            prompt.json {"input" or "caption", "edit", "output"} and {seed}_0.jpg (input) +
            {seed}_1.jpg (edited); the same folders inside shard-NN.zip (read in place); an
            optional seeds.json [["0000132", [seed, ...]], ...] restricts the seeds taken.
            One row per seed pair; extras input_caption, output_caption, folder, seed.
              clip-filtered-dataset/
                seeds.json   shard-00.zip ... shard-29.zip    (or 0000000/ 0000001/ ...)
  manifest  one .jsonl / .json (list of objects) / .csv / .tsv; --data_dir is the file or a
            folder holding exactly one. Image paths are relative to the manifest's folder, or
            absolute. Default columns input_image, edit_prompt, edited_image; other columns are
            kept as extras.
              {"input_image": "a/1.jpg", "edit_prompt": "make it snow", "edited_image": "b/1.jpg"}
              input_image,edit_prompt,edited_image,source
              a/1.jpg,make it snow,b/1.jpg,flickr

column flags: without one, the default name is used, or a known alias (original_image,
source_image, source_img, image_file / instruction, edit, edit_instruction / target_img,
output_image, edited_file).

outputs in --output_dir (built in a temp folder beside it, renamed when complete):
  the dataset (datasets.load_from_disk), rejected.jsonl (one line per rejected record: where it
  came from, a reason code, a detail), conversion_report.json (counts per reason, time, pairs/s).
  Images keep their original bytes (a JPEG is never re-encoded) and read back as RGB; only images
  with alpha or more than 8 bits are stored as an RGB PNG (alpha composited over white).

rejection reasons:
"""
    + "\n".join(f"  {code:<21}{text}" for code, text in REASONS.items())
    + """

exit codes: 0 done; 2 a problem with the input or flags (one line on stderr, nothing written).
"""
)


def build_parser() -> FlagParser:
    return FlagParser(ConvertOptions, "convert_to_hf_dataset.py", epilog=LAYOUTS,
                      description="Edit pairs -> an HF dataset with input_image, edit_prompt, edited_image.")


@cli
def main(argv: list[str] | None = None) -> int:
    convert(build_parser().parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
