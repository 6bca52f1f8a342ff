"""Encoding on the fly: pixels and token ids -> an EncodedBatch (the training step's only input).

The frozen VAE and the family's text encoders run here, batched, without gradients. The latent
cache is the other producer of the same EncodedBatch.
"""

from __future__ import annotations

import torch

from ip2p.method import EncodedBatch
from ip2p.models import ModelParts, token_key


def prompt_token_ids(parts: ModelParts, batch: dict, device) -> list[torch.Tensor]:
    """Each text encoder's token ids from a collated batch, on `device`."""
    return [batch[token_key(i)].to(device, non_blocking=True) for i in range(len(parts.text_encoders))]


@torch.no_grad()
def encode_images(vae, original: torch.Tensor, edited: torch.Tensor):
    """One VAE pass over both images.

    Returns the edited image's posterior (mean, std), which the step samples from, and the input
    image's posterior mode, unscaled: the InstructPix2Pix pipelines (SD and SDXL) condition on
    `latent_dist.mode()` without the scaling factor, so training must too (the diffusers script
    samples it instead, a train/inference mismatch).
    """
    x = torch.cat([original, edited]).to(device=vae.device, dtype=vae.dtype)
    dist = vae.encode(x).latent_dist
    n = original.shape[0]
    return dist.mean[n:], dist.std[n:], dist.mode()[:n]


class OnTheFlyEncoder:
    """Produces EncodedBatch from a DataLoader batch by running the frozen encoders (the target size
    of the micro-conditioning is the batch's own pixels': the --resolution square or a bucket)."""

    def __init__(self, parts: ModelParts, dtype: torch.dtype):
        self.parts = parts
        self.dtype = dtype  # the training precision: what the cache stores too

    def __call__(self, batch: dict, device) -> EncodedBatch:
        parts = self.parts
        mean, std, original = encode_images(
            parts.vae, batch["original_pixel_values"].to(device, non_blocking=True),
            batch["edited_pixel_values"].to(device, non_blocking=True))
        prompt_embeds, pooled = parts.family.encode_prompt(parts.text_encoders,
                                                           prompt_token_ids(parts, batch, device))
        # the target size is the batch's own: the square --resolution, or its aspect bucket
        time_ids = parts.family.micro_conditioning(batch["original_size"], batch["crop_top_left"],
                                                   tuple(batch["original_pixel_values"].shape[-2:]))
        encoded = EncodedBatch(mean, std, original, prompt_embeds, pooled, time_ids)
        return encoded.to(device=device, dtype=self.dtype)
