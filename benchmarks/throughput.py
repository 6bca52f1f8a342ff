#!/usr/bin/env python
"""Training throughput of the trainer's own step on the SDXL architecture (random weights).

    python benchmarks/throughput.py                      # SDXL at 1024, batch 4, bf16, on CUDA
    python benchmarks/throughput.py --tiny               # the tiny model at 64, fp32, on the CPU
    python benchmarks/throughput.py --variants cache,cache+8bit+ckpt --steps 20

Each variant builds a fresh UNet and optimizer and runs `ip2p.step.train_micro_step` (the function
the training loop calls) through accelerate, fed by the same producers as training: the latent
cache (`ip2p.cache`, built here from synthetic pairs through the real build path) or encoding on
the fly (`ip2p.encode`). One JSON line per variant: samples_per_s, step_ms, tflops (model FLOPs
counted once with torch's FlopCounterMode, forward + backward without recomputation, divided by
time), mfu (against the GPU's dense bf16 peak), peak_memory_gib. A last line gives the rate at
which the DataLoader serves cached batches alone (no GPU work), which must stay well above the
GPU's rate. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ip2p.cache import CachedPairs, LatentCache, build_cache, cache_key, cached_batch  # noqa: E402
from ip2p.config import parse_config  # noqa: E402
from ip2p.dataset import TrainPairs, load_hf_dataset, make_dataloader  # noqa: E402
from ip2p.encode import OnTheFlyEncoder  # noqa: E402
from ip2p.method import expand_conv_in  # noqa: E402
from ip2p.sdxl_arch import sdxl_unet  # noqa: E402
from ip2p.step import forward_loss, train_micro_step  # noqa: E402
from ip2p.tiny_model import tiny_unet  # noqa: E402
from ip2p.train_setup import DTYPES, make_optimizer, peak_memory_gib, place_encoders  # noqa: E402

# name -> (source, optimizer, gradient checkpointing, torch.compile)
VARIANTS = {
    "cache": ("cache", "adamw", False, False),
    "cache+ckpt": ("cache", "adamw", True, False),
    "cache+8bit": ("cache", "adamw8bit", False, False),
    "cache+8bit+ckpt": ("cache", "adamw8bit", True, False),
    "cache+compile": ("cache", "adamw", False, True),
    "on_the_fly": ("on_the_fly", "adamw", False, False),
    "on_the_fly+8bit+ckpt": ("on_the_fly", "adamw8bit", True, False),
}
DENSE_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}


def gpu_peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)


def synthetic_pairs(folder: Path, n: int, size: int) -> Path:
    """n smooth random edit pairs (JPEG) saved as the converter would: an HF dataset on disk."""
    import datasets

    rng = np.random.default_rng(0)
    rows = {"input_image": [], "edit_prompt": [], "edited_image": []}
    for i in range(n):
        coarse = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        for col, im in (("input_image", img), ("edited_image", img.transpose(Image.ROTATE_90))):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            rows[col].append({"bytes": buf.getvalue(), "path": None})
        rows["edit_prompt"].append(f"rotate the picture, sample {i}")
    features = datasets.Features({"input_image": datasets.Image(), "edit_prompt": datasets.Value("string"),
                                  "edited_image": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder


def load_model_parts(tiny: bool, workdir: Path, device):
    if tiny:
        from ip2p.models import load_parts
        from ip2p.tiny_model import build_tiny_sdxl

        path = build_tiny_sdxl(workdir / "tiny-sdxl")
        return load_parts(SimpleNamespace(pretrained_model_name_or_path=str(path), revision=None, variant=None,
                                          pretrained_vae_model_name_or_path=None))
    from ip2p.sdxl_arch import sdxl_parts

    # the encoders are made on the GPU (seconds, not minutes of random init on the CPU) and moved to
    # the CPU between uses; each variant makes its own UNet
    return sdxl_parts(device, with_unet=False)


def model_flops_per_step(unet, batch, parts) -> float:
    """FLOPs of one forward + backward of the UNet (no recomputation), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = forward_loss(unet, batch, parts.noise_scheduler, parts.vae.config.scaling_factor, 0.05)
        loss.backward()
    unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run_variant(name, spec, accelerator, parts, data, args, flops_per_step, peak):
    source, optim_name, checkpointing, compile_ = spec
    device = accelerator.device
    if optim_name == "adamw8bit" and device.type != "cuda":
        return {"variant": name, "skipped": "8-bit Adam (bitsandbytes) needs CUDA"}
    unet = expand_conv_in(data["unet_factory"](), 8).to(device)
    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    opt_cfg = SimpleNamespace(adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-8,
                              use_8bit_adam=optim_name == "adamw8bit")
    optimizer = make_optimizer(opt_cfg, unet.parameters(), 1e-6, device)
    if compile_:
        unet = torch.compile(unet)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if source == "cache":
        loader, produce = data["cache_loader"], (lambda b: cached_batch(b, device, data["dtype"]))
    else:
        place_encoders(parts, device)
        loader, produce = data["pixel_loader"], (lambda b: data["encoder"](b, device))
    scaling = parts.vae.config.scaling_factor

    def batches():
        while True:
            yield from loader

    it = batches()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        batch = next(it)
        with accelerator.accumulate(unet):
            loss, _ = train_micro_step(accelerator, unet, optimizer, produce(batch), parts.noise_scheduler,
                                       scaling, 0.05, 1.0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    row = {"variant": name, "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
           "resolution": args.resolution, "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
           "source": source, "optimizer": optim_name, "gradient_checkpointing": checkpointing, "compile": compile_,
           "samples_per_s": args.steps * args.batch_size / elapsed, "step_ms": 1000 * elapsed / args.steps,
           "tflops": flops_per_step * args.steps / elapsed / 1e12,
           "peak_memory_gib": peak_memory_gib(device), "last_loss": loss.item()}
    row["mfu"] = row["tflops"] * 1e12 / peak if peak else None
    if source != "cache":
        place_encoders(parts, "cpu")
    del unet, optimizer
    accelerator.free_memory()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def loader_rate(loader, batches: int) -> float:
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        n += len(batch["original_latents"])
        if i + 1 == batches:
            break
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (64, fp32)")
    parser.add_argument("--resolution", type=int, default=None, help="default 1024 (tiny: 64)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                        help="default bf16 on CUDA, no on the CPU")
    parser.add_argument("--variants", default=None, help=f"comma-separated, from {', '.join(VARIANTS)}; default: "
                        "all but compile (add 'cache+compile' explicitly: the first full SDXL compile takes minutes)")
    parser.add_argument("--num_samples", type=int, default=32, help="synthetic pairs to build the cache from")
    parser.add_argument("--loader_workers", type=int, default=4)
    parser.add_argument("--output_json", default=None, help="also write the rows to this JSONL file")
    args = parser.parse_args(argv)
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and not args.tiny
    args.resolution = args.resolution or (64 if args.tiny else 1024)
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    names = args.variants.split(",") if args.variants else [v for v in VARIANTS if "compile" not in v]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not cuda)
    device, dtype = accelerator.device, DTYPES[args.mixed_precision]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parts = load_model_parts(args.tiny, tmp, device)
        for m in (parts.vae, parts.text_encoder, parts.text_encoder_2):
            m.requires_grad_(False).eval()
        if dtype != torch.float32:
            parts.text_encoder.to(dtype)
            parts.text_encoder_2.to(dtype)
        cfg = parse_config(["--pretrained_model_name_or_path", "random", "--resolution", str(args.resolution),
                            "--data_dir", str(synthetic_pairs(tmp / "data", args.num_samples, args.resolution)),
                            "--random_flip", "--seed", "0"])
        ds = load_hf_dataset(cfg)
        pairs = TrainPairs(ds, cfg, (parts.tokenizer, parts.tokenizer_2))
        key, key_parts = cache_key(ds, parts, cfg, dtype)
        cache = LatentCache(tmp / "cache", key, len(ds), orientations=2)
        place_encoders(parts, device)
        t0 = time.perf_counter()
        build_cache(accelerator, cache, pairs, parts, key_parts, args.resolution, dtype, args.batch_size, 0)
        build_s = time.perf_counter() - t0
        place_encoders(parts, "cpu")
        # persistent workers: a small synthetic set must not pay a worker start every few steps
        cache_loader, _ = make_dataloader(CachedPairs(cache, pairs.transform), args.batch_size,
                                          args.loader_workers, 0, pin_memory=cuda, persistent_workers=True)
        pixel_loader, _ = make_dataloader(pairs, args.batch_size, args.loader_workers, 0, pin_memory=cuda,
                                          persistent_workers=True)
        data = {"cache_loader": cache_loader, "pixel_loader": pixel_loader, "dtype": dtype,
                "encoder": OnTheFlyEncoder(parts.vae, parts.text_encoder, parts.text_encoder_2, args.resolution, dtype),
                "unet_factory": tiny_unet if args.tiny else (lambda: sdxl_unet(device))}
        # model FLOPs: one plain forward + backward (no checkpointing) on a fresh UNet
        probe = expand_conv_in(data["unet_factory"](), 8).to(device).train()
        batch = cached_batch({k: v.to(device) for k, v in next(iter(cache_loader)).items()}, device, dtype)
        with accelerator.autocast():
            flops = model_flops_per_step(probe, batch, parts)
        del probe
        gc.collect()
        peak = gpu_peak_flops(device)
        rows.append({"variant": "cache_build", "samples_per_s": args.num_samples / build_s,
                     "model_tflop_per_sample": flops / args.batch_size / 1e12})
        print(json.dumps(rows[-1]), flush=True)
        for name in names:
            rows.append(run_variant(name, VARIANTS[name], accelerator, parts, data, args, flops, peak))
            print(json.dumps(rows[-1]), flush=True)
        rows.append({"variant": "cache_loader_only", "samples_per_s": loader_rate(cache_loader, 50),
                     "loader_workers": args.loader_workers})
        print(json.dumps(rows[-1]), flush=True)
    if args.output_json:
        Path(args.output_json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
