"""The training step: an EncodedBatch in, the denoising loss out.

The same function serves every producer (on the fly, cache), the tests and the benchmarks. It
draws its randomness from the global torch generator of the batch's device, in a fixed order,
so a run is reproducible from the saved RNG state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ip2p.method import (
    EncodedBatch,
    apply_conditioning_dropout,
    compute_loss,
    diffusion_target,
    sample_edited_latents,
)


def _randn(like: torch.Tensor) -> torch.Tensor:
    # Not randn_like: that follows the input's memory layout, so the same draw would land in
    # other elements for a cached (contiguous) and an encoded (strided view) latent.
    return torch.randn(like.shape, device=like.device, dtype=like.dtype)


@dataclass(frozen=True)
class Objective:
    """The fixed parts of the loss: the DDPM noise schedule (Ho et al. 2020), the VAE's latent
    scale, and InstructPix2Pix's conditioning dropout (Brooks et al. 2023, 3.2.1) with the text a
    dropped instruction becomes (`ModelFamily.null_text`: None for zeros)."""

    noise_scheduler: object
    scaling_factor: float
    conditioning_dropout_prob: float = 0.0
    null_text: tuple | None = None


def forward_loss(unet, batch: EncodedBatch, objective: Objective) -> torch.Tensor:
    """Noise the edited latent, condition on the input latent and the text, predict, regress.

    The forward process runs in fp32 whatever the batch's dtype (a bf16 cache or bf16 encoders):
    see `denoising_loss`.
    """
    noise_scheduler, scaling_factor = objective.noise_scheduler, objective.scaling_factor
    mean = batch.edited_latent_mean.float()
    n = mean.shape[0]
    # 1. a fresh sample of the edited image's latent (as vae.encode(...).sample() would give)
    latents = sample_edited_latents(mean, batch.edited_latent_std.float(), _randn(mean), scaling_factor)
    # 2. DDPM forward process at a uniform random timestep per sample
    noise = _randn(latents)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (n,), device=latents.device).long()
    # 3. InstructPix2Pix conditioning dropout, one uniform draw per sample
    r = torch.rand(n, device=latents.device)
    prompt_embeds, pooled, original = apply_conditioning_dropout(batch, r, objective.conditioning_dropout_prob,
                                                          objective.null_text)
    conditioning = dataclasses.replace(batch, original_latents=original, prompt_embeds=prompt_embeds,
                                       pooled_prompt_embeds=pooled)
    return denoising_loss(unet, noise_scheduler, latents, noise, timesteps, conditioning)


def denoising_loss(unet, noise_scheduler, latents, noise, timesteps, conditioning: EncodedBatch) -> torch.Tensor:
    """The UNet sees the noisy edited latent and the input latent stacked on channels; MSE to the
    target. Shared by training (random draws) and the held-out loss (fixed draws). `conditioning`
    gives the input latent, the text embeddings and the time ids (its edited-latent fields are unused).

    The forward process (DDPM, Ho et al. 2020, eq. 4), the target and the loss are computed in
    fp32 whatever the training dtype: `add_noise` casts alpha_bar to the latents' dtype, and in bf16
    sqrt(1 - alpha_bar) is exactly 0 at t = 0 and 1 (0.029 and 0.041 in fp32), so the UNet would see
    the clean latent while regressing the noise, at noise levels the fp32 sampler never uses. The
    UNet's input then takes its parameters' dtype: fp32 master weights under autocast (which casts
    inside the layers), bf16 under DeepSpeed, whose engine holds bf16 weights and no autocast.
    """
    latents, noise = latents.float(), noise.float()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    c = conditioning
    model_input = torch.cat([noisy, c.original_latents.float()], dim=1).to(parameter_dtype(unet))
    pred = unet(model_input, timesteps, c.prompt_embeds, added_cond_kwargs=c.unet_added_conditioning(),
                return_dict=False)[0]
    return compute_loss(pred, diffusion_target(noise_scheduler, latents, noise, timesteps))


def parameter_dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def train_micro_step(accelerator, unet, optimizer, batch: EncodedBatch, objective: Objective, max_grad_norm: float,
                     skip_nonfinite: bool = True) -> tuple[torch.Tensor, torch.Tensor | bool]:
    """One micro-batch, called inside `accelerator.accumulate(unet)`: loss, backward, and on the
    micro-batch that completes an accumulation, clipping and the optimizer step.

    Returns the detached loss and whether the optimizer step was skipped because the gradients
    were not finite, neither read here: the host does not wait for the GPU. Who decides the skip:
    under fp16 the GradScaler; under DeepSpeed its engine, which has already stepped (or skipped)
    inside `accelerator.backward`, clipping to the JSON's `gradient_clipping` (ZeRO skips
    non-finite steps in bf16 and fp32 too); both answer with a Python bool. Otherwise this
    function, on the device (`skip_nonfinite_on_device`), answering with a bool tensor.
    """
    loss = forward_loss(unet, batch, objective)
    accelerator.backward(loss)
    deepspeed = is_deepspeed(accelerator)
    others_decide = deepspeed or accelerator.scaler is not None
    skipped: torch.Tensor | bool = False
    if accelerator.sync_gradients and not deepspeed:
        norm = accelerator.clip_grad_norm_(unet.parameters(), max_grad_norm)  # unscales first under fp16
        if skip_nonfinite and not others_decide:  # the same on every rank: the gradients are all-reduced
            skipped = skip_nonfinite_on_device(optimizer, unet.parameters(), norm)
    optimizer.step()  # accelerate's wrapper only steps on the micro-batch that syncs (a no-op under DeepSpeed)
    if accelerator.sync_gradients and others_decide:
        skipped = bool(optimizer.step_was_skipped)
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), skipped


def skip_nonfinite_on_device(optimizer, params, norm: torch.Tensor) -> torch.Tensor:
    """Make the coming optimizer step a no-op when the gradient norm is not finite, without
    reading the norm on the host. Returns the 0-d bool tensor "skipped".

    torch's fused AdamW takes a `found_inf` tensor (the GradScaler's mechanism) and skips the
    update inside its kernel, step count included: an exact skip. Optimizers without it
    (bitsandbytes' and torchao's 8-bit AdamW) get zeroed gradients instead, so nothing non-finite
    reaches the weights or the moments; their update is then that of a zero gradient (the moments
    decay one step and weight decay applies), not an exact skip.
    """
    skipped = ~torch.isfinite(norm)
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    if isinstance(inner, torch.optim.AdamW) and inner.defaults.get("fused"):
        inner.found_inf = skipped.to(torch.float32)
    else:
        for p in params:
            if p.grad is not None:
                p.grad.masked_fill_(skipped, 0.0)
    return skipped


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.value == "DEEPSPEED"
