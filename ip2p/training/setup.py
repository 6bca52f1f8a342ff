"""Training set-up: the accelerator, the models' placement and precision, the cache, the optimizer.

Everything the loop in ip2p/training/loop.py needs before its first step, as small functions.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ip2p.dtypes import DTYPES
from ip2p.errors import UserError
from ip2p.method import expand_conv_in
from ip2p.training.cache import CacheBuild, CachedPairs, LatentCache, build_cache, cache_key
from ip2p.training.config import TrainConfig, optimizer_name
from ip2p.training.hub import requested_trackers
from ip2p.training.lora import LoraSettings, attach_lora, cast_frozen


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    log_with = requested_trackers(cfg.report_to) or None
    return Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / cfg.logging_dir)),
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
        kwargs_handlers=[ddp_kwargs(cfg)],
    )


def enable_attention(unet, want_xformers: bool) -> str:
    """xformers when asked for and working, else PyTorch SDPA (the default) with a warning."""
    if not want_xformers:
        return "sdpa"
    try:
        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    except Exception as e:  # missing package, no kernels for this torch/GPU, CPU tensors, ...
        warnings.warn(f"xformers unavailable ({str(e).splitlines()[0][:120]}); using PyTorch SDPA attention")
        return "sdpa"


def prepare_models(parts, cfg: TrainConfig, device, weight_dtype: torch.dtype) -> bool:
    """Freeze the encoders, widen and configure the UNet (with --lora_rank: freeze it and add the
    adapters), put everything on the device. Returns whether conv_in trains."""
    for frozen in parts.encoders:
        frozen.requires_grad_(False).eval()
    vae_dtype = weight_dtype if cfg.pretrained_vae_model_name_or_path else DTYPES[cfg.vae_precision]
    for module, dtype in ((parts.vae, vae_dtype), *((encoder, weight_dtype) for encoder in parts.text_encoders)):
        if module.dtype != dtype:
            module.to(dtype=dtype)
    widened = parts.unet.conv_in.in_channels != 8
    unet = expand_conv_in(parts.unet, 8)
    conv_in_trains = True
    if cfg.lora_rank:
        conv_in_trains = attach_lora(unet, LoraSettings.from_config(cfg), widened)
        cast_frozen(unet, weight_dtype)
    else:
        unet.requires_grad_(True)
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    enable_attention(unet, cfg.enable_xformers_memory_efficient_attention)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
        if cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    return conv_in_trains


def place_encoders(parts, device) -> None:
    for module in parts.encoders:
        module.to(device)


def open_cache(accelerator, cfg: TrainConfig, hf_dataset, parts, pairs, dtype) -> CachedPairs:
    """The cache entry for this data, encoders and crop policy: reused when complete, else built.

    While training from the cache the encoders stay on the CPU; validation borrows the GPU.
    """
    key, key_parts = shared_cache_key(accelerator, hf_dataset, parts, cfg, dtype, pairs.targets)
    root = Path(cfg.latent_cache_dir or Path(cfg.output_dir) / "latent_cache")
    cache = LatentCache(root, key, len(hf_dataset), orientations=2 if cfg.random_flip else 1,
                        shard_size=cfg.latent_cache_shard_size)
    if cache.is_complete():
        accelerator.print(f"latent cache: reusing {cache.dir} ({cache.num_samples} samples); the encoders are not run")
    else:
        todo = len(cache.missing_shards())
        accelerator.print(f"latent cache: encoding {todo} of {cache.num_shards} shards into {cache.dir} "
                          f"({cache.orientations} orientation(s) per sample, {accelerator.num_processes} processes)")
        place_encoders(parts, accelerator.device)
        how = CacheBuild(parts, dtype, cfg.train_batch_size, cfg.dataloader_num_workers)
        build_cache(accelerator, cache, pairs, how, key_parts)
        place_encoders(parts, "cpu")
    return CachedPairs(cache, pairs.transform)


def shared_cache_key(accelerator, hf_dataset, parts, cfg: TrainConfig, dtype, targets=None) -> tuple[str, dict]:
    """The cache key, computed once on the main process (it reads every row and every encoder
    weight) and sent to the others."""
    key = (cache_key(hf_dataset, parts, cfg, dtype, log=accelerator.print, targets=targets)
           if accelerator.is_main_process else None)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        key = broadcast_object_list([key])[0]
    return key


def make_optimizer(cfg: TrainConfig, params, lr: float, device):
    """AdamW with the diffusers flags' hyperparameters, in the implementation --optimizer names.

    Only torch's fused AdamW can skip a non-finite step on the device (`found_inf`, as under a
    GradScaler); see `ip2p.training.step.skip_nonfinite_on_device`."""
    name = optimizer_name(cfg)
    kwargs = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                  eps=cfg.adam_epsilon)
    if name == "adamw8bit":
        if device.type != "cuda":
            raise UserError("--use_8bit_adam (--optimizer adamw8bit) needs a CUDA GPU (bitsandbytes); use "
                            "--optimizer adamw on this machine")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    if name == "adamw8bit_torchao":
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            raise UserError("--optimizer adamw8bit_torchao needs torchao: pip install torchao") from None
        return AdamW8bit(params, **kwargs)
    # fused on the CPU too (torch >= 2.4): the same kernel, and the same device-side skip, as on CUDA
    return torch.optim.AdamW(params, fused=True, **kwargs)


def compile_unet(unet, mode: str):
    """--torch_compile: `regional` compiles the repeated transformer block (diffusers'
    `compile_repeated_blocks`: one compilation reused by every block, so a fraction of the whole
    UNet's compile time); `full` the whole UNet. Both compile lazily, on the first step."""
    if mode == "regional":
        unet.compile_repeated_blocks()
        return unet
    return torch.compile(unet)


def ddp_kwargs(cfg: TrainConfig):
    """DDP for this model: gradients as views into the all-reduce buckets (no second copy of every
    gradient: 10.3 GB for the SDXL UNet in fp32), the bucket size, and a static graph (every
    parameter gets a gradient every step, so DDP can plan its all-reduces once) where it is valid:
    not under gradient accumulation, where DDP's static graph meets `no_sync()` and fails its first
    backward, or once past that, stops all-reducing (pytorch#143580, accelerate#3679)."""
    from accelerate.utils import DistributedDataParallelKwargs

    static = cfg.ddp_static_graph and cfg.gradient_accumulation_steps == 1
    return DistributedDataParallelKwargs(gradient_as_bucket_view=True, static_graph=static,
                                         bucket_cap_mb=cfg.ddp_bucket_cap_mb)


class MetricsLog:
    """OUTPUT_DIR/logs/metrics.jsonl: one JSON object per optimizer step (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        if self.enabled and self.path.exists():
            rows = [r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
            self.path.write_text("".join(r + "\n" for r in rows))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def peak_memory_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def batch_arithmetic(cfg: TrainConfig, num_processes: int) -> tuple[int, float]:
    """Global batch (samples per optimizer step) and the learning rate after --scale_lr."""
    total = cfg.train_batch_size * num_processes * cfg.gradient_accumulation_steps
    return total, cfg.learning_rate * total if cfg.scale_lr else cfg.learning_rate


def bucket_sampler(accelerator, cfg: TrainConfig, hf_dataset, parts, pairs):
    """With --aspect_ratio_buckets: each sample's bucket (from its input photo's header), the pairs
    told their target shapes, and the batch sampler; returns it and the buckets.json summary."""
    from ip2p.models import vae_scale_factor
    from ip2p.training import buckets as bk
    from ip2p.training.pairs import image_sizes

    multiple = bk.side_multiple(vae_scale_factor(parts.vae), len(parts.unet.config.block_out_channels))
    if cfg.bucket_list:
        listed, source = bk.read_bucket_list(cfg.bucket_list), cfg.bucket_list
        bk.check_sides(listed, multiple, f"--bucket_list {cfg.bucket_list}")
    else:
        listed = bk.default_buckets(cfg.resolution, multiple)
        source = f"around {cfg.resolution}², sides multiples of {bk.bucket_step(cfg.resolution, multiple)}"
    sizes = image_sizes(hf_dataset, cfg.original_image_column)
    assignment = bk.assign(sizes, listed, cfg.train_batch_size)
    pairs.use_buckets([listed[b] for b in assignment.of_sample])
    sampler = bk.BucketBatchSampler(assignment, cfg.train_batch_size, cfg.seed or 0, accelerator.num_processes)
    return sampler, bk.summary(assignment, source, cfg.resolution, sampler.repeats_per_epoch())
