"""The pieces of the learning check (benchmarks/learning_check.py, tests/test_learning.py).

Does a trained editor do the edit its instruction asks for? Two measurements, both on held-out
pairs whose edit the instruction fully determines (python -m ip2p.tiny.sample_data):

- `edit_errors`: the saved pipeline edits every held-out photo, once with its own instruction and
  once with another pair's, from the same noise; each output is compared with the ground-truth
  edited image, in scaled latent space and in pixels. Copying the photo unchanged is the baseline
  a real edit must beat; the wrong instruction must do worse than the right one.
- the held-out denoising loss the trainer logs (`ip2p.training.heldout`): right instruction vs wrong
  instruction vs no photo, `heldout_verdict`.

A random tiny VAE scrambles images (shared design notes), so `fit_vae` first fits the tiny model's
own VAE (same class and config) on the training images for a few minutes.

Pairs of several sizes (aspect-ratio buckets) are measured one size at a time (`size_groups`: one
pipeline call, one latent shape each) and `pool`ed into the mean over all pairs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ip2p.models import size_arguments
from ip2p.tiny.model import pin_logvar
from ip2p.training.pairs import to_tensor


def training_images(data_dir: str | Path, split: str = "train") -> list[torch.Tensor]:
    """Both images of every pair of a converted dataset's split, one stack per image shape (in the
    order first seen): [(n, 3, H, W), ...], a single stack when every image has the same size."""
    import datasets

    rows = datasets.load_from_disk(str(data_dir))[split]
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for row in rows:
        for column in ("input_image", "edited_image"):
            x = to_tensor(row[column])
            groups.setdefault(tuple(x.shape), []).append(x)
    return [torch.stack(group) for group in groups.values()]


def fit_vae(model_dir: str | Path, images: torch.Tensor | list[torch.Tensor], steps: int, seed: int = 0,
            batch_size: int = 32, lr: float = 2e-3) -> dict:
    """Fit the model folder's VAE to reconstruct `images` (one stack, or one per image shape),
    recalibrate `scaling_factor` so the latents have unit variance on them (as SDXL's 0.13025 does
    on photos), save it in place.

    Pixel-space MSE on the posterior mean with Adam and a cosine schedule; random horizontal
    flips, as training uses them; with several shapes each batch is one shape, drawn in proportion
    to its images. Returns what the fit reached.
    """
    from diffusers import AutoencoderKL

    model_dir = Path(model_dir)
    groups = [images] if isinstance(images, torch.Tensor) else list(images)
    weights = torch.tensor([float(len(x)) for x in groups])
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    pin_logvar(vae)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.05)
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        # one shape alone draws nothing for the choice, so its stream is what it always was
        group = groups[torch.multinomial(weights, 1, generator=g).item()] if len(groups) > 1 else groups[0]
        x = group[torch.randint(len(group), (batch_size,), generator=g)]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        loss = F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pin_logvar(vae)
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}: reconstruction mse {loss.item():.4f} "
                  f"({time.time() - start:.0f}s)", flush=True)
    vae.eval()
    latents, errors = [], []
    with torch.no_grad():
        for x in groups:
            z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, len(x), 64)])
            rec = torch.cat([vae.decode(z[i:i + 64]).sample for i in range(0, len(z), 64)])
            latents.append(z.flatten())
            errors.append((rec - x).pow(2).flatten())
    std = torch.cat(latents).std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(model_dir / "vae", safe_serialization=True)
    return {"steps": steps, "seconds": round(time.time() - start, 1), "images": sum(len(x) for x in groups),
            "reconstruction_mse": round(torch.cat(errors).mean().item(), 5),
            "pixel_variance": round(torch.cat([x.flatten() for x in groups]).var().item(), 5),
            "scaling_factor": vae.config.scaling_factor}


def heldout_verdict(final: dict, margin: float = 0.02) -> dict:
    """From one `logs/heldout.jsonl` row: does the model use the instruction and the photo, i.e.
    is `val_loss` at least `margin` (relative) below each of the other two?"""
    v, w, n = final["val_loss"], final["val_loss_wrong_instruction"], final["val_loss_no_image"]
    return {"uses_instruction": w > v * (1 + margin), "uses_photo": n > v * (1 + margin),
            "gap_wrong_instruction_pct": round(100 * (w - v) / v, 2),
            "gap_no_image_pct": round(100 * (n - v) / v, 2)}


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.mse_loss(a.float(), b.float()).item()


@dataclass(frozen=True)
class Sampling:
    """How `edit_errors` samples: inference.py's defaults, a base seed (sample j uses seed + j), and
    how many edits go through the pipeline at once."""

    num_inference_steps: int = 30
    guidance_scale: float = 3.0
    image_guidance_scale: float = 1.5
    seed: int = 0
    batch_size: int = 16


@torch.no_grad()
def edit_errors(pipe, inputs: list[Image.Image], instructions: list[str], ground_truth: list[Image.Image],
                sampling: Sampling = Sampling()) -> dict:
    """Edit every input with its instruction and with the next pair's (a roll by one), from the
    same noise per sample; MSE of each to the ground truth, beside copying the input.

    Latent MSEs use scaled latents (unit variance), the space the UNet denoises in; pixel MSEs use
    [-1, 1] images decoded by the same VAE. `vae_floor_pixel` is the ground truth through the VAE
    and back: no output decoded by this VAE can be closer than that.
    """
    vae = pipe.vae
    sf = vae.config.scaling_factor
    x_in = torch.stack([to_tensor(i) for i in inputs])
    x_gt = torch.stack([to_tensor(i) for i in ground_truth])
    z_in = _encode_mean(vae, x_in) * sf
    z_gt = _encode_mean(vae, x_gt) * sf
    height, width = x_in.shape[-2:]
    wrong = instructions[1:] + instructions[:1]
    out = {"pairs": len(inputs), "copy_input_latent": mse(z_in, z_gt),
           "copy_input_pixel": mse(x_in, x_gt),
           "vae_floor_pixel": mse(_decode(vae, z_gt / sf), x_gt)}
    for name, prompts in (("right_instruction", instructions), ("wrong_instruction", wrong)):
        latents = []
        for i in range(0, len(inputs), sampling.batch_size):
            sl = slice(i, i + sampling.batch_size)
            # one generator per sample: each output starts from the same noise in both runs
            gens = [torch.Generator().manual_seed(sampling.seed + j) for j in range(i, i + len(inputs[sl]))]
            latents.append(pipe(prompt=prompts[sl], image=inputs[sl], **size_arguments(pipe, width, height),
                                num_inference_steps=sampling.num_inference_steps,
                                guidance_scale=sampling.guidance_scale,
                                image_guidance_scale=sampling.image_guidance_scale, generator=gens,
                                output_type="latent").images)
        z = torch.cat(latents)
        out[f"{name}_latent"] = mse(z, z_gt)
        out[f"{name}_pixel"] = mse(_decode(vae, z / sf), x_gt)
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in out.items()}


def _encode_mean(vae, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(x[i:i + 64].to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
                      for i in range(0, len(x), 64)])


def _decode(vae, z: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.decode(z[i:i + 64].to(vae.device, vae.dtype)).sample.float().cpu().clamp(-1, 1)
                      for i in range(0, len(z), 64)])


def size_groups(images: list[Image.Image]) -> dict[str, list[int]]:
    """The indices of `images` by size, "WIDTHxHEIGHT" keys in the order first seen: the
    measurements run per size (one pipeline call, one latent shape), as a bucketed run trains."""
    groups: dict[str, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault("{}x{}".format(*image.size), []).append(i)
    return groups


def pool(results: list[dict]) -> dict:
    """Measurements of several groups of pairs (each result with its "pairs" count) as one: every
    number the mean over all pairs, nested rows alike, the counts summed."""
    weights = [r["pairs"] for r in results]
    total = sum(weights)

    def merge(values: list, key: str | None):
        if isinstance(values[0], dict):
            return {k: merge([v[k] for v in values], k) for k in values[0]}
        if key == "pairs":
            return total
        return round(sum(v * w for v, w in zip(values, weights)) / total, 5)

    return merge(results, None)


def edit_verdict(errors: dict, margin: float = 0.05) -> dict:
    """The edit is learned when, in latent space, the right instruction's outputs are closer to the
    ground truth than the unchanged photo is, and the wrong instruction's are further away (each
    by at least `margin`, relative)."""
    right, wrong = errors["right_instruction_latent"], errors["wrong_instruction_latent"]
    copy = errors["copy_input_latent"]
    return {"beats_copying_input": right < copy * (1 - margin),
            "wrong_instruction_worse": wrong > right * (1 + margin),
            "vs_copy_pct": round(100 * (right - copy) / copy, 2),
            "wrong_vs_right_pct": round(100 * (wrong - right) / right, 2)}


def copy_prior_estimate(noisy: torch.Tensor, photo: torch.Tensor, alpha_bar: float, var: float) -> torch.Tensor:
    """The best (posterior-mean) estimate of the edited latent z from x_t = sqrt(a) z + sqrt(1-a) eps
    for a denoiser that takes the edit to leave the photo as it is, up to noise of variance `var`:
    z ~ N(photo, var). It uses the noisy latent and the photo, but not the instruction."""
    a = alpha_bar
    return (a ** 0.5 * var * noisy + (1 - a) * photo) / (a * var + 1 - a)


@torch.no_grad()
def denoised_errors(unet, batch, noise_scheduler, scaling_factor: float,
                    timesteps=(500, 700, 800, 900, 950, 999), seed: int = 0) -> dict:
    """At each timestep, the UNet's one-step estimate of the edited latent,
    x0 = (x_t - sqrt(1 - a) eps_pred) / sqrt(a), from the held-out edited latent noised with fixed
    noise: its MSE to the truth with the right instruction, a wrong one and no photo, beside
    `copy_prior_estimate` (whose variance is the held-out copy error itself, the most favourable).

    `batch` is an EncodedBatch of held-out pairs (ip2p.training.heldout), on the UNet's device."""
    from ip2p.training.heldout import conditioning_variants

    z = batch.edited_latent_mean * scaling_factor
    photo = batch.original_latents * scaling_factor
    var = (photo - z).pow(2).mean().item()
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z)
    rows = {}
    for t in timesteps:
        a = noise_scheduler.alphas_cumprod[t].item()
        tt = torch.full((len(z),), t, device=z.device, dtype=torch.long)
        noisy = a ** 0.5 * z + (1 - a) ** 0.5 * noise  # DDPM's forward process, as in training
        row = {"alpha_bar": round(a, 5),
               "copy_prior": mse(copy_prior_estimate(noisy, photo, a, var), z)}
        for name, v in conditioning_variants(batch).items():
            eps = unet(torch.cat([noisy, v.original_latents], 1), tt, v.prompt_embeds,
                       added_cond_kwargs=v.unet_added_conditioning(),
                       return_dict=False)[0]
            row[name.replace("val_loss", "model")] = mse((noisy - (1 - a) ** 0.5 * eps) / a ** 0.5, z)
        rows[str(t)] = {k: round(v, 5) for k, v in row.items()}
    return {"pairs": len(z), "copy_variance": round(var, 5), "by_timestep": rows}


def denoised_verdict(errors: dict, timestep: str = "900", margin: float = 0.05) -> dict:
    """At `timestep` (99% noise by default), with the right instruction the UNet's estimate is
    closer to the edited latent than the copy-prior estimate, and the wrong instruction's is further
    away (each by at least `margin`, relative)."""
    row = errors["by_timestep"][timestep]
    right, wrong, copy = row["model"], row["model_wrong_instruction"], row["copy_prior"]
    return {"timestep": int(timestep), "beats_copy_prior": right < copy * (1 - margin),
            "wrong_instruction_worse": wrong > right * (1 + margin),
            "vs_copy_prior_pct": round(100 * (right - copy) / copy, 2),
            "wrong_vs_right_pct": round(100 * (wrong - right) / right, 2)}
