"""Stage 1: raw edit pairs -> a Hugging Face dataset on disk.

    layouts read (main process: what exists, in which order; no image opened)
      ip2p_folders.py   the InstructPix2Pix release: prompt folders, shard-NN.zip, seeds.json
      manifest.py       .jsonl / .json / .csv / .tsv with image paths
      hf_source.py      save_to_disk folders, parquet files, load_dataset (offline)
      columns.py        source column -> input_image / edit_prompt / edited_image; extras' types
    per shard (worker processes)
      shards.py         read records, check them (record_check.py: full decode),
                        stream Arrow batches + a rejected part file
    end
      output.py         temp folder beside the output, datasets metadata, one rename
      convert.py        the whole run, the nothing-lost check, conversion_report.json

Output columns: input_image (Image, read back as RGB), edit_prompt (string), edited_image (Image),
then every extra source column.
"""

from ip2p.convert.convert import convert, detect_format
from ip2p.convert.options import FORMATS, ConvertOptions
from ip2p.convert.records import REASONS

__all__ = ["FORMATS", "REASONS", "ConvertOptions", "convert", "detect_format"]
