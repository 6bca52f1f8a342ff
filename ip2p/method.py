"""The InstructPix2Pix method as pure functions (Brooks et al. 2023, "InstructPix2Pix").

No accelerator, no logging, no global arguments: each function takes tensors and returns tensors,
so each point of the method is unit-tested on its own. The diffusers example script gets several of
these wrong; the issue numbers are cited where that matters. What differs between model families
(the text encoders, SDXL's micro-conditioning, the unconditional text) lives in ip2p/models/.
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
    pooled_prompt_embeds (B, 1280), time_ids (B, 6). Families without a pooled embedding or
    micro-conditioning leave those two None.
    """

    edited_latent_mean: torch.Tensor  # VAE posterior mean of the edited image, unscaled
    edited_latent_std: torch.Tensor  # VAE posterior std of the edited image, unscaled
    original_latents: torch.Tensor  # posterior mode of the input image, unscaled (see below)
    prompt_embeds: torch.Tensor  # the text encoders' hidden states, as the family's pipeline uses them
    pooled_prompt_embeds: torch.Tensor | None = None  # SDXL: text_encoder_2's projected pooled output
    time_ids: torch.Tensor | None = None  # SDXL micro-conditioning per sample

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "EncodedBatch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            # time_ids stay float32: they are integers that fp16 would round above 2048.
            keep = dtype if t is not self.time_ids else None
            return t.to(device=device, dtype=keep, non_blocking=non_blocking)

        return EncodedBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields this family fills, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def unet_added_conditioning(self) -> dict | None:
        """The UNet's `added_cond_kwargs`: SDXL's pooled text and time ids; None for families without."""
        if self.pooled_prompt_embeds is None:
            return None
        return {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.time_ids}

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


def conditioning_dropout_masks(r: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples lose their text and which lose their image (InstructPix2Pix 3.2.1).

    One uniform r per sample: r < 2p drops the text, p <= r < 3p drops the image, so p of the
    samples lose only the text, p lose both and p lose only the image.
    """
    drop_text = r < 2 * p
    drop_image = (r >= p) & (r < 3 * p)
    return drop_text, drop_image


def apply_conditioning_dropout(
    batch: EncodedBatch, r: torch.Tensor, p: float, null_text: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Return (prompt_embeds, pooled_prompt_embeds, original_latents) with conditioning dropped.

    A dropped text becomes the family's unconditional text, the one its pipeline uses at inference
    (`ModelFamily.null_text`): zeros for the hidden states and the pooled embedding when
    `null_text` is None (SDXL), else the given (prompt_embeds, pooled) of one sample, e.g. the
    empty prompt's embedding. A dropped image becomes a zero latent, as the pipeline's
    unconditional branch.
    """
    pooled = batch.pooled_prompt_embeds
    if p <= 0:
        return batch.prompt_embeds, pooled, batch.original_latents
    drop_text, drop_image = conditioning_dropout_masks(r, p)
    keep_image = (~drop_image).to(batch.original_latents.dtype)
    original = batch.original_latents * keep_image[:, None, None, None]
    if null_text is None:
        keep_text = (~drop_text).to(batch.prompt_embeds.dtype)
        embeds = batch.prompt_embeds * keep_text[:, None, None]
        if pooled is not None:
            pooled = pooled * keep_text[:, None].to(pooled.dtype)
        return embeds, pooled, original
    null_embeds, null_pooled = null_text
    embeds = torch.where(drop_text[:, None, None], null_embeds.to(batch.prompt_embeds), batch.prompt_embeds)
    if pooled is not None:
        pooled = torch.where(drop_text[:, None], null_pooled.to(pooled), pooled)
    return embeds, pooled, original


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
