#!/usr/bin/env python
"""What a LoRA run trains and what its checkpoint weighs, on the real architecture (no GPU needed).

    python benchmarks/lora_checkpoint.py                       # SDXL, rank 16 (the 24 GB recipe)
    python benchmarks/lora_checkpoint.py --family sd15 --rank 16
    python benchmarks/lora_checkpoint.py --tiny                # the tiny model (CI)

The UNet is built from its config with uninitialised weights (their values change no size), widened
to 8 channels, given the trainer's adapters (`ip2p.training.lora.attach_lora`, the default
--lora_target_modules) with its frozen weights in bf16, then stepped once by the trainer's optimizer
(`make_optimizer`: fused AdamW) through accelerate and checkpointed by the trainer's own
`save_checkpoint` with the LoRA hooks. One JSON line: parameters (UNet, trained, of which conv_in),
the checkpoint's files and bytes, and what a full fine-tune's checkpoint holds by the same rule
(fp32 weights + two fp32 Adam moments), for scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ip2p.method import expand_conv_in  # noqa: E402
from ip2p.training import checkpoint as ckpt  # noqa: E402
from ip2p.training.config import LORA_TARGETS, TrainConfig  # noqa: E402
from ip2p.training.lora import LoraSettings, attach_lora, register_checkpoint_hooks  # noqa: E402
from ip2p.training.setup import make_optimizer  # noqa: E402


def build_unet(family: str, tiny: bool):
    if tiny:
        from ip2p.tiny.model import tiny_unet

        return tiny_unet(family)
    from ip2p.tiny.sd15_arch import sd15_unet
    from ip2p.tiny.sdxl_arch import sdxl_unet

    return (sdxl_unet if family == "sdxl" else sd15_unet)(device="meta")


def measure(family: str, rank: int, tiny: bool) -> dict:
    from accelerate import Accelerator

    unet = expand_conv_in(build_unet(family, tiny).to(torch.bfloat16), 8)
    lora = LoraSettings(rank, float(rank), 0.0, tuple(LORA_TARGETS.split(",")), False)
    attach_lora(unet, lora, widened=True)
    unet = unet.to_empty(device="cpu") if unet.device.type == "meta" else unet
    trainable = [p for p in unet.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:  # fp32 master copies, as cast_frozen leaves them
            p.data = torch.randn_like(p, dtype=torch.float32) * 1e-3
            p.grad = torch.randn_like(p.data)
    accelerator = Accelerator(cpu=True)
    optimizer = make_optimizer(TrainConfig(), trainable, 1e-4, torch.device("cpu"))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    optimizer.step()
    register_checkpoint_hooks(accelerator, unet)
    with tempfile.TemporaryDirectory() as tmp:
        folder = ckpt.save_checkpoint(accelerator, tmp, ckpt.TrainState(global_step=1), None)
        files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    total = sum(p.numel() for name, p in unet.named_parameters() if "lora_" not in name)  # the UNet itself
    trained = sum(p.numel() for p in trainable)
    conv_in = sum(p.numel() for p in accelerator.unwrap_model(unet).conv_in.parameters())
    return {"family": family, "architecture": "tiny" if tiny else "full (random weights)", "rank": rank,
            "unet_params": total, "trained_params": trained, "conv_in_params": conv_in,
            "trained_fraction": trained / total, "bf16_frozen_gib": (total - conv_in) * 2 / 2**30, "checkpoint_files": files,
            "checkpoint_bytes": sum(files.values()), "full_finetune_checkpoint_bytes": total * 4 * 3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=("sdxl", "sd15"), default="sdxl")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="the tiny model instead of the full architecture")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.family, args.rank, args.tiny)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
