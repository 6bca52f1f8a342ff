"""The training loop, in one fixed order.

    setup -> data -> optimizer and schedule -> resume -> for each micro-batch:
        encode (on the fly) -> forward_loss -> backward -> [optimizer step]
        after a real optimizer step only: LR step, EMA, log, checkpoint, validation
    -> final pipeline + model card (main process)

`global_step` counts optimizer steps everywhere: the LR schedule, logs, checkpoints, validation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ip2p.training import checkpoint as ckpt
from ip2p.training.cache import cached_batch
from ip2p.training.config import TrainConfig, silent_default_warnings, to_dict, write_resolved
from ip2p.training.pairs import (
    TrainPairs,
    load_splits,
    make_dataloader,
    repeats_per_epoch,
    steps_per_epoch,
    upscale_warning,
)
from ip2p.training.encode import OnTheFlyEncoder
from ip2p.errors import UserError
from ip2p.training.guards import (
    EXIT_PREEMPTED,
    NonFiniteGuard,
    StopOnSignal,
    check_free_space,
    checkpoint_bytes_estimate,
)
from ip2p.training.heldout import encode_heldout, heldout_losses
from ip2p.training.hub import check_hub_access, push_to_hub
from ip2p.models import load_parts, vae_scale_factor
from ip2p.training.model_card import write_model_card
from ip2p.training.step import train_micro_step
from ip2p.training.setup import (
    DTYPES,
    MetricsLog,
    batch_arithmetic,
    make_accelerator,
    compile_unet,
    make_optimizer,
    open_cache,
    peak_memory_gib,
    place_encoders,
    prepare_models,
)
from ip2p.training.validation import Validator, load_validation_pairs, log_grid

def train(cfg: TrainConfig) -> int:
    """Train; returns the exit code (0, or 75 when stopped by a signal after a checkpoint)."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    device = accelerator.device
    if accelerator.distributed_type.value == "FSDP":
        raise UserError("the trainer runs under DDP or DeepSpeed ZeRO-2, not FSDP yet (its validation and final "
                        "save need the whole UNet on one process); write a config with "
                        "./setup_accelerate.sh --backend deepspeed (or ddp)")
    weight_dtype = DTYPES[accelerator.mixed_precision]
    if main:  # before anything long starts (the cache build can take hours)
        for warning in silent_default_warnings(cfg):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    if cfg.seed is not None:
        from accelerate.utils import set_seed

        set_seed(cfg.seed, device_specific=True)  # different noise on each rank, reproducible

    # --- models, data, validation inputs (all user errors surface here, before anything is written)
    hub_repo = check_hub_access(cfg, output_dir) if cfg.push_to_hub and main else None
    validation_pairs = load_validation_pairs(cfg)
    resume_path = ckpt.resolve_resume(cfg.resume_from_checkpoint, output_dir)
    hf_dataset, heldout_dataset = main_process_first(accelerator, lambda: load_splits(cfg))
    if main and (warning := upscale_warning(hf_dataset, cfg)):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    parts = load_parts(cfg)
    prepare_models(parts, cfg, device, weight_dtype)
    pairs = TrainPairs(hf_dataset, cfg, (parts.tokenizer, parts.tokenizer_2))
    if cfg.cache_latents:
        train_set = open_cache(accelerator, cfg, hf_dataset, parts, pairs, weight_dtype)
        produce = functools.partial(cached_batch, dtype=weight_dtype)
    else:
        place_encoders(parts, device)
        train_set = pairs
        produce = OnTheFlyEncoder(parts.vae, parts.text_encoder, parts.text_encoder_2, cfg.resolution, weight_dtype)
    heldout = encode_heldout_split(cfg, parts, heldout_dataset, device, weight_dtype) if main else None
    loader, sampler = make_dataloader(train_set, cfg.train_batch_size, cfg.dataloader_num_workers,
                                      cfg.seed or 0, pin_memory=device.type == "cuda")
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, output_dir)

    # --- optimizer, schedule, EMA
    total_batch_size, lr = batch_arithmetic(cfg, accelerator.num_processes)
    unet = parts.unet
    optimizer = make_optimizer(cfg, unet.parameters(), lr, device)
    ema = None
    if cfg.use_ema:
        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=type(unet), model_config=unet.config)
    if cfg.torch_compile:  # after the optimizer took the parameters, before DDP wraps the UNet
        unet = compile_unet(unet, cfg.torch_compile_mode)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    spe = steps_per_epoch(len(loader), cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * spe
    num_epochs = math.ceil(max_steps / spe)
    micro_batch = cfg.train_batch_size * accelerator.num_processes
    # The schedule is stepped once per optimizer step by this loop (not by accelerate, which
    # would step it num_processes times: diffusers#8312), so its lengths are optimizer steps.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps)
    state = ckpt.TrainState(0, accelerator.num_processes, total_batch_size)
    accelerator.register_for_checkpointing(lr_scheduler, state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    metrics = MetricsLog(output_dir / "logs" / "metrics.jsonl", main)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        if state.num_processes != accelerator.num_processes:
            accelerator.print(
                f"note: {resume_path} was written by {state.num_processes} processes, this run has "
                f"{accelerator.num_processes}: the weights, optimizer and LR schedule continue exactly; the place in "
                "the data is converted through the samples seen (at most one micro-batch repeats); the noise differs "
                "from an unbroken run")
        metrics.truncate_after(state.global_step)  # rows a crashed run logged after its checkpoint
        accelerator.print(f"resumed from {resume_path} at optimizer step {state.global_step}")
    elif cfg.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint in {output_dir} yet; starting a new run")
    if ema is not None:
        # only now: load_state loads registered objects to the CPU and EMAModel keeps them there, so
        # an EMA placed before it would mix a CUDA parameter with a CPU shadow at its first step
        ema.to(device)

    if main:
        tracker_config = {k: v for k, v in to_dict(cfg).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(cfg.tracker_project_name, config=tracker_config)
    accelerator.print(
        f"{len(hf_dataset)} pairs | {accelerator.num_processes} processes x {cfg.train_batch_size} per device x "
        f"{cfg.gradient_accumulation_steps} accumulation = {total_batch_size} per optimizer step | lr {lr:g} | "
        f"{spe} optimizer steps per epoch, {max_steps} in all ({num_epochs} epochs)")
    repeats = repeats_per_epoch(len(train_set), cfg.train_batch_size, accelerator.num_processes)
    if repeats:
        accelerator.print(f"each epoch's last round of micro-batches is filled up with {repeats} samples from the "
                          f"start of the epoch ({accelerator.num_processes} processes x {cfg.train_batch_size} "
                          "do not divide the data): they are seen twice in that epoch")

    validator = Validator(cfg, parts, validation_pairs, weight_dtype) if validation_pairs else None
    dropout_p = cfg.conditioning_dropout_prob or 0.0
    scaling = parts.vae.config.scaling_factor
    bar = tqdm(total=max_steps, initial=state.global_step, disable=not main, desc="optimizer steps")
    last_grid = None
    loss_sum, micro_steps, t0 = torch.zeros((), device=device), 0, time.perf_counter()

    stop = StopOnSignal()
    if cfg.cache_latents:
        state.replaced_samples = train_set.cache.replaced_samples()
    replaced = torch.zeros((), device=device, dtype=torch.long)
    last_checkpoint = resume_path
    nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps or 10**9, device, state.skipped_steps, state.global_step)
    compile_clock = CompileClock(cfg.torch_compile and main, cfg.torch_compile_mode)
    epoch, skip = ckpt.resume_position(state, micro_batch, len(loader))
    state.num_processes, state.total_batch_size, state.micro_batch = (
        accelerator.num_processes, total_batch_size, micro_batch)
    while state.global_step < max_steps:
        sampler.use_epoch(epoch)
        train_set.use_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        state.epoch, state.batches_in_epoch = epoch, skip
        for batch in epoch_loader:
            if "replaced" in batch:  # encoding on the fly: samples that failed to decode
                replaced += batch["replaced"].sum()
            with accelerator.accumulate(unet):
                loss, skipped = train_micro_step(accelerator, unet, optimizer, produce(batch, device),
                                                 parts.noise_scheduler, scaling, dropout_p, cfg.max_grad_norm,
                                                 skip_nonfinite=cfg.max_nonfinite_steps > 0)
            loss_sum += loss
            micro_steps += 1
            state.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue

            # --- after a real optimizer step only; the host reads nothing from the GPU here but
            # once per logging interval (and before a checkpoint)
            lr_scheduler.step()
            if ema is not None:
                ema.step(unet.parameters())
            state.global_step += 1
            step = state.global_step
            nonfinite.update(skipped)
            bar.update(1)
            compile_clock.first_step_done(bar)
            stopping = stop.requested(accelerator)
            log_now = step % cfg.logging_steps == 0 or step >= max_steps or stopping
            save_now = step % cfg.checkpointing_steps == 0 or stopping
            if log_now or save_now:
                state.skipped_steps = nonfinite.check(step, last_checkpoint)
                if not cfg.cache_latents:
                    state.replaced_samples += int(accelerator.reduce(replaced, reduction="sum").item())
                    replaced.zero_()
            if log_now:
                row = log_step(accelerator, cfg, metrics, lr_scheduler, epoch, step, loss_sum / micro_steps,
                               micro_steps, t0, state)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                samples_s=f"{row['samples_per_s']:.2f}", peak_gib=f"{row['peak_memory_gib']:.1f}")
                loss_sum.zero_()
                micro_steps, t0 = 0, time.perf_counter()

            busy = time.perf_counter()  # checkpoints and validation are left out of the rate
            if save_now:
                check_replicas(accelerator, unet)
                check_free_space(accelerator, output_dir, step, checkpoint_bytes_estimate(last_checkpoint, unet, ema))
                last_checkpoint = ckpt.save_checkpoint(accelerator, output_dir, state, cfg.checkpoints_total_limit)
            if stopping:
                accelerator.print(f"stopped by {stop.received or 'a signal on another process'} at optimizer step "
                                  f"{step}, after saving {last_checkpoint}; run the same command with "
                                  "--resume_from_checkpoint latest to continue")
                accelerator.end_training()
                return EXIT_PREEMPTED
            if main and step % cfg.validation_steps == 0:
                last_grid = validate(accelerator, validator, heldout, parts, unet, ema, step, output_dir) or last_grid
            t0 += time.perf_counter() - busy
            if step >= max_steps:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    stop.restore()

    check_replicas(accelerator, unet)
    accelerator.wait_for_everyone()
    if main:
        if state.global_step % cfg.validation_steps:  # the last step had no validation yet
            last_grid = validate(accelerator, validator, heldout, parts, unet, ema, state.global_step,
                                 output_dir) or last_grid
        save_pipeline(cfg, parts, accelerator.unwrap_model(unet, keep_torch_compile=False), ema, output_dir)
        write_model_card(output_dir, cfg, state, len(hf_dataset), last_grid)
    # end_training destroys the process group: every rank must get there together. A rank that tore
    # its gloo group down while the main one was still saving hung at exit (joining gloo's threads).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if main:
        accelerator.print(f"saved the InstructPix2Pix pipeline to {output_dir.resolve()}")
        if hub_repo:  # after the teardown: an upload may outlast a collective's timeout
            return push_to_hub(cfg, output_dir, hub_repo)
    return 0


def main_process_first(accelerator, load):
    """`load()` on the main process, then on the others (it may prepare files they reuse). A user
    error on the main process still releases the others, which then meet the same error and stop
    with it, instead of breaking on a barrier whose peer has gone."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = load()
        except UserError as e:
            error = e
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        result = load()
    if error is not None:
        raise error
    return result


def check_replicas(accelerator, unet) -> None:
    """Every process must hold the same weights (gradients synchronised); a divergence stops the run."""
    if accelerator.num_processes == 1:
        return
    fingerprint = torch.stack([p.detach().float().sum() for p in unet.parameters()])
    everyone = accelerator.gather(fingerprint[None])
    if not torch.equal(everyone, everyone[:1].expand_as(everyone)):
        raise RuntimeError("the UNet weights differ between processes: gradients were not synchronised")
    accelerator.print(f"weights identical on all {accelerator.num_processes} processes "
                      f"(fingerprint {everyone[0].double().sum().item():.6e})")


class CompileClock:
    """--torch_compile: print how long the first optimizer step took, compilation included (it
    happens on the host, on the first call, so the host's clock measures it)."""

    def __init__(self, enabled: bool, mode: str):
        self.enabled, self.mode, self.t0 = enabled, mode, time.perf_counter()

    def first_step_done(self, bar) -> None:
        if self.enabled:
            self.enabled = False
            bar.write(f"torch.compile ({self.mode}): the first optimizer step took "
                      f"{time.perf_counter() - self.t0:.1f} s, compilation included")


def log_step(accelerator, cfg, metrics, lr_scheduler, epoch: int, step: int, loss: torch.Tensor,
             micro_steps: int, t0: float, state) -> dict:
    """Read the loss (a host synchronisation), mean over processes; write metrics.jsonl. The clock
    is read after the loss: the host runs ahead of the GPU, and the rate must count the GPU's work."""
    loss_value = accelerator.reduce(loss, reduction="mean").item()
    elapsed = time.perf_counter() - t0
    row = {"step": step, "epoch": epoch, "loss": loss_value, "lr": float(lr_scheduler.get_last_lr()[0]),  # a tensor for torchao
           "samples_per_s": micro_steps * cfg.train_batch_size * accelerator.num_processes / elapsed,
           "peak_memory_gib": peak_memory_gib(accelerator.device),
           "skipped_steps": state.skipped_steps, "replaced_samples": state.replaced_samples}
    metrics.write(row)
    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
    return row


def encode_heldout_split(cfg: TrainConfig, parts, heldout_dataset, device, dtype):
    """The held-out pairs, encoded once on the main process (centre crops, no flips)."""
    if heldout_dataset is None:
        return None
    fixed = dataclasses.replace(cfg, center_crop=True, random_flip=False)
    pairs = TrainPairs(heldout_dataset, fixed, (parts.tokenizer, parts.tokenizer_2))
    home = parts.vae.device
    place_encoders(parts, device)
    encoder = OnTheFlyEncoder(parts.vae, parts.text_encoder, parts.text_encoder_2, cfg.resolution, dtype)
    heldout = encode_heldout(pairs, encoder, parts.noise_scheduler.config.num_train_timesteps)
    place_encoders(parts, home)
    print(f"held-out loss on {len(pairs)} pairs of the '{cfg.validation_split}' split at each validation")
    return heldout


def validate(accelerator, validator, heldout, parts, unet, ema, step: int, output_dir: Path) -> str | None:
    """Held-out losses and validation images, with the EMA weights when there are any; then the
    trained weights go back. Returns the grid's path relative to the output folder."""
    if validator is None and heldout is None:
        return None
    model = accelerator.unwrap_model(unet, keep_torch_compile=False)  # --torch_compile_mode full: sample eagerly
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    grid = None
    if heldout is not None:
        losses = heldout_losses(model, heldout, parts.noise_scheduler, parts.vae.config.scaling_factor,
                                DTYPES[accelerator.mixed_precision])
        MetricsLog(output_dir / "logs" / "heldout.jsonl", True).write({"step": step, **losses})
        accelerator.log(losses, step=step)
    if validator is not None:
        grid = validator.render(model, step)
    if ema is not None:
        ema.restore(model.parameters())
    return str(log_grid(accelerator, grid, step, output_dir).relative_to(output_dir)) if grid else None


def save_pipeline(cfg: TrainConfig, parts, unet, ema, output_dir: Path) -> None:
    """The final StableDiffusionXLInstructPix2PixPipeline folder (safetensors), loadable as is."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInstructPix2PixPipeline

    if ema is not None:
        ema.copy_to(unet.parameters())
    # The pipeline's default output size is sample_size * 8: make it the training resolution.
    unet.register_to_config(sample_size=cfg.resolution // vae_scale_factor(parts.vae))
    unet = unet.to(memory_format=torch.contiguous_format)
    if unet.dtype != DTYPES[cfg.save_dtype]:
        unet = unet.to(DTYPES[cfg.save_dtype])
    scheduler = EulerDiscreteScheduler.from_pretrained(
        cfg.pretrained_model_name_or_path, subfolder="scheduler", revision=cfg.revision)
    pipeline = StableDiffusionXLInstructPix2PixPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=unet, scheduler=scheduler)
    pipeline.save_pretrained(output_dir, safe_serialization=True)
