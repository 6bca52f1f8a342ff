"""Held-out denoising loss: comparable across steps and runs because nothing in it is random.

The held-out pairs are encoded once (centre crop, no flip). Each sample gets a fixed edited-latent
draw, a fixed noise and a fixed timestep (spread evenly over the schedule), all from a generator
seeded independently of the run, and no conditioning dropout. Besides the loss with the right
instruction, it reports the loss with another sample's instruction and with the input photo
dropped: a model that uses its conditioning does worse on both, so the gaps show whether the edit
is being learned, long before samples look right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ip2p.method import EncodedBatch, sample_edited_latents
from ip2p.training.encode import OnTheFlyEncoder
from ip2p.training.step import denoising_loss

HELDOUT_SEED = 1234


@dataclass
class HeldOut:
    batch: EncodedBatch  # all held-out samples, on the CPU
    eps: torch.Tensor  # the edited-latent draw
    noise: torch.Tensor
    timesteps: torch.Tensor


def encode_heldout(pairs, encoder: OnTheFlyEncoder, num_timesteps: int, batch_size: int = 8) -> HeldOut | list[HeldOut]:
    """Encode every sample of `pairs` (a TrainPairs over the held-out split, centre crops); with
    aspect-ratio buckets one HeldOut per bucket shape (in the order of first appearance)."""
    if pairs.targets is None:
        return _encode(pairs, range(len(pairs)), encoder, num_timesteps, batch_size)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, target in enumerate(pairs.targets):
        groups.setdefault(tuple(target), []).append(i)
    return [_encode(pairs, members, encoder, num_timesteps, batch_size) for members in groups.values()]


def _encode(pairs, indices, encoder: OnTheFlyEncoder, num_timesteps: int, batch_size: int) -> HeldOut:
    from ip2p.training.pairs import collate

    indices, chunks = list(indices), []
    for start in range(0, len(indices), batch_size):
        samples = [pairs[i] for i in indices[start:start + batch_size]]
        chunks.append(encoder(collate(samples), encoder.parts.vae.device).to(device="cpu"))
    batch = EncodedBatch(**{name: torch.cat([chunk.tensors()[name] for chunk in chunks])
                            for name in chunks[0].tensors()})
    n = len(batch)
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    eps = torch.randn(batch.edited_latent_mean.shape, generator=g)
    noise = torch.randn(batch.edited_latent_mean.shape, generator=g)
    timesteps = torch.linspace(0, num_timesteps - 1, n).round().long()
    return HeldOut(batch, eps, noise, timesteps)


def conditioning_variants(batch: EncodedBatch) -> dict[str, EncodedBatch]:
    """The right instruction; another sample's instruction (a roll by one); no input photo."""
    text = ("prompt_embeds", "pooled_prompt_embeds")
    rolled = EncodedBatch(**{**batch.tensors(), **{k: v.roll(1, 0) for k, v in batch.tensors().items() if k in text}})
    no_image = EncodedBatch(**{**batch.tensors(), "original_latents": torch.zeros_like(batch.original_latents)})
    return {"val_loss": batch, "val_loss_wrong_instruction": rolled, "val_loss_no_image": no_image}


@torch.no_grad()
def heldout_losses(unet, heldout: HeldOut | list[HeldOut], noise_scheduler, scaling_factor: float,
                   dtype: torch.dtype, batch_size: int = 8) -> dict[str, float]:
    """Mean denoising loss on the held-out set for each conditioning variant (over every sample of
    every bucket's group, when there are several)."""
    if isinstance(heldout, list):
        parts = [(heldout_losses(unet, h, noise_scheduler, scaling_factor, dtype, batch_size), len(h.batch))
                 for h in heldout]
        n = sum(k for _, k in parts)
        return {name: sum(r[name] * k for r, k in parts) / n for name in parts[0][0]}
    device = unet.device
    was_training = unet.training
    unet.eval()
    results = {}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for name, variant in conditioning_variants(heldout.batch).items():
        total, n = 0.0, len(variant)
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            b = EncodedBatch(**{k: v[sl] for k, v in variant.tensors().items()}).to(device=device, dtype=dtype)
            # the forward process in fp32, as in training (ip2p.training.step.denoising_loss)
            latents = sample_edited_latents(b.edited_latent_mean.float(), b.edited_latent_std.float(),
                                            heldout.eps[sl].to(device), scaling_factor)
            noise, t = heldout.noise[sl].to(device), heldout.timesteps[sl].to(device)
            with autocast:
                loss = denoising_loss(unet, noise_scheduler, latents, noise, t, b)
            total += loss.item() * (sl.stop - start)
        results[name] = total / n
    unet.train(was_training)
    return results
