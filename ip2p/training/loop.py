"""The training loop, in one fixed order, as phases that share a `Run`.

    start_run: setup -> data -> optimizer and schedule -> resume -> trackers
    train_epoch, for each epoch: for each micro-batch:
        encode (on the fly) -> forward_loss -> backward -> [optimizer step]
        after_optimizer_step, after a real optimizer step only: LR step, EMA, log, checkpoint, validation
    finish: final validation, pipeline + model card (main process), teardown, hub upload

`global_step` counts optimizer steps everywhere: the LR schedule, logs, checkpoints, validation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ip2p.errors import UserError
from ip2p.method import expand_conv_in
from ip2p.models import describe_start, instruct_pix2pix_pipeline, load_parts, load_unet, vae_scale_factor
from ip2p.training import checkpoint as ckpt
from ip2p.training.buckets import table as bucket_table
from ip2p.training.buckets import write_summary as write_bucket_summary
from ip2p.training.cache import cached_batch
from ip2p.training.config import TrainConfig, silent_default_warnings, to_dict, write_resolved
from ip2p.training.encode import OnTheFlyEncoder
from ip2p.training.guards import (
    EXIT_PREEMPTED,
    NonFiniteGuard,
    StopOnSignal,
    check_free_space,
    checkpoint_bytes_estimate,
)
from ip2p.training.heldout import encode_heldout, heldout_losses
from ip2p.training.hub import check_hub_access, push_to_hub
from ip2p.training.lora import LoraSettings, merged_unet, register_checkpoint_hooks, save_adapter
from ip2p.training.model_card import write_model_card
from ip2p.training.pairs import (
    TrainPairs,
    image_sizes,
    load_splits,
    make_dataloader,
    repeats_per_epoch,
    steps_per_epoch,
    upscale_warning,
)
from ip2p.training.setup import (
    DTYPES,
    MetricsLog,
    batch_arithmetic,
    bucket_sampler,
    compile_unet,
    make_accelerator,
    make_optimizer,
    open_cache,
    peak_memory_gib,
    place_encoders,
    prepare_models,
)
from ip2p.training.step import Objective, is_deepspeed, train_micro_step
from ip2p.training.validation import Validator, load_validation_pairs, log_grid


def train(cfg: TrainConfig) -> int:
    """Train; returns the exit code (0, or 75 when stopped by a signal after a checkpoint)."""
    run = start_run(cfg)
    epoch, skip = run.start
    while run.state.global_step < run.max_steps:
        if train_epoch(run, epoch, skip):
            return EXIT_PREEMPTED
        epoch, skip = epoch + 1, 0
    return finish(run)


@dataclasses.dataclass
class Run:
    """What the phases of one run share: filled in by start_run, advanced by train_epoch, closed by finish."""

    cfg: TrainConfig
    accelerator: Any
    output_dir: Path
    weight_dtype: torch.dtype
    # inputs (load_inputs)
    hub_repo: Any = None
    validation_pairs: Any = None
    resume_path: Path | None = None
    num_pairs: int = 0
    parts: Any = None
    train_set: Any = None
    encode_batch: Any = None  # a DataLoader batch -> EncodedBatch: the cache reader or the encoders
    heldout: Any = None
    buckets: Any = None  # the bucket list, (height, width) each, with --aspect_ratio_buckets
    loader: Any = None
    sampler: Any = None
    # optimisation (build_optimizer, resume)
    unet: Any = None
    trainable: list | None = None  # the parameters that train: all of the UNet's, or LoRA's adapters (+ conv_in)
    conv_in_trains: bool = True
    optimizer: Any = None
    ema: Any = None
    lr_scheduler: Any = None
    state: ckpt.TrainState | None = None
    metrics: MetricsLog | None = None
    total_batch_size: int = 0
    lr: float = 0.0
    steps_per_epoch: int = 0
    max_steps: int = 0
    micro_batch: int = 0
    # the loop (start_loop)
    validator: Validator | None = None
    objective: Objective | None = None
    bar: Any = None
    stop: StopOnSignal | None = None
    nonfinite: NonFiniteGuard | None = None
    compile_clock: CompileClock | None = None
    replaced: torch.Tensor | None = None  # encoding on the fly: samples that failed to decode, since the last read
    loss_sum: torch.Tensor | None = None  # since the last log line
    micro_steps: int = 0
    t0: float = 0.0  # the rate's clock, moved on past checkpoints and validation
    last_checkpoint: Path | None = None
    last_grid: str | None = None
    start: tuple[int, int] = (0, 0)  # (epoch, micro-batches to skip)


def start_run(cfg: TrainConfig) -> Run:
    """Everything before the first micro-batch, in order; all user errors surface here."""
    accelerator = make_accelerator(cfg)
    if accelerator.distributed_type.value == "FSDP":
        raise UserError("the trainer runs under DDP or DeepSpeed ZeRO-2, not FSDP yet (its validation and final "
                        "save need the whole UNet on one process); write a config with "
                        "./setup_accelerate.sh --backend deepspeed (or ddp)")
    if cfg.lora_rank and accelerator.distributed_type.value == "DEEPSPEED":
        raise UserError("--lora_rank runs under DDP, not DeepSpeed (ZeRO-2 shards optimizer states, which for an "
                        "adapter are megabytes, and would checkpoint the whole UNet); write a config with "
                        "./setup_accelerate.sh --backend ddp")
    run = Run(cfg, accelerator, Path(cfg.output_dir), DTYPES[accelerator.mixed_precision])
    if accelerator.is_main_process:  # before anything long starts (the cache build can take hours)
        for warning in silent_default_warnings(cfg):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    if cfg.seed is not None:
        from accelerate.utils import set_seed

        set_seed(cfg.seed, device_specific=True)  # different noise on each rank, reproducible
    load_inputs(run)
    build_optimizer(run)
    resume(run)
    announce(run)
    start_loop(run)
    return run


def load_inputs(run: Run) -> None:
    """Models, data, validation inputs (all user errors surface here, before anything is written)."""
    cfg, accelerator, output_dir, weight_dtype = run.cfg, run.accelerator, run.output_dir, run.weight_dtype
    main, device = accelerator.is_main_process, accelerator.device
    run.hub_repo = check_hub_access(cfg, output_dir) if cfg.push_to_hub and main else None
    run.validation_pairs = load_validation_pairs(cfg)
    run.resume_path = ckpt.resolve_resume(cfg.resume_from_checkpoint, output_dir)
    hf_dataset, heldout_dataset = main_process_first(accelerator, lambda: load_splits(cfg))
    run.num_pairs = len(hf_dataset)
    run.parts = parts = load_parts(cfg)
    accelerator.print(f"model: {describe_start(parts)}")
    run.conv_in_trains = prepare_models(parts, cfg, device, weight_dtype)
    pairs = TrainPairs(hf_dataset, cfg, parts.tokenizers)
    batch_sampler = buckets = None
    if cfg.aspect_ratio_buckets:  # before the cache: the pairs' shapes are their buckets'
        batch_sampler, buckets = bucket_sampler(accelerator, cfg, hf_dataset, parts, pairs)
        run.buckets = batch_sampler.assignment.buckets
        accelerator.print(bucket_table(buckets))
    if main and (warning := upscale_warning(hf_dataset, cfg, pairs.targets)):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if cfg.cache_latents:
        run.train_set = open_cache(accelerator, cfg, hf_dataset, parts, pairs, weight_dtype)
        run.encode_batch = functools.partial(cached_batch, dtype=weight_dtype)
    else:
        place_encoders(parts, device)
        run.train_set = pairs
        run.encode_batch = OnTheFlyEncoder(parts, weight_dtype)
    run.heldout = encode_heldout_split(cfg, parts, heldout_dataset, device, weight_dtype, run.buckets) if main else None
    run.loader, run.sampler = make_dataloader(run.train_set, cfg.train_batch_size, cfg.dataloader_num_workers,
                                              cfg.seed or 0, pin_memory=device.type == "cuda",
                                              batch_sampler=batch_sampler)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, output_dir)
        if buckets is not None:
            write_bucket_summary(output_dir / "logs" / "buckets.json", buckets)


def build_optimizer(run: Run) -> None:
    """Optimizer, EMA, compilation, accelerate's wrapping, the LR schedule and the train state."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    cfg, accelerator = run.cfg, run.accelerator
    run.total_batch_size, run.lr = batch_arithmetic(cfg, accelerator.num_processes)
    unet = run.parts.unet
    run.trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, run.trainable, run.lr, accelerator.device)
    if cfg.use_ema:  # over what trains: the whole UNet, or the adapters (+ conv_in)
        run.ema = EMAModel(run.trainable, decay=cfg.ema_decay, model_cls=type(unet), model_config=unet.config)
    if cfg.lora_rank:
        register_checkpoint_hooks(accelerator, unet)
    if cfg.torch_compile:  # after the optimizer took the parameters, before DDP wraps the UNet
        unet = compile_unet(unet, cfg.torch_compile_mode)
    plugin = accelerator.state.deepspeed_plugin if is_deepspeed(accelerator) else None
    if plugin is not None and run.loader.batch_size is None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        # a bucket batch sampler leaves the loader's batch_size unset, from which accelerate would
        # fill DeepSpeed's "auto" micro-batch size (and refuses to): it is --train_batch_size
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
    run.unet, run.optimizer, run.loader = accelerator.prepare(unet, optimizer, run.loader)
    run.steps_per_epoch = steps_per_epoch(len(run.loader), cfg.gradient_accumulation_steps)
    run.max_steps = cfg.max_train_steps or cfg.num_train_epochs * run.steps_per_epoch
    run.micro_batch = cfg.train_batch_size * accelerator.num_processes
    # The schedule is stepped once per optimizer step by this loop (not by accelerate, which
    # would step it num_processes times: diffusers#8312), so its lengths are optimizer steps.
    run.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=run.optimizer,
                                     num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=run.max_steps)
    run.state = ckpt.TrainState(num_processes=accelerator.num_processes)
    accelerator.register_for_checkpointing(run.lr_scheduler, run.state)
    if run.ema is not None:
        accelerator.register_for_checkpointing(run.ema)


