#!/usr/bin/env python
"""Training throughput on the SDXL architecture (random weights): the trainer's step, or its whole loop.

    python benchmarks/throughput.py                      # SDXL at 1024, batch 4, bf16, on CUDA
    python benchmarks/throughput.py --family sd15        # SD 1.5's architecture at 512 (the step only)
    python benchmarks/throughput.py --tiny               # the tiny model at 64, fp32, on the CPU
    python benchmarks/throughput.py --variants recipe,recipe+compile --steps 20
    python benchmarks/throughput.py --bucket 832x1216    # the step at one aspect-ratio bucket (width x height)
    python benchmarks/throughput.py --loop               # ./train.sh, the default recipe, 30 steps
    python benchmarks/throughput.py --loop --tiny --loop_flags "--torch_compile"

The step. Each variant builds a fresh UNet and optimizer and runs `ip2p.training.step.train_micro_step` (the
function the training loop calls) through accelerate, fed by the same producers as training: the
latent cache (`ip2p.training.cache`, built here from synthetic pairs through the real build path) or
encoding on the fly (`ip2p.training.encode`). The optimizer and the compilation are the trainer's own
(`make_optimizer`, `compile_unet`). A variant is a source, an optimizer (as --optimizer names it),
gradient checkpointing or not, and a compile mode (as --torch_compile_mode):

    recipe                 cache, adamw8bit, no checkpointing: configs/sdxl_1024_8xa100.yaml as shipped
    recipe+ckpt            the same with gradient checkpointing (the recipe's earlier default)
    adamw, adamw+ckpt      torch's fused AdamW (fp32 states) instead of 8-bit Adam
    recipe+compile, adamw+compile            --torch_compile (regional: the repeated transformer block)
    recipe+compile_full, adamw+compile_full  --torch_compile_mode full (the whole UNet: minutes for SDXL)
    torchao8bit            --optimizer adamw8bit_torchao (its step compiles on first use: ~2 min on a CPU)
    on_the_fly, on_the_fly+recipe            --no_cache_latents, with AdamW / with the recipe's optimizer

With --bucket WIDTHxHEIGHT every sample is that shape (as --aspect_ratio_buckets trains a batch of
that bucket), from the cache's per-bucket layout and through the same encoders; the rows give the
bucket beside the resolution.

Every variant starts from the same seed and sees the same batches, so a compiled variant's loss is
its eager twin's up to rounding. One JSON line per variant: samples_per_s, step_ms, compile_s (where
something compiles: the warm-up steps' time beyond that of as many steady steps), tflops (model
FLOPs counted once with torch's FlopCounterMode, forward + backward without recomputation, divided
by time), mfu (against the GPU's dense bf16 peak), peak_memory_gib, last_loss; a `skipped` line
where the variant cannot run (8-bit Adam from bitsandbytes needs CUDA). The first line gives the
cache build rate, the last the rate at which the DataLoader serves cached batches alone (no GPU
work), which must stay well above the GPU's rate.

The loop (--loop; benchmarks/throughput_loop.py). The step leaves out what the training loop adds
around it (the DataLoader in its real configuration, logging, the non-finite check, gradient
accumulation); --loop times the real thing. It builds a model folder (`python -m ip2p.tiny.sdxl_arch`,
SDXL with random weights; with --tiny `python -m ip2p.tiny.model`; or --model), synthetic pairs
(`python -m ip2p.tiny.sample_data`, then `convert_to_hf_dataset.py`, one epoch's worth), and runs
`./train.sh` with configs/sdxl_1024_8xa100.yaml (with --tiny configs/tiny_cpu.yaml on the CPU) for
--steps optimizer steps, on one GPU unless $ACCELERATE_CONFIG says otherwise, without checkpoints or
validation, plus --loop_flags; the latent cache is built before the first step. Its one JSON line
holds the rate the progress bar shows, from the run's logs/metrics.jsonl: samples_per_s over the
logging intervals after the first (which holds compilation and warm-up:
first_interval_samples_per_s) and samples_per_s_last, peak_memory_gib, the resolved optimizer, batch
and compile settings, and wall_s (train.sh from start to exit, the final save included).
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ip2p.training.cache import CacheBuild, CachedPairs, LatentCache, build_cache, cache_key, cached_batch  # noqa: E402
from ip2p.training.config import LORA_TARGETS, parse_config  # noqa: E402
from ip2p.training.lora import LoraSettings, attach_lora, cast_frozen  # noqa: E402
from ip2p.training.pairs import TrainPairs, load_hf_dataset, make_dataloader  # noqa: E402
from ip2p.training.encode import OnTheFlyEncoder  # noqa: E402
from ip2p.errors import UserError  # noqa: E402
from ip2p.method import expand_conv_in  # noqa: E402
from ip2p.tiny.sd15_arch import sd15_unet  # noqa: E402
from ip2p.tiny.sdxl_arch import sdxl_unet  # noqa: E402
from ip2p.training.step import Objective, forward_loss, train_micro_step  # noqa: E402
from ip2p.tiny.model import tiny_unet  # noqa: E402
from ip2p.training.setup import DTYPES, compile_unet, make_optimizer, peak_memory_gib, place_encoders  # noqa: E402


class Variant(NamedTuple):
    source: str  # cache | on_the_fly
    optimizer: str  # as --optimizer names it
    gradient_checkpointing: bool
    compile: str  # none | regional | full (--torch_compile_mode)
    lora_rank: int = 0  # --lora_rank: adapters on a frozen UNet (frozen weights in the mixed-precision dtype)


VARIANTS = {
    "recipe": Variant("cache", "adamw8bit", False, "none"),
    "recipe+ckpt": Variant("cache", "adamw8bit", True, "none"),
    "adamw": Variant("cache", "adamw", False, "none"),
    "adamw+ckpt": Variant("cache", "adamw", True, "none"),
    "recipe+compile": Variant("cache", "adamw8bit", False, "regional"),
    "recipe+compile_full": Variant("cache", "adamw8bit", False, "full"),
    "adamw+compile": Variant("cache", "adamw", False, "regional"),
    "adamw+compile_full": Variant("cache", "adamw", False, "full"),
    "torchao8bit": Variant("cache", "adamw8bit_torchao", False, "none"),
    "on_the_fly": Variant("on_the_fly", "adamw", False, "none"),
    "on_the_fly+recipe": Variant("on_the_fly", "adamw8bit", False, "none"),
    "lora_24gb": Variant("cache", "adamw", True, "none", 16),  # configs/sdxl_1024_lora_24gb.yaml's step
    "lora": Variant("cache", "adamw", False, "none", 16),
    "lora+compile": Variant("cache", "adamw", False, "regional", 16),
}
DENSE_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12}


def gpu_peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)


def synthetic_pairs(folder: Path, n: int, size: int | tuple[int, int]) -> Path:
    """n smooth random edit pairs (JPEG) saved as the converter would: an HF dataset on disk; `size`
    a square side or (height, width)."""
    import datasets

    rng = np.random.default_rng(0)
    rows = {"input_image": [], "edit_prompt": [], "edited_image": []}
    for i in range(n):
        coarse = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        h, w = (size, size) if isinstance(size, int) else size
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        # a rotated non-square edit is brought back to the input's size by the crop, as any other
        for col, im in (("input_image", img), ("edited_image", img.transpose(Image.ROTATE_90))):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            rows[col].append({"bytes": buf.getvalue(), "path": None})
        rows["edit_prompt"].append(f"rotate the picture, sample {i}")
    features = datasets.Features({"input_image": datasets.Image(), "edit_prompt": datasets.Value("string"),
                                  "edited_image": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder


def load_model_parts(args, workdir: Path, device):
    if args.tiny:
        from ip2p.models import load_parts
        from ip2p.tiny.model import build_tiny

        path = build_tiny(workdir / f"tiny-{args.family}", args.family)
        return load_parts(SimpleNamespace(pretrained_model_name_or_path=str(path), revision=None, variant=None,
                                          pretrained_vae_model_name_or_path=None))
    from ip2p.tiny.sd15_arch import sd15_parts
    from ip2p.tiny.sdxl_arch import sdxl_parts

    # the encoders are made on the GPU (seconds, not minutes of random init on the CPU) and moved to
    # the CPU between uses; each variant makes its own UNet
    return (sdxl_parts if args.family == "sdxl" else sd15_parts)(device, with_unet=False)


def unet_factory(args, device):
    """A fresh base UNet of the family (each variant widens and trains its own)."""
    if args.tiny:
        return lambda: tiny_unet(args.family)
    return (lambda: sdxl_unet(device)) if args.family == "sdxl" else (lambda: sd15_unet(device))


def model_flops_per_step(unet, batch, parts) -> float:
    """FLOPs of one forward + backward of the UNet (no recomputation), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = forward_loss(unet, batch, Objective(parts.noise_scheduler, parts.vae.config.scaling_factor, 0.05))
        loss.backward()
    unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def compiles(spec: Variant) -> bool:
    return spec.compile != "none" or spec.optimizer == "adamw8bit_torchao"


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(name: str, spec: Variant, accelerator, parts, data, args, flops_per_step, peak) -> dict:
    device = accelerator.device
    if spec.optimizer == "adamw8bit" and device.type != "cuda":
        return {"variant": name, "skipped": "8-bit Adam (bitsandbytes) needs CUDA"}
    torch._dynamo.reset()  # each compiled variant pays its compilation, as a fresh run does
    torch.manual_seed(0)  # the same UNet, noise and timesteps in every variant
    unet = expand_conv_in(data["unet_factory"](), 8).to(device)
    if spec.lora_rank:  # as the trainer's prepare_models does
        settings = LoraSettings(spec.lora_rank, float(spec.lora_rank), 0.0, tuple(LORA_TARGETS.split(",")), False)
        attach_lora(unet, settings, widened=True)
        cast_frozen(unet, data["dtype"])
    unet.train()
    if spec.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    opt_cfg = SimpleNamespace(optimizer=spec.optimizer, use_8bit_adam=False, adam_beta1=0.9, adam_beta2=0.999,
                              adam_weight_decay=1e-2, adam_epsilon=1e-8)
    try:
        optimizer = make_optimizer(opt_cfg, [p for p in unet.parameters() if p.requires_grad], 1e-6, device)
    except UserError as e:  # a missing package: bitsandbytes, torchao
        return {"variant": name, "skipped": str(e)}
    if spec.compile != "none":
        unet = compile_unet(unet, spec.compile)  # in the trainer's order: after the optimizer, before prepare
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if spec.source == "cache":
        loader, produce = data["cache_loader"], (lambda b: cached_batch(b, device, data["dtype"]))
    else:
        place_encoders(parts, device)
        loader, produce = data["pixel_loader"], (lambda b: data["encoder"](b, device))
    scaling = parts.vae.config.scaling_factor

    def batches():  # every variant from the start of the same epoch: the same batches
        while True:
            yield from loader

    it = batches()
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            t0 = time.perf_counter()
        t = time.perf_counter()
        with accelerator.accumulate(unet):
            loss, _ = train_micro_step(accelerator, unet, optimizer, produce(next(it)),
                                       Objective(parts.noise_scheduler, scaling, 0.05), 1.0)
        if i < args.warmup:
            sync(device)
            warmup_s.append(time.perf_counter() - t)
    sync(device)
    elapsed = time.perf_counter() - t0
    step_s = elapsed / args.steps
    row = {"variant": name, "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
           "resolution": args.resolution, "bucket": args.bucket, "batch_size": args.batch_size,
           "mixed_precision": args.mixed_precision,
           **spec._asdict(), "samples_per_s": args.batch_size / step_s, "step_ms": 1000 * step_s,
           # the warm-up steps beyond as many steady ones: the compilation (and the first step's allocations)
           "compile_s": sum(max(0.0, w - step_s) for w in warmup_s) if compiles(spec) else None,
           "tflops": flops_per_step / step_s / 1e12, "peak_memory_gib": peak_memory_gib(device),
           "last_loss": loss.item()}
    row["mfu"] = row["tflops"] * 1e12 / peak if peak else None
    if spec.source != "cache":
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


