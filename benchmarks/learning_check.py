"""Learning check: does the tiny recipe learn the edit (instruction AND photo), end to end on a CPU?

    python benchmarks/learning_check.py [--output_dir DIR] [--num_pairs 384] [--vae_steps 500]
                                        [--train_steps 2500] [--seed 0] [--contrast_steps 1500]

Steps (all through the kit's own entry points, the trainer as a subprocess):
  1. synthetic edit pairs (python -m ip2p.sample_data) -> HF dataset with a held-out split
     (convert_to_hf_dataset.py --val_fraction 0.15);
  2. the tiny SDXL (python -m ip2p.tiny_model);
  3. its random VAE is replaced by one fitted for a few minutes on the TRAINING split's images
     (same AutoencoderKL class and config, encoder log-variance kept pinned near-deterministic,
     pixel-space reconstruction loss, then `scaling_factor` recalibrated so the latents have unit
     variance on these images), saved back with save_pretrained. A random VAE scrambles the image
     and nothing edit-specific can be learned through it (see the shared design notes);
  4. train_instruct_pix2pix_sdxl.py --config configs/tiny_cpu.yaml with --validation_steps, so
     OUT/logs/heldout.jsonl records the held-out denoising loss with the right instruction, another
     sample's instruction, and the input photo dropped (fixed noise and timesteps);
     then (--contrast_steps, 0 skips) the same training through the untouched random VAE;
  5. a JSON summary on stdout (also OUT/learning_check.json).

"Learns" means: at the end, val_loss is clearly below both val_loss_wrong_instruction and
val_loss_no_image (here: by at least 2% of val_loss each), i.e. both the text and the photo are used.

Latent-space baselines (held-out pairs, scaled latents, posterior means):
  copy_input_mse      mean (z_input - z_edited)^2: what "return the photo unchanged" costs;
  edited_var          the variance of z_edited (about 1 after recalibration): what "predict the
                      mean latent" costs;
  x0_mse[t][variant]  the trained UNet's one-step denoised estimate
                      x0 = (x_t - sqrt(1 - abar_t) * eps_pred) / sqrt(abar_t) from the edited latent
                      noised to timestep t (fixed noise), vs z_edited, for the right instruction,
                      a wrong one and no photo. At large t the noisy latent says little about the
                      edited image, so a model that knows the edit from (photo, instruction) gets
                      x0_mse well below copy_input_mse there, and the wrong-instruction / no-photo
                      variants do worse. At small t x_t alone nearly gives z_edited: all are small.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(cmd: list[str], log: Path | None = None) -> None:
    print("+", shlex.join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if log is None:
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
        return
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}")


def to_tensor(img, size: int) -> torch.Tensor:
    import numpy as np

    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size))
    return torch.from_numpy(np.asarray(img, dtype="float32") / 127.5 - 1.0).permute(2, 0, 1)


def training_images(data_dir: Path, size: int) -> torch.Tensor:
    import datasets

    train = datasets.load_from_disk(str(data_dir))["train"]
    xs = []
    for row in train:
        xs.append(to_tensor(row["input_image"], size))
        xs.append(to_tensor(row["edited_image"], size))
    return torch.stack(xs)


def pin_logvar(vae) -> None:
    with torch.no_grad():  # as ip2p.tiny_model: log-variance = -30, a near-deterministic posterior
        c = vae.config.latent_channels
        vae.quant_conv.weight[c:] = 0
        vae.quant_conv.bias[c:] = -30.0


def fit_vae(model_dir: Path, images: torch.Tensor, steps: int, seed: int, batch: int = 32,
            lr: float = 2e-3) -> dict:
    """Fit the model folder's VAE (same class and config) on `images`; recalibrate and save it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    pin_logvar(vae)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.05)
    g = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=g)]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(rec, x)  # reconstruction in pixel space
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pin_logvar(vae)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}: recon mse {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    vae.eval()
    with torch.no_grad():
        zs, mse = [], 0.0
        for i in range(0, len(images), 64):
            x = images[i:i + 64]
            dist = vae.encode(x).latent_dist
            zs.append(dist.mean)
            mse += torch.nn.functional.mse_loss(vae.decode(dist.mean).sample, x, reduction="sum").item()
        z = torch.cat(zs)
        post_std = dist.std.mean().item()
    std = z.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(model_dir / "vae", safe_serialization=True)
    return {"steps": steps, "seconds": round(time.time() - start, 1), "final_batch_recon_mse": round(losses[-1], 5),
            "recon_mse_all_train_images": round(mse / images.numel(), 5),
            "pixel_var": round(images.var().item(), 4), "latent_std_unscaled": round(std, 5),
            "scaling_factor": vae.config.scaling_factor, "posterior_std": post_std}


def train_cmd(model: Path, data: Path, out: Path, steps: int, val_every: int, seed: int) -> list[str]:
    return [sys.executable, "train_instruct_pix2pix_sdxl.py", "--config", "configs/tiny_cpu.yaml",
            "--pretrained_model_name_or_path", str(model), "--data_dir", str(data), "--output_dir", str(out),
            "--max_train_steps", str(steps), "--validation_steps", str(val_every), "--report_to", "none",
            "--checkpointing_steps", "100000", "--seed", str(seed)]


def read_curve(out: Path) -> list[dict]:
    path = out / "logs" / "heldout.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@torch.no_grad()
def latent_baselines(cmd: list[str], trained: Path, timesteps=(250, 500, 750)) -> dict:
    """Copy-the-input and one-step-denoised MSEs on the held-out split, in scaled latent space."""
    from diffusers import UNet2DConditionModel

    from ip2p.config import parse_config
    from ip2p.dataset import load_splits
    from ip2p.heldout import HELDOUT_SEED, conditioning_variants
    from ip2p.models import load_parts
    from ip2p.train import encode_heldout_split

    cfg = parse_config(cmd[2:])  # the trainer's own flags: same data, splits, resolution
    _, heldout_ds = load_splits(cfg)
    parts = load_parts(cfg)
    for m in (parts.vae, parts.text_encoder, parts.text_encoder_2):
        m.requires_grad_(False).eval()
    held = encode_heldout_split(cfg, parts, heldout_ds, torch.device("cpu"), torch.float32)
    unet = UNet2DConditionModel.from_pretrained(trained, subfolder="unet").eval()
    sf = parts.vae.config.scaling_factor
    b = held.batch
    z_edit = b.edited_latent_mean * sf
    z_in = b.original_latents * sf  # the UNet is conditioned on the unscaled mode, as the pipeline does
    out = {"n_heldout": len(b), "copy_input_mse": round((z_in - z_edit).pow(2).mean().item(), 5),
           "edited_var": round(z_edit.var().item(), 5), "x0_mse": {}}
    sched = parts.noise_scheduler
    noise = torch.randn(z_edit.shape, generator=torch.Generator().manual_seed(HELDOUT_SEED + 1))
    for t in timesteps:
        tt = torch.full((len(b),), t, dtype=torch.long)
        abar = sched.alphas_cumprod[t].item()
        noisy = sched.add_noise(z_edit, noise, tt)
        row = {"alpha_bar": round(abar, 4)}
        for name, v in conditioning_variants(b).items():
            pred = unet(torch.cat([noisy, v.original_latents], 1), tt, v.prompt_embeds,
                        added_cond_kwargs={"text_embeds": v.pooled_prompt_embeds, "time_ids": v.time_ids},
                        return_dict=False)[0]
            x0 = (noisy - (1 - abar) ** 0.5 * pred) / abar ** 0.5
            row[name] = round((x0 - z_edit).pow(2).mean().item(), 5)
        out["x0_mse"][str(t)] = row
    return out


def verdict(final: dict, margin: float = 0.02) -> dict:
    v, w, n = final["val_loss"], final["val_loss_wrong_instruction"], final["val_loss_no_image"]
    return {"uses_instruction": w > v * (1 + margin), "uses_photo": n > v * (1 + margin),
            "gap_wrong_instruction_pct": round(100 * (w - v) / v, 2),
            "gap_no_image_pct": round(100 * (n - v) / v, 2),
            "learns": w > v * (1 + margin) and n > v * (1 + margin)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=None, help="work folder (default: a new temp dir)")
    p.add_argument("--num_pairs", type=int, default=384)
    p.add_argument("--vae_steps", type=int, default=500, help="VAE fitting steps (batch 32)")
    p.add_argument("--train_steps", type=int, default=2500, help="trainer steps (batch 4, tiny_cpu.yaml)")
    p.add_argument("--validation_steps", type=int, default=250)
    p.add_argument("--contrast_steps", type=int, default=1500,
                   help="also train this many steps through the untouched random VAE (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t0 = time.time()
    work = Path(args.output_dir or tempfile.mkdtemp(prefix="ip2p-learning-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    raw, data, model, random_model = work / "pairs", work / "data", work / "tiny-sdxl", work / "tiny-sdxl-random-vae"
    timings = {}
    py = sys.executable

    run([py, "-m", "ip2p.sample_data", "--output_dir", str(raw), "--num_pairs", str(args.num_pairs),
         "--size", "64", "--seed", str(args.seed)], work / "sample_data.log")
    run([py, "convert_to_hf_dataset.py", "--data_dir", str(raw), "--output_dir", str(data),
         "--val_fraction", "0.15", "--overwrite"], work / "convert.log")
    run([py, "-m", "ip2p.tiny_model", "--output_dir", str(model), "--seed", str(args.seed), "--overwrite"])
    if args.contrast_steps:
        run([py, "-m", "ip2p.tiny_model", "--output_dir", str(random_model), "--seed", str(args.seed),
             "--overwrite"])
    timings["data_and_model_s"] = round(time.time() - t0, 1)

    t = time.time()
    images = training_images(data, 64)
    vae_info = fit_vae(model, images, args.vae_steps, args.seed)
    vae_info["train_images"] = len(images)
    timings["vae_fit_s"] = round(time.time() - t, 1)

    t = time.time()
    out = work / "run-fitted-vae"
    cmd = train_cmd(model, data, out, args.train_steps, args.validation_steps, args.seed)
    run(cmd, work / "train.log")
    timings["train_s"] = round(time.time() - t, 1)
    curve = read_curve(out)
    if not curve:
        raise SystemExit(f"no held-out losses in {out}/logs/heldout.jsonl; see {work}/train.log")

    t = time.time()
    baselines = latent_baselines(cmd, out)
    timings["baselines_s"] = round(time.time() - t, 1)

    contrast = None
    if args.contrast_steps:
        t = time.time()
        rout = work / "run-random-vae"
        rcmd = train_cmd(random_model, data, rout, args.contrast_steps, args.validation_steps, args.seed)
        run(rcmd, work / "train_random_vae.log")
        rcurve = read_curve(rout)
        contrast = {"command": shlex.join(rcmd), "curve": rcurve,
                    "final": rcurve[-1] if rcurve else None,
                    "verdict": verdict(rcurve[-1]) if rcurve else None,
                    "baselines": latent_baselines(rcmd, rout)}
        timings["contrast_s"] = round(time.time() - t, 1)

    summary = {
        "final": curve[-1], "verdict": verdict(curve[-1]), "curve": curve,
        "latent_baselines": baselines, "vae": vae_info, "random_vae_contrast": contrast,
        "timings": timings, "wall_time_s": round(time.time() - t0, 1),
        "command": shlex.join([py, "benchmarks/learning_check.py"] + (argv if argv is not None else sys.argv[1:])),
        "train_command": shlex.join(cmd), "output_dir": str(work),
        "settings": vars(args), "torch_threads": torch.get_num_threads(),
    }
    (work / "learning_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
