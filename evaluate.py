"""Evaluate a trained InstructPix2Pix editor (SDXL or SD 1.x/2.x) on held-out pairs, over an image-guidance sweep.

The held-out split of a converted dataset (validation, else test, else train; or --split), CLIP
ViT-L/14 as in the InstructPix2Pix paper, five image-guidance values:
    python evaluate.py --model_path ./ip2p-sdxl --data_dir ./data_hf \\
        --clip_model_name_or_path ./clip-vit-large-patch14 --output_dir ./eval

Quicker: 100 pairs, a shorter sweep, 20 steps, at 512 pixels:
    python evaluate.py --model_path ./ip2p-sdxl --data_dir ./magicbrush_test_hf \\
        --clip_model_name_or_path ./clip-vit-large-patch14 --output_dir ./eval-quick \\
        --max_samples 100 --image_guidance_scales 1.2,1.5,2.0 --num_inference_steps 20 \\
        --resolution 512

CLIP is never downloaded here: give a local folder (fetch it once with
`hf download openai/clip-vit-large-patch14 --local-dir ./clip-vit-large-patch14`) or a hub id
that is already in the Hugging Face cache.

Writes OUT/metrics.json (the mean of each metric per image-guidance value, the settings, the split
and columns used), OUT/per_sample.jsonl (one row per sample and setting), OUT/images/igs_<v>/
<index>.png (every output), OUT/tradeoff.png (x: how well the edit is followed, CLIP directional
similarity, or text-image similarity without captions; y: how much of the photo is kept, CLIP
image similarity to the input; one point per value) and
OUT/grid.png (a few samples: input, each setting's output, the ground truth).

Metrics: l1 and l2 (mean absolute / squared pixel difference to the ground truth in [0, 1], the
ground truth resized to the output) and clip_image_similarity (CLIP-I, output vs ground truth) as
in MagicBrush; clip_image_similarity_to_input, clip_text_image_similarity (output vs the output
caption, or the instruction when the data has none) and clip_directional_similarity (needs
input_caption and output_caption) as in InstructPix2Pix. Every setting and sample starts from the
same seed. Errors in the inputs are found before any model loads; OUT appears only when complete.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders and the local cache only

from ip2p.cli_args import EvaluateArgs, FlagParser  # noqa: E402
from ip2p.errors import cli  # noqa: E402


@cli
def main(argv: list[str] | None = None) -> int:
    args = FlagParser(EvaluateArgs, "evaluate.py", description=__doc__).parse(argv)
    from ip2p.evaluation.evaluate import run  # torch, diffusers, transformers: only once the flags are good

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