def resume(run: Run) -> None:
    """The metrics log, and the checkpoint to continue from, if any."""
    accelerator, state, resume_path = run.accelerator, run.state, run.resume_path
    run.metrics = MetricsLog(run.output_dir / "logs" / "metrics.jsonl", accelerator.is_main_process)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        if state.num_processes != accelerator.num_processes:
            accelerator.print(
                f"note: {resume_path} was written by {state.num_processes} processes, this run has "
                f"{accelerator.num_processes}: the weights, optimizer and LR schedule continue exactly; the place in "
                "the data is converted through the samples seen (at most one micro-batch repeats); the noise differs "
                "from an unbroken run")
        run.metrics.truncate_after(state.global_step)  # rows a crashed run logged after its checkpoint
        accelerator.print(f"resumed from {resume_path} at optimizer step {state.global_step}")
    elif run.cfg.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint in {run.output_dir} yet; starting a new run")
    if run.ema is not None:
        # only now: load_state loads registered objects to the CPU and EMAModel keeps them there, so
        # an EMA placed before it would mix a CUDA parameter with a CPU shadow at its first step
        run.ema.to(accelerator.device)


def announce(run: Run) -> None:
    """Trackers (main process), and the run's arithmetic on the console."""
    cfg, accelerator = run.cfg, run.accelerator
    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in to_dict(cfg).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(cfg.tracker_project_name, config=tracker_config)
    num_epochs = math.ceil(run.max_steps / run.steps_per_epoch)
    accelerator.print(
        f"{run.num_pairs} pairs | {accelerator.num_processes} processes x {cfg.train_batch_size} per device x "
        f"{cfg.gradient_accumulation_steps} accumulation = {run.total_batch_size} per optimizer step | "
        f"lr {run.lr:g} | {run.steps_per_epoch} optimizer steps per epoch, {run.max_steps} in all "
        f"({num_epochs} epochs)")
    if cfg.aspect_ratio_buckets:
        return  # the bucket table said how many samples repeat
    repeats = repeats_per_epoch(len(run.train_set), cfg.train_batch_size, accelerator.num_processes)
    if repeats:
        accelerator.print(f"each epoch's last round of micro-batches is filled up with {repeats} samples from the "
                          f"start of the epoch ({accelerator.num_processes} processes x {cfg.train_batch_size} "
                          "do not divide the data): they are seen twice in that epoch")


