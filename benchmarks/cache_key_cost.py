#!/usr/bin/env python
"""What keying the latent cache by content costs at the start of a run.

    python benchmarks/cache_key_cost.py                 # SDXL encoders (random weights) + 400 pairs
    python benchmarks/cache_key_cost.py --num_pairs 2000 --image_size 512

Prints one JSON line per measurement: hashing every weight of the SDXL VAE (fp32) and of both
text encoders (in the training dtype, bf16 by default), built from their configs with random
weights (the values do not change the cost); and hashing a dataset's rows when no converter
record applies (a `save_to_disk` folder of random-noise PNG pairs, which do not compress, so the
bytes per pair are about 3 x size^2). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ip2p.fingerprint import CONVERTER_COLUMNS, compute_dataset_fingerprint, module_fingerprint  # noqa: E402
from ip2p.tiny.sdxl_arch import sdxl_text_encoders, sdxl_vae  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def encoders(text_dtype: torch.dtype) -> list[dict]:
    te, te2 = sdxl_text_encoders()
    rows = []
    for name, module, dtype in (("vae", sdxl_vae(), torch.float32), ("text_encoder", te, text_dtype),
                                ("text_encoder_2", te2, text_dtype)):
        module.to(dtype)
        seconds = timed(lambda: module_fingerprint(module))
        rows.append({"what": f"weights of {name}", "dtype": str(dtype), "gb": round(nbytes(module) / 1e9, 3),
                     "seconds": round(seconds, 2), "gb_per_s": round(nbytes(module) / 1e9 / seconds, 2)})
    return rows


def dataset(num_pairs: int, size: int) -> dict:
    import datasets

    rng = np.random.default_rng(0)

    def png() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    rows = {"input_image": [], "edit_prompt": [], "edited_image": []}
    for i in range(num_pairs):
        rows["input_image"].append({"bytes": png(), "path": None})
        rows["edited_image"].append({"bytes": png(), "path": None})
        rows["edit_prompt"].append(f"edit number {i}")
    features = datasets.Features({"input_image": datasets.Image(), "edit_prompt": datasets.Value("string"),
                                  "edited_image": datasets.Image()})
    with tempfile.TemporaryDirectory() as tmp:
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp)
        ds = datasets.load_from_disk(tmp)
        image_bytes = sum(len(rows[c][i]["bytes"]) for c in ("input_image", "edited_image") for i in range(num_pairs))
        seconds = timed(lambda: compute_dataset_fingerprint(ds, CONVERTER_COLUMNS))
    return {"what": "dataset rows (no converter record)", "pairs": num_pairs, "image_size": size,
            "gb": round(image_bytes / 1e9, 3), "seconds": round(seconds, 2),
            "gb_per_s": round(image_bytes / 1e9 / seconds, 2), "pairs_per_s": round(num_pairs / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text_encoder_dtype", choices=DTYPES, default="bf16",
                        help="the training dtype the text encoders are cast to (default: bf16)")
    parser.add_argument("--num_pairs", type=int, default=400, help="pairs in the synthetic dataset (default: 400)")
    parser.add_argument("--image_size", type=int, default=256, help="image side in pixels (default: 256)")
    parser.add_argument("--skip_encoders", action="store_true", help="only the dataset measurement")
    args = parser.parse_args(argv)
    rows = [] if args.skip_encoders else encoders(DTYPES[args.text_encoder_dtype])
    rows.append(dataset(args.num_pairs, args.image_size))
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
