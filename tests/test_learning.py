"""The learning check: its measuring pieces, and a short run of it that must show learning.

The long run (benchmarks/learning_check.py with its defaults) gives the README's figures; the run
here is the same script, smaller, and asserts only what a few CPU minutes reliably show.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_in_session
from ip2p.tiny.learning import (Sampling, copy_prior_estimate, denoised_verdict, edit_errors, edit_verdict,
                                 fit_vae, heldout_verdict, to_tensor)
from ip2p.tiny.sample_data import make_pairs

ROOT = Path(__file__).resolve().parents[1]


def test_verdicts_need_the_margin_on_both_sides():
    row = {"val_loss": 1.0, "val_loss_wrong_instruction": 1.03, "val_loss_no_image": 1.01}
    v = heldout_verdict(row)
    assert v["uses_instruction"] and not v["uses_photo"]
    assert v["gap_wrong_instruction_pct"] == 3.0 and v["gap_no_image_pct"] == 1.0
    errors = {"copy_input_latent": 1.0, "right_instruction_latent": 0.5, "wrong_instruction_latent": 0.51}
    e = edit_verdict(errors)
    assert e["beats_copying_input"] and not e["wrong_instruction_worse"] and e["vs_copy_pct"] == -50.0
    assert not edit_verdict({**errors, "right_instruction_latent": 0.97})["beats_copying_input"]
    rows = {"by_timestep": {"900": {"copy_prior": 0.6, "model": 0.3, "model_wrong_instruction": 0.7}}}
    d = denoised_verdict(rows)
    assert d["beats_copy_prior"] and d["wrong_instruction_worse"] and d["vs_copy_prior_pct"] == -50.0


def test_copy_prior_estimate_is_the_posterior_mean():
    """z ~ N(photo, var), x_t = sqrt(a) z + sqrt(1-a) eps: the estimate must be E[z | x_t], which a
    regression over many draws recovers; it is the photo at pure noise and x_t / sqrt(a) at none."""
    g = torch.Generator().manual_seed(0)
    photo, var, a = torch.tensor(0.7), 0.5, 0.2
    z = photo + var ** 0.5 * torch.randn(200_000, generator=g)
    noisy = a ** 0.5 * z + (1 - a) ** 0.5 * torch.randn(200_000, generator=g)
    est = copy_prior_estimate(noisy, photo, a, var)
    assert (est - z).pow(2).mean() < (photo - z).pow(2).mean()  # beats copying
    assert (est - z).pow(2).mean() < (noisy / a ** 0.5 - z).pow(2).mean()  # beats the noisy latent alone
    assert est.mean().item() == pytest.approx(0.7, abs=0.01)
    assert ((z - est) * (noisy - noisy.mean())).mean().item() == pytest.approx(0.0, abs=0.01)  # orthogonal
    assert copy_prior_estimate(noisy[:3], photo, 0.0, var).tolist() == pytest.approx([0.7] * 3)
    assert copy_prior_estimate(noisy[:3], photo, 1.0, var).tolist() == pytest.approx(noisy[:3].tolist())


def test_edit_errors_copy_baseline_and_same_noise_per_sample(tiny_ip2p, one_thread):
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    pipe = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(tiny_ip2p)
    pipe.set_progress_bar_config(disable=True)
    pairs = make_pairs(3, size=64, seed=1)
    inputs, truth = [p.input_image for p in pairs], [p.edited_image for p in pairs]
    same = edit_errors(pipe, inputs, ["make the square red"] * 3, truth, Sampling(num_inference_steps=2, batch_size=2))
    # one instruction for all: "the next pair's instruction" is the same text, and each sample's
    # noise does not depend on the batch it lands in, so both runs give identical outputs
    assert same["right_instruction_latent"] == same["wrong_instruction_latent"]
    assert same["right_instruction_pixel"] == same["wrong_instruction_pixel"]
    with torch.no_grad():
        sf = pipe.vae.config.scaling_factor
        z = [pipe.vae.encode(torch.stack([to_tensor(i) for i in xs])).latent_dist.mean * sf
             for xs in (inputs, truth)]
    assert same["copy_input_latent"] == pytest.approx((z[0] - z[1]).pow(2).mean().item(), rel=1e-4)
    x_in, x_gt = (torch.stack([to_tensor(i) for i in xs]) for xs in (inputs, truth))
    assert same["copy_input_pixel"] == pytest.approx((x_in - x_gt).pow(2).mean().item(), rel=1e-4)
    assert same["pairs"] == 3 and 0 < same["vae_floor_pixel"]
    differ = edit_errors(pipe, inputs, [p.edit_prompt for p in pairs], truth, Sampling(num_inference_steps=2))
    assert differ["copy_input_latent"] == same["copy_input_latent"]
    assert differ["right_instruction_latent"] != differ["wrong_instruction_latent"]


def test_fit_vae_learns_to_reconstruct_and_recalibrates_the_scale(tiny_sdxl, tmp_path, one_thread):
    from diffusers import AutoencoderKL

    model = tmp_path / "model"
    shutil.copytree(tiny_sdxl, model)
    images = torch.stack([to_tensor(p.input_image) for p in make_pairs(16, size=64, seed=2)])
    before = AutoencoderKL.from_pretrained(model, subfolder="vae")
    with torch.no_grad():
        start = (before.decode(before.encode(images).latent_dist.mean).sample - images).pow(2).mean().item()
    info = fit_vae(model, images, steps=40, batch_size=8)
    assert info["reconstruction_mse"] < 0.7 * start
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    assert vae.config.scaling_factor == info["scaling_factor"] != before.config.scaling_factor
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    assert (dist.mean * vae.config.scaling_factor).std().item() == pytest.approx(1.0, rel=1e-3)
    assert dist.std.max().item() < 1e-6  # the posterior stays near-deterministic, as the tiny model's


def test_measurements_per_size_pool_as_the_mean_over_pairs():
    from PIL import Image

    from ip2p.tiny.learning import pool, size_groups

    images = [Image.new("RGB", size) for size in ((48, 80), (80, 48), (48, 80), (64, 64))]
    assert size_groups(images) == {"48x80": [0, 2], "80x48": [1], "64x64": [3]}
    a = {"pairs": 1, "copy": 1.0, "by_timestep": {"900": {"model": 0.3, "alpha_bar": 0.0413}}}
    b = {"pairs": 3, "copy": 2.0, "by_timestep": {"900": {"model": 0.7, "alpha_bar": 0.0413}}}
    assert pool([a, b]) == {"pairs": 4, "copy": 1.75, "by_timestep": {"900": {"model": 0.6, "alpha_bar": 0.0413}}}
    assert pool([a]) == a


def test_fit_vae_on_several_shapes_calibrates_over_all_of_them(tiny_sdxl, tmp_path, one_thread):
    from diffusers import AutoencoderKL

    model = tmp_path / "model"
    shutil.copytree(tiny_sdxl, model)
    pairs = make_pairs(12, seed=3, sizes=((48, 80), (80, 48), (64, 64)))
    groups = [torch.stack([to_tensor(p.input_image) for p in pairs[k::3]]) for k in range(3)]
    info = fit_vae(model, groups, steps=6, batch_size=4)
    assert info["images"] == 12
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    with torch.no_grad():
        z = torch.cat([(vae.encode(x).latent_dist.mean * vae.config.scaling_factor).flatten() for x in groups])
    assert z.std().item() == pytest.approx(1.0, rel=1e-3)  # one scale for every shape, pooled


def short_run(out: Path, *extra) -> dict:
    # its own session: a timeout ends the benchmark and the trainer it started, not only the first
    proc = run_in_session([sys.executable, "benchmarks/learning_check.py", "--output_dir", out, *SHORT_RUN, *extra],
                          timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "learning_check.json").read_text())


def assert_short_run_learned(summary: dict) -> None:
    assert [row["step"] for row in summary["heldout_curve"]] == [400, 800, 1200]
    final, denoised, edits = summary["heldout_final"], summary["denoised_errors"]["by_timestep"], summary["edit_errors"]
    assert summary["heldout_verdict"]["gap_no_image_pct"] > 5, final
    assert denoised["800"]["model"] < 0.7 * denoised["800"]["copy_prior"], denoised["800"]
    assert final["val_loss_wrong_instruction"] > final["val_loss"], final
    for t in ("500", "700", "800"):
        assert denoised[t]["model_wrong_instruction"] > denoised[t]["model"], denoised[t]
    assert edits["wrong_instruction_latent"] > edits["right_instruction_latent"], edits


@pytest.mark.slow
def test_learning_check_short_run_uses_the_instruction_and_the_photo(tmp_path):
    """Four CPU minutes of the real trainer on the demo's task (a weaker VAE fit, 1,200 steps). What
    such a run shows on this VM: the photo is used (held-out loss +12% without it); at 96% noise the
    denoised estimate is twice as close to the edit as the best estimate that takes the photo for
    it; and every measurement is worse with the wrong instruction, by 2-7% (the 12,000-step
    benchmark shows +226%). The instruction is asserted by direction, the rest by margin."""
    assert_short_run_learned(short_run(tmp_path / "check"))


@pytest.mark.slow
def test_lora_learning_check_short_run_learns_as_full_fine_tuning(tmp_path):
    """The same short run with LoRA on every layer of the tiny UNet at rank 64 (full rank for its
    32- and 64-channel layers, so the learning shown is the LoRA path's: adapters and conv_in under
    EMA, validation with the adapter active, the merged pipeline the edits are measured on). On this
    VM: held-out loss 0.0461 (full fine-tuning 0.0432), +14.6% without the photo, +2.6% with the
    wrong instruction; about six CPU minutes."""
    summary = short_run(tmp_path / "check", "--lora_rank", "64", "--lora_target_modules", LORA_EVERY_LAYER)
    assert summary["settings"]["lora_rank"] == 64
    assert_short_run_learned(summary)


@pytest.mark.slow
def test_learning_check_short_run_learns_at_each_aspect(tmp_path):
    """The short run on portrait, landscape and square pairs (48x80, 80x48, 64x64 in turn) with
    --aspect_ratio_buckets: every sample in its own bucket, and at each shape, measured on its own,
    the photo and the instruction are used. On this VM (5.5 min): held-out loss +10% to +23%
    without the photo and +3% to +9% with the wrong instruction, per shape; at t = 800 (96% noise)
    each shape's denoised estimate has 0.35-0.45 times the copy prior's error. As in the square
    short run, the sampled edits are not yet better than the photo at this length."""
    summary = short_run(tmp_path / "check", "--sizes", "48x80,80x48,64x64")
    assert "--aspect_ratio_buckets" in summary["train_command"]
    buckets = summary["buckets"]
    assert [(b["width"], b["height"]) for b in buckets["buckets"]] == [(48, 80), (64, 64), (80, 48)]
    assert sum(b["samples"] for b in buckets["buckets"]) == buckets["num_samples"] and not buckets["merged"]
    assert_short_run_learned(summary)
    assert set(summary["verdicts_by_size"]) == {"48x80", "80x48", "64x64"}
    for size, verdicts in summary["verdicts_by_size"].items():
        denoised, held = summary["denoised_errors_by_size"][size]["by_timestep"], summary["heldout_by_size"][size]
        assert verdicts["heldout_verdict"]["gap_no_image_pct"] > 5, (size, held)
        assert held["val_loss_wrong_instruction"] > held["val_loss"], (size, held)
        assert denoised["800"]["model"] < 0.7 * denoised["800"]["copy_prior"], (size, denoised["800"])
        for t in ("500", "700", "800"):
            assert denoised[t]["model_wrong_instruction"] > denoised[t]["model"], (size, t, denoised[t])
        assert summary["edit_errors_by_size"][size]["pairs"] > 10


SHORT_RUN = ["--num_pairs", "400", "--vae_steps", "300", "--vae_batch_size", "8", "--train_steps", "1200",
             "--ema_decay", "0.99", "--validation_steps", "400", "--eval_pairs", "32"]
LORA_EVERY_LAYER = ("to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,proj_in,proj_out,conv1,conv2,conv_shortcut,conv,"
                    "time_emb_proj,linear_1,linear_2,conv_out")


def test_denoised_errors_rows_for_each_timestep_and_variant(tiny_ip2p, one_thread):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ip2p.tiny.learning import denoised_errors
    from ip2p.method import EncodedBatch

    g = torch.Generator().manual_seed(0)
    n = 4
    batch = EncodedBatch(torch.randn(n, 4, 8, 8, generator=g), torch.zeros(n, 4, 8, 8),
                         torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 77, 64, generator=g),
                         torch.randn(n, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * n))
    unet = UNet2DConditionModel.from_pretrained(tiny_ip2p, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(tiny_ip2p, subfolder="scheduler")
    out = denoised_errors(unet, batch, scheduler, 0.5, timesteps=(100, 999))
    copy = (0.5 * (batch.original_latents - batch.edited_latent_mean)).pow(2).mean().item()
    assert out["copy_variance"] == pytest.approx(copy, rel=1e-4)
    assert set(out["by_timestep"]) == {"100", "999"}
    row = out["by_timestep"]["999"]
    assert set(row) == {"alpha_bar", "copy_prior", "model", "model_wrong_instruction", "model_no_image"}
    assert row["copy_prior"] == pytest.approx(copy, rel=0.15)  # at 99.5% noise: about the photo itself
    assert out["by_timestep"]["100"]["copy_prior"] < row["copy_prior"]
    assert denoised_errors(unet, batch, scheduler, 0.5, timesteps=(100, 999)) == out  # fixed noise