def start_loop(run: Run) -> None:
    """The validator, progress bar, counters, guards and the place in the data to start from."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    main, device = accelerator.is_main_process, accelerator.device
    run.validator = (Validator(cfg, run.parts, run.validation_pairs, run.weight_dtype, run.buckets)
                     if run.validation_pairs else None)
    run.objective = Objective(run.parts.noise_scheduler, run.parts.vae.config.scaling_factor,
                              cfg.conditioning_dropout_prob or 0.0, run.parts.family.null_text(run.parts, device))
    run.bar = tqdm(total=run.max_steps, initial=state.global_step, disable=not main, desc="optimizer steps")
    run.loss_sum, run.micro_steps, run.t0 = torch.zeros((), device=device), 0, time.perf_counter()

    run.stop = StopOnSignal()
    if cfg.cache_latents:
        state.replaced_samples = run.train_set.cache.replaced_samples()
    run.replaced = torch.zeros((), device=device, dtype=torch.long)
    run.last_checkpoint = run.resume_path
    run.nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps or 10**9, device, state.skipped_steps, state.global_step)
    run.compile_clock = CompileClock(cfg.torch_compile and main, cfg.torch_compile_mode)
    run.start = ckpt.resume_position(state, run.micro_batch, len(run.loader))
    state.num_processes, state.micro_batch = accelerator.num_processes, run.micro_batch


def train_epoch(run: Run, epoch: int, skip: int) -> bool:
    """One epoch's micro-batches, after the first `skip`; True when a signal stopped the run."""
    accelerator, cfg, state = run.accelerator, run.cfg, run.state
    run.sampler.use_epoch(epoch)
    run.train_set.use_epoch(epoch)
    epoch_loader = accelerator.skip_first_batches(run.loader, skip) if skip else run.loader
    state.epoch, state.batches_in_epoch = epoch, skip
    for batch in epoch_loader:
        if "replaced" in batch:  # encoding on the fly: samples that failed to decode
            run.replaced += batch["replaced"].sum()
        with accelerator.accumulate(run.unet):
            loss, skipped = train_micro_step(accelerator, run.unet, run.optimizer,
                                             run.encode_batch(batch, accelerator.device), run.objective,
                                             cfg.max_grad_norm, skip_nonfinite=cfg.max_nonfinite_steps > 0)
        run.loss_sum += loss
        run.micro_steps += 1
        state.batches_in_epoch += 1
        if not accelerator.sync_gradients:
            continue
        if after_optimizer_step(run, epoch, skipped):
            return True
        if state.global_step >= run.max_steps:
            break
    return False


