#!/usr/bin/env python
"""Train SDXL into an instruction-based image editor (InstructPix2Pix), with the diffusers flags.

The same script trains from an SD 1.x/2.x base or continues an existing InstructPix2Pix pipeline of
either family (timbrooks/instruct-pix2pix, diffusers/sdxl-instructpix2pix-768): the family is read
from the model folder's configs.

Usually launched through ./train.sh (accelerate). Directly, on one process:

    python train_instruct_pix2pix_sdxl.py --config configs/sdxl_1024_8xa100.yaml \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 --data_dir ./data_hf

    # the tiny CPU recipe, on a tiny model from `python -m ip2p.tiny.model --output_dir tiny-sdxl`
    python train_instruct_pix2pix_sdxl.py --config configs/tiny_cpu.yaml \\
        --pretrained_model_name_or_path tiny-sdxl --data_dir ./data_hf --output_dir ./tiny-run

Every flag of diffusers' examples/instruct_pix2pix/train_instruct_pix2pix_sdxl.py is accepted with
the same meaning; `--help` lists them, the kit's additions marked "(kit)". Resume a run by running
the same command with `--resume_from_checkpoint latest`.

Exit codes: 0 done; 2 a problem with the input (one line says which); 3 trained and saved, but
the --push_to_hub upload failed (one line says how to finish it); 75 stopped by SIGTERM/SIGINT
after saving a checkpoint of the step in progress (run again with --resume_from_checkpoint latest);
1 a bug (with its traceback).
"""

import sys

from ip2p.training.config import check_config, parse_config
from ip2p.errors import cli


@cli
def main(argv=None) -> int:
    cfg = parse_config(argv)
    check_config(cfg)
    from ip2p.training.loop import train

    return train(cfg)


if __name__ == "__main__":
    sys.exit(main())
