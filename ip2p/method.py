"""The InstructPix2Pix method on SDXL as pure functions (Brooks et al. 2023, "InstructPix2Pix").

No accelerator, no logging, no global arguments: each function takes tensors and returns tensors,
so each point of the method is unit-tested on its own. The diffusers example script gets several of
these wrong; the issue numbers are cited where that matters.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EncodedBatch:
    """What one training step consumes: latents and embeddings, never pixels or text.

    Both producers (encoding on the fly, reading the latent cache) build this same object.
    Shapes for SDXL at resolution R: latents (B, 4, R/8, R/8), prompt_embeds (B, 77, 2048),
    pooled_prompt_embeds (B, 1280), time_ids (B, 6).
    """

    edited_latent_mean: torch.Tensor  # VAE posterior mean of the edited image, unscaled
    edited_latent_std: torch.Tensor  # VAE posterior std of the edited image, unscaled
    original_latents: torch.Tensor  # posterior mode of the input image, unscaled (see below)
    prompt_embeds: torch.Tensor  # penultimate hidden states of both text encoders, concatenated
    pooled_prompt_embeds: torch.Tensor  # text_encoder_2's projected pooled output
    time_ids: torch.Tensor  # SDXL micro-conditioning per sample

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "EncodedBatch":
        def move(t: torch.Tensor) -> torch.Tensor:
            # time_ids stay float32: they are integers that fp16 would round above 2048.
            keep = dtype if t is not self.time_ids else None
            return t.to(device=device, dtype=keep, non_blocking=non_blocking)

        return EncodedBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def __len__(self) -> int:
        return self.original_latents.shape[0]


def expand_conv_in(unet: nn.Module, in_channels: int = 8) -> nn.Module:
    """Widen the UNet's first convolution from 4 to `in_channels` inputs (InstructPix2Pix, 3.2).

    The new channels (the input photo's latent) start at zero so the widened UNet computes exactly
    what the base did; the old weights AND bias are copied (the diffusers script leaves the bias
    random, diffusers#4960).
    """
    old = unet.conv_in
    if old.in_channels == in_channels:
        return unet
    new = nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
        dtype=old.weight.dtype, device=old.weight.device,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def compute_time_ids(
    original_sizes: torch.Tensor, crops_top_left: torch.Tensor, target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL micro-conditioning (Podell et al. 2023, 2.2): one row per sample.

    (original h, original w, crop top, crop left, target h, target w), from each image's real size
    and real crop, so a short last batch has as many rows as samples (the diffusers script fixes
    the row count at start-up and crashes on it).
    """
    n = original_sizes.shape[0]
    # filled where the sizes are (on the GPU when encoding on the fly): no copy from host memory
    target = torch.empty((n, 2), dtype=torch.float32, device=original_sizes.device)
    target[:, 0], target[:, 1] = target_size
    return torch.cat([original_sizes.float(), crops_top_left.float(), target], dim=1)


def conditioning_dropout_masks(r: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples lose their text and which lose their image (InstructPix2Pix 3.2.1).

    One uniform r per sample: r < 2p drops the text, p <= r < 3p drops the image, so p of the
    samples lose only the text, p lose both and p lose only the image.
    """
    drop_text = r < 2 * p
    drop_image = (r >= p) & (r < 3 * p)
    return drop_text, drop_image


def apply_conditioning_dropout(
    batch: EncodedBatch, r: torch.Tensor, p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (prompt_embeds, pooled_prompt_embeds, original_latents) with conditioning dropped.

    A dropped text becomes zeros for the hidden states AND the pooled embedding: that is the
    unconditional text the saved pipeline uses at inference (`force_zeros_for_empty_prompt`);
    the diffusers script trains on the empty prompt's embedding and keeps the pooled one
    (diffusers#7920). A dropped image becomes a zero latent, as the pipeline's unconditional branch.
    """
    if p <= 0:
        return batch.prompt_embeds, batch.pooled_prompt_embeds, batch.original_latents
    drop_text, drop_image = conditioning_dropout_masks(r, p)
    keep_text = (~drop_text).to(batch.prompt_embeds.dtype)
    keep_image = (~drop_image).to(batch.original_latents.dtype)
    return (
        batch.prompt_embeds * keep_text[:, None, None],
        batch.pooled_prompt_embeds * keep_text[:, None].to(batch.pooled_prompt_embeds.dtype),
        batch.original_latents * keep_image[:, None, None, None],
    )


def sample_edited_latents(
    mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor, scaling_factor: float
) -> torch.Tensor:
    """A fresh draw from the edited image's VAE posterior, scaled to the diffusion's latent space.

    Same as `vae.encode(x).latent_dist.sample() * scaling_factor`, with the draw's noise passed in
    so that the cache (which stores mean and std) gives what encoding on the fly gives.
    """
    return (mean + std * eps) * scaling_factor


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """The UNet's regression target: the noise (epsilon) or the velocity for v-prediction models."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def compute_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain denoising MSE in fp32 (DDPM, Ho et al. 2020, eq. 14), the InstructPix2Pix objective."""
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