def after_optimizer_step(run: Run, epoch: int, skipped) -> bool:
    """After a real optimizer step only; the host reads nothing from the GPU here but once per
    logging interval (and before a checkpoint). True when a signal stopped the run (after a
    checkpoint, with the training ended)."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    run.lr_scheduler.step()
    if run.ema is not None:
        run.ema.step(run.trainable)
    state.global_step += 1
    step = state.global_step
    run.nonfinite.update(skipped)
    run.bar.update(1)
    run.compile_clock.first_step_done(run.bar)
    stopping = run.stop.requested(accelerator)
    log_now = step % cfg.logging_steps == 0 or step >= run.max_steps or stopping
    save_now = step % cfg.checkpointing_steps == 0 or stopping
    if log_now or save_now:
        read_counters(run, step)
    if log_now:
        log_step(run, epoch, step)

    busy = time.perf_counter()  # checkpoints and validation are left out of the rate
    if save_now:
        save_checkpoint(run, step)
    if stopping:
        accelerator.print(f"stopped by {run.stop.received or 'a signal on another process'} at optimizer step "
                          f"{step}, after saving {run.last_checkpoint}; run the same command with "
                          "--resume_from_checkpoint latest to continue")
        accelerator.end_training()
        return True
    if accelerator.is_main_process and step % cfg.validation_steps == 0:
        run.last_grid = run_validation(run, step) or run.last_grid
    run.t0 += time.perf_counter() - busy
    return False


def read_counters(run: Run, step: int) -> None:
    """Before a log line or a checkpoint: the non-finite guard (it may stop the run) and the
    samples replaced on the fly, summed over the processes."""
    run.state.skipped_steps = run.nonfinite.check(step, run.last_checkpoint)
    if not run.cfg.cache_latents:
        run.state.replaced_samples += int(run.accelerator.reduce(run.replaced, reduction="sum").item())
        run.replaced.zero_()


def save_checkpoint(run: Run, step: int) -> None:
    """The same weights on every process, room on the disk, then the checkpoint."""
    check_replicas(run.accelerator, run.unet)
    check_free_space(run.accelerator, run.output_dir, step,
                     checkpoint_bytes_estimate(run.last_checkpoint, run.trainable, run.ema))
    run.last_checkpoint = ckpt.save_checkpoint(run.accelerator, run.output_dir, run.state,
                                               run.cfg.checkpoints_total_limit)


def finish(run: Run) -> int:
    """After the last step: final validation, pipeline and model card (main process), teardown,
    then the hub upload; returns the exit code."""
    accelerator, cfg, state = run.accelerator, run.cfg, run.state
    main = accelerator.is_main_process
    run.bar.close()
    run.stop.restore()

    check_replicas(accelerator, run.unet)
    accelerator.wait_for_everyone()
    if main:
        if state.global_step % cfg.validation_steps:  # the last step had no validation yet
            run.last_grid = run_validation(run, state.global_step) or run.last_grid
        save_outputs(run)
        write_model_card(run.output_dir, cfg, run.parts.family, state, run.num_pairs, run.last_grid)
    # end_training destroys the process group: every rank must get there together. A rank that tore
    # its gloo group down while the main one was still saving hung at exit (joining gloo's threads).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if main:
        what = "the InstructPix2Pix pipeline" if cfg.save_merged else "the LoRA adapter"
        if cfg.lora_rank and cfg.save_merged:
            what = "the LoRA adapter and the merged InstructPix2Pix pipeline"
        accelerator.print(f"saved {what} to {run.output_dir.resolve()}")
        if run.hub_repo:  # after the teardown: an upload may outlast a collective's timeout
            return push_to_hub(cfg, run.output_dir, run.hub_repo)
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


def log_step(run: Run, epoch: int, step: int) -> dict:
    """Read the interval's mean loss (a host synchronisation), mean over processes; write
    metrics.jsonl and the bar's postfix, then start the next interval. The clock is read after the
    loss: the host runs ahead of the GPU, and the rate must count the GPU's work."""
    accelerator, state = run.accelerator, run.state
    loss_value = accelerator.reduce(run.loss_sum / run.micro_steps, reduction="mean").item()
    elapsed = time.perf_counter() - run.t0
    row = {"step": step, "epoch": epoch, "loss": loss_value,
           "lr": float(run.lr_scheduler.get_last_lr()[0]),  # a tensor for torchao
           "samples_per_s": run.micro_steps * run.cfg.train_batch_size * accelerator.num_processes / elapsed,
           "peak_memory_gib": peak_memory_gib(accelerator.device),
           "skipped_steps": state.skipped_steps, "replaced_samples": state.replaced_samples}
    run.metrics.write(row)
    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
    run.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                        samples_s=f"{row['samples_per_s']:.2f}", peak_gib=f"{row['peak_memory_gib']:.1f}")
    run.loss_sum.zero_()
    run.micro_steps, run.t0 = 0, time.perf_counter()
    return row


