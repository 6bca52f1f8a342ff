"""Encoding on the fly: pixels and token ids -> an EncodedBatch (the training step's only input).

The frozen VAE and both text encoders run here, batched, without gradients. The latent cache is
the other producer of the same EncodedBatch.
"""

from __future__ import annotations

import torch

from ip2p.method import EncodedBatch, compute_time_ids


@torch.no_grad()
def encode_text(text_encoder, text_encoder_2, input_ids, input_ids_2):
    """SDXL's two-encoder text conditioning, as the SDXL pipelines compute it.

    prompt_embeds: penultimate hidden states of CLIP-L and OpenCLIP-bigG concatenated (B, 77, 2048);
    pooled: text_encoder_2's projected pooled output (B, 1280).
    """
    out = text_encoder(input_ids, output_hidden_states=True)
    out_2 = text_encoder_2(input_ids_2, output_hidden_states=True)
    prompt_embeds = torch.cat([out.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    return prompt_embeds, out_2.text_embeds


@torch.no_grad()
def encode_images(vae, original: torch.Tensor, edited: torch.Tensor):
    """One VAE pass over both images.

    Returns the edited image's posterior (mean, std), which the step samples from, and the input
    image's posterior mode, unscaled: the SDXL InstructPix2Pix pipeline conditions on
    `latent_dist.mode()` without the scaling factor, so training must too (the diffusers script
    samples it instead, a train/inference mismatch).
    """
    x = torch.cat([original, edited]).to(device=vae.device, dtype=vae.dtype)
    dist = vae.encode(x).latent_dist
    n = original.shape[0]
    return dist.mean[n:], dist.std[n:], dist.mode()[:n]


class OnTheFlyEncoder:
    """Produces EncodedBatch from a DataLoader batch by running the frozen encoders."""

    def __init__(self, vae, text_encoder, text_encoder_2, resolution: int, dtype: torch.dtype):
        self.vae, self.text_encoder, self.text_encoder_2 = vae, text_encoder, text_encoder_2
        self.resolution = resolution
        self.dtype = dtype  # the training precision: what the cache stores too

    def __call__(self, batch: dict, device) -> EncodedBatch:
        def dev(t):
            return t.to(device, non_blocking=True)

        mean, std, original = encode_images(
            self.vae, dev(batch["original_pixel_values"]), dev(batch["edited_pixel_values"]))
        prompt_embeds, pooled = encode_text(
            self.text_encoder, self.text_encoder_2, dev(batch["input_ids"]), dev(batch["input_ids_2"]))
        time_ids = compute_time_ids(batch["original_size"], batch["crop_top_left"],
                                    (self.resolution, self.resolution))
        encoded = EncodedBatch(mean, std, original, prompt_embeds, pooled, time_ids)
        return encoded.to(device=device, dtype=self.dtype)