def emit(row: dict, output_json) -> None:
    """Print a row, and append it to --output_json at once: a run stopped part way keeps its rows."""
    print(json.dumps(row), flush=True)
    if output_json:
        with open(output_json, "a") as f:
            f.write(json.dumps(row) + "\n")


def run_steps(args, names: list[str], cuda: bool) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not cuda)
    device, dtype = accelerator.device, DTYPES[args.mixed_precision]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parts = load_model_parts(args, tmp, device)
        for m in parts.encoders:
            m.requires_grad_(False).eval()
        if dtype != torch.float32:
            for m in parts.text_encoders:
                m.to(dtype)
        num_samples = args.num_samples or 32
        shape = bucket_shape(args.bucket) if args.bucket else args.resolution
        cfg = parse_config(["--pretrained_model_name_or_path", "random", "--resolution", str(args.resolution),
                            "--data_dir", str(synthetic_pairs(tmp / "data", num_samples, shape)),
                            "--random_flip", "--seed", "0"])
        ds = load_hf_dataset(cfg)
        pairs = TrainPairs(ds, cfg, parts.tokenizers)
        if args.bucket:
            pairs.use_buckets([shape] * len(ds))
        key, key_parts = cache_key(ds, parts, cfg, dtype, targets=pairs.targets)
        cache = LatentCache(tmp / "cache", key, len(ds), orientations=2)
        place_encoders(parts, device)
        t0 = time.perf_counter()
        build_cache(accelerator, cache, pairs, CacheBuild(parts, dtype, args.batch_size, 0), key_parts)
        build_s = time.perf_counter() - t0
        place_encoders(parts, "cpu")
        # persistent workers: a small synthetic set must not pay a worker start every few steps
        cache_loader, _ = make_dataloader(CachedPairs(cache, pairs.transform), args.batch_size,
                                          args.loader_workers, 0, pin_memory=cuda, persistent_workers=True)
        pixel_loader, _ = make_dataloader(pairs, args.batch_size, args.loader_workers, 0, pin_memory=cuda,
                                          persistent_workers=True)
        data = {"cache_loader": cache_loader, "pixel_loader": pixel_loader, "dtype": dtype,
                "encoder": OnTheFlyEncoder(parts, dtype),
                "unet_factory": unet_factory(args, device)}
        # model FLOPs: one plain forward + backward (no checkpointing) on a fresh UNet
        probe = expand_conv_in(data["unet_factory"](), 8).to(device).train()
        batch = cached_batch({k: v.to(device) for k, v in next(iter(cache_loader)).items()}, device, dtype)
        with accelerator.autocast():
            flops = model_flops_per_step(probe, batch, parts)
        del probe
        gc.collect()
        peak = gpu_peak_flops(device)
        emit({"variant": "cache_build", "family": args.family, "samples_per_s": num_samples / build_s,
              "model_tflop_per_sample": flops / args.batch_size / 1e12}, args.output_json)
        for name in names:
            emit(run_variant(name, VARIANTS[name], accelerator, parts, data, args, flops, peak), args.output_json)
        emit({"variant": "cache_loader_only", "samples_per_s": loader_rate(cache_loader, 50),
              "loader_workers": args.loader_workers}, args.output_json)