def encode_heldout_split(cfg: TrainConfig, parts, heldout_dataset, device, dtype, buckets=None):
    """The held-out pairs, encoded once on the main process (centre crops, no flips; with buckets
    each at the bucket nearest its photo's aspect, as training would put it)."""
    if heldout_dataset is None:
        return None
    centre_crops = dataclasses.replace(cfg, center_crop=True, random_flip=False)
    pairs = TrainPairs(heldout_dataset, centre_crops, parts.tokenizers)
    if buckets:
        from ip2p.training.buckets import nearest

        sizes = image_sizes(heldout_dataset, cfg.original_image_column)
        pairs.use_buckets([buckets[nearest(size or (1, 1), buckets)] for size in sizes])
    encoders_device = parts.vae.device  # the CPU when training from the latent cache
    place_encoders(parts, device)
    encoder = OnTheFlyEncoder(parts, dtype)
    heldout = encode_heldout(pairs, encoder, parts.noise_scheduler.config.num_train_timesteps)
    place_encoders(parts, encoders_device)
    print(f"held-out loss on {len(pairs)} pairs of the '{cfg.validation_split}' split at each validation")
    return heldout


def run_validation(run: Run, step: int) -> str | None:
    """Held-out losses and validation images, with the EMA weights when there are any; then the
    trained weights go back. Returns the grid's path relative to the output folder."""
    accelerator, ema, parts, output_dir = run.accelerator, run.ema, run.parts, run.output_dir
    if run.validator is None and run.heldout is None:
        return None
    model = accelerator.unwrap_model(run.unet, keep_torch_compile=False)  # --torch_compile_mode full: sample eagerly
    if ema is not None:
        ema.store(run.trainable)
        ema.copy_to(run.trainable)
    grid = None
    if run.heldout is not None:
        losses = heldout_losses(model, run.heldout, parts.noise_scheduler, parts.vae.config.scaling_factor,
                                DTYPES[accelerator.mixed_precision])
        MetricsLog(output_dir / "logs" / "heldout.jsonl", True).write({"step": step, **losses})
        accelerator.log(losses, step=step)
    if run.validator is not None:
        grid = run.validator.render(model, step)
    if ema is not None:
        ema.restore(run.trainable)
    return str(log_grid(accelerator, grid, step, output_dir).relative_to(output_dir)) if grid else None


