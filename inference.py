"""Stage 4: edit photos with a trained InstructPix2Pix pipeline (SDXL or SD 1.x/2.x, read from the folder).

One photo:
    python inference.py --model_path ./ip2p-sdxl --input_image photo.jpg \\
        --instruction "turn the sky into sunset" --output_path result.png

A folder of photos (outputs named after their inputs: photo.jpg -> edited/photo.png):
    python inference.py --model_path ./ip2p-sdxl --input_image photos/ \\
        --instruction "make it winter" --output_dir edited/

One instruction per photo, from a JSONL file, one edit a line (image paths relative to the file;
"output", a name under --output_dir, optional):
    {"image": "a.jpg", "instruction": "make it winter", "output": "a_winter.png"}
    python inference.py --model_path ./ip2p-sdxl --prompts_file edits.jsonl --output_dir edited/

Pick guidance by looking: one labelled grid, rows = image guidance, columns = text guidance, the
input photo beside them, the same seed in every cell:
    python inference.py --model_path ./ip2p-sdxl --input_image photo.jpg \\
        --instruction "make it snow" --sweep_image_guidance 1.0,1.5,2.0 --sweep_guidance 3,5,7.5 \\
        --output_path sweep.png

Size: the output keeps the photo's aspect ratio; its long side is --resolution (default: the one
the model was trained at, from training_config.yaml in the model folder), rounded so the latents
divide evenly through the UNet (multiples of 32 for SDXL). EXIF orientation is applied; any image
mode is read as RGB (transparency over white).

Guidance: InstructPix2Pix guides twice, by the text (--guidance_scale) and by the photo
(--image_guidance_scale). The pipeline turns all guidance off when the text scale is <= 1 or the
image scale is < 1. Without --negative_prompt the unconditional text is the zero embedding the
model was trained with; a negative prompt replaces it with encoded text the model never saw.

Device and precision are picked automatically (cuda: bf16, or fp16 where bf16 is unsupported;
mps: fp16; cpu: fp32); --device / --dtype override. fp16 note: the stock SDXL VAE overflows in
fp16, so the pipeline runs it in fp32 whenever its config says force_upcast (the stock one does);
--vae_path to an fp16-safe VAE (e.g. a local copy of madebyollin/sdxl-vae-fp16-fix) keeps it fp16.

Nothing is downloaded: the model folder must hold the whole pipeline. Errors in the inputs are
found before the model loads and before anything is written; each output is written whole.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only; never reach for the hub

from ip2p.cli_args import FlagParser, InferenceArgs  # noqa: E402
from ip2p.errors import cli  # noqa: E402


def parse_args(argv: list[str] | None = None) -> InferenceArgs:
    return FlagParser(InferenceArgs, "inference.py", description=__doc__).parse(argv)


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ip2p.inference.edit import run  # torch and diffusers: only once the flags are good (--help stays instant)

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