def bucket_shape(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT -> (height, width)."""
    w, h = (int(x) for x in text.lower().split("x"))
    return h, w


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (64, fp32)")
    parser.add_argument("--family", choices=("sdxl", "sd15"), default="sdxl",
                        help="the architecture: SDXL (default) or SD 1.5 (the step only, not --loop)")
    parser.add_argument("--resolution", type=int, default=None, help="default 1024, SD 1.5 512 (tiny: 64)")
    parser.add_argument("--batch_size", type=int, default=4, help="the step's batch (--loop: the recipe's)")
    parser.add_argument("--bucket", default=None, metavar="WIDTHxHEIGHT",
                        help="the step at one aspect-ratio bucket instead of the --resolution square")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per variant (default 10); --loop: optimizer steps of the run (default 30)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (compiled variants compile in the first)")
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                        help="default bf16 on CUDA, no on the CPU (--loop: the recipe's)")
    parser.add_argument("--variants", default=None, help=f"comma-separated, from {', '.join(VARIANTS)}; default: "
                        "all but the compile_full ones (a full compile of the SDXL UNet takes minutes: over 4.5 "
                        "on an H200) and, on the CPU, torchao8bit (its step compiles for ~2 minutes there)")
    parser.add_argument("--num_samples", type=int, default=None,
                        help="synthetic pairs (default 32; --loop: one epoch of --steps)")
    parser.add_argument("--loader_workers", type=int, default=4, help="the step's DataLoader workers")
    parser.add_argument("--output_json", default=None, help="also write the rows to this JSONL file (replaced)")
    loop = parser.add_argument_group("--loop: the real training loop through ./train.sh")
    loop.add_argument("--loop", action="store_true", help="time ./train.sh instead of the step")
    loop.add_argument("--loop_flags", default="", help='more trainer flags, one string: "--torch_compile '
                      '--optimizer adamw" (they override the recipe and everything above)')
    loop.add_argument("--logging_steps", type=int, default=10,
                      help="the trainer's --logging_steps: the figures' intervals (default 10, as the GPU recipes)")
    loop.add_argument("--model", default=None, help="an existing model folder (default: one is built)")
    loop.add_argument("--num_gpus", type=int, default=1,
                      help="GPUs for the run, unless $ACCELERATE_CONFIG is set (default 1: figures per GPU)")
    loop.add_argument("--timeout", type=float, default=1800, help="seconds the training run may take")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--loop_flags" in argv[:-1]:  # its value starts with "--": argparse would take it for a flag of ours
        i = argv.index("--loop_flags")
        argv[i:i + 2] = [f"--loop_flags={argv[i + 1]}"]
    args = parser.parse_args(argv)
    if args.bucket:
        try:
            h, w = bucket_shape(args.bucket)
        except ValueError:
            parser.error(f"--bucket {args.bucket} is not WIDTHxHEIGHT (e.g. 832x1216)")
        if args.loop or h % 8 or w % 8 or h <= 0 or w <= 0:
            parser.error(f"--bucket {args.bucket}: the step only (not --loop), sides positive multiples of 8 "
                         "(of 32 for SDXL, 64 for SD 1.5, 16 for the tiny model)")

    cuda = torch.cuda.is_available() and not args.tiny
    args.resolution = args.resolution or (64 if args.tiny else 1024 if args.family == "sdxl" else 512)
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    if args.output_json:
        Path(args.output_json).write_text("")
    if not args.loop:
        args.steps = args.steps or 10
        skip = ("compile_full",) if cuda else ("compile_full", "torchao")
        names = args.variants.split(",") if args.variants else [v for v in VARIANTS if not any(s in v for s in skip)]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        run_steps(args, names, cuda)
        return 0
    args.steps = args.steps or 30
    if args.family != "sdxl":
        parser.error("--loop times the SDXL recipe; --family sd15 times the step")
    if args.steps < 2 * args.logging_steps:
        parser.error("--loop needs --steps of 2 x --logging_steps at least: the first interval holds the warm-up")
    if not cuda and not args.tiny:
        parser.error("--loop without --tiny needs a CUDA GPU (SDXL at 1024)")
    from throughput_loop import LoopError, run_loop  # beside this file

    # stopped (gpu_check.sh's timeout), this process ends the training run first
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        emit(run_loop(args, cuda, torch.cuda.get_device_name(0) if cuda else "cpu"), args.output_json)
    except UserError as e:  # --loop_flags the trainer would refuse
        print(f"error: --loop_flags: {e}", file=sys.stderr)
        return 2
    except LoopError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