def save_outputs(run: Run) -> None:
    """Full fine-tuning: the pipeline. LoRA: the adapter (+ conv_in), then by default the pipeline
    with the adapter merged into a fresh fp32 copy of the base UNet."""
    cfg, parts = run.cfg, run.parts
    unet = run.accelerator.unwrap_model(run.unet, keep_torch_compile=False)
    if run.ema is not None:
        run.ema.copy_to(run.trainable)
    if cfg.lora_rank:
        lora = LoraSettings.from_config(cfg)
        run.output_dir.mkdir(parents=True, exist_ok=True)
        save_adapter(run.output_dir, parts.family, unet, lora, run.conv_in_trains)
        if not cfg.save_merged:
            return
        base = expand_conv_in(load_unet(cfg), 8)
        unet = merged_unet(base, unet, lora, run.conv_in_trains)
    save_pipeline(cfg, parts, unet, run.output_dir)


def save_pipeline(cfg: TrainConfig, parts, unet, output_dir: Path) -> None:
    """The final InstructPix2Pix pipeline folder of the family (safetensors), loadable as is."""
    # The pipeline's default output size is sample_size * 8: make it the training resolution.
    unet.register_to_config(sample_size=cfg.resolution // vae_scale_factor(parts.vae))
    unet = unet.to(memory_format=torch.contiguous_format)
    if unet.dtype != DTYPES[cfg.save_dtype]:
        unet = unet.to(DTYPES[cfg.save_dtype])
    pipeline = instruct_pix2pix_pipeline(parts, unet, cfg.pretrained_model_name_or_path, cfg.revision)
    pipeline.save_pretrained(output_dir, safe_serialization=True)
