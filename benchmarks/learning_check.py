"""Learning check: does a tiny model, trained by the kit on a CPU, learn to do the edit it is told?

    python benchmarks/learning_check.py [--output_dir DIR] [--family sdxl|sd15] [--num_pairs 2400]
                                        [--vae_steps 500] [--train_steps 12000] [--eval_pairs 64] [--seed 0]

On the demo's synthetic task (python -m ip2p.tiny.sample_data: recolour the shape, recolour the
background, swap square and circle; the instruction fully determines the edit), all through the
kit's own entry points:

  1. edit pairs -> convert_to_hf_dataset.py --val_fraction 0.15 (a held-out split);
  2. python -m ip2p.tiny.model --family F (a tiny SDXL by default, or SD 1.5), whose random VAE is then fitted for a few minutes on the training
     images (ip2p.tiny.learning.fit_vae: a random VAE scrambles images, see the design notes);
  3. train_instruct_pix2pix_sdxl.py --config configs/tiny_cpu.yaml with a larger batch, a cosine
     schedule and EMA (the flags are in the summary's train_command); it logs the held-out
     denoising loss with the right instruction, a wrong one and no photo (logs/heldout.jsonl);
  4. the saved pipeline edits held-out photos with their own instruction and with another pair's
     (ip2p.tiny.learning.edit_errors), compared with the ground truth and with copying the photo;
  5. the trained UNet's one-step denoised estimates at fixed noise levels, beside the best
     estimate that takes the photo for the edit (ip2p.tiny.learning.denoised_errors).

"learns" is true when, at the end: the held-out loss is lower with the right instruction than
with a wrong one and than without the photo (by 2% each); at t=900 (98.6% of the variance is
noise) the UNet's estimate of the edited latent is closer to the truth than the best estimate that
takes the photo for the edit, and further with a wrong instruction (5% each); and the pipeline's
edits are closer to the ground truth than the unchanged photo, and further with a wrong
instruction (5% each, MSE of scaled latents). The sampled edits come last: sampling starts from
almost pure noise, the range a tiny model learns last (at 6,000 steps everything else holds but
the edits are not yet closer than the photo). Prints a JSON summary (also
OUT/learning_check.json); each part has its own verdict there.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ip2p.tiny.learning import (  # noqa: E402
    Sampling, denoised_errors, denoised_verdict, edit_errors, edit_verdict, fit_vae, heldout_verdict,
    training_images)


def run(cmd: list[str], log: Path) -> None:
    """Run a kit entry point from the repository root, its output into `log`."""
    print("+", shlex.join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}; log: {log}")


def train_cmd(a, model: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "train_instruct_pix2pix_sdxl.py", "--config", "configs/tiny_cpu.yaml",
            "--pretrained_model_name_or_path", str(model), "--data_dir", str(data),
            "--output_dir", str(out), "--max_train_steps", str(a.train_steps),
            "--train_batch_size", str(a.train_batch_size), "--learning_rate", str(a.learning_rate),
            "--lr_scheduler", "cosine", "--use_ema", "--ema_decay", str(a.ema_decay),
            "--validation_steps", str(a.validation_steps), "--checkpointing_steps", "1000000",
            "--report_to", "none", "--seed", str(a.seed)]


def read_curve(out: Path) -> list[dict]:
    path = out / "logs" / "heldout.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def check_edits(pipeline_dir: Path, data: Path, n: int, seed: int) -> dict:
    """ip2p.tiny.learning.edit_errors on the first `n` held-out pairs, with inference.py's defaults."""
    import datasets
    from diffusers import DiffusionPipeline

    held = datasets.load_from_disk(str(data))["validation"]
    held = held.select(range(min(n, len(held))))
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)  # the class its model_index.json names
    pipe.set_progress_bar_config(disable=True)
    return edit_errors(pipe, list(held["input_image"]), list(held["edit_prompt"]),
                       list(held["edited_image"]), Sampling(seed=seed))


def check_denoising(cmd: list[str], pipeline_dir: Path) -> dict:
    """ip2p.tiny.learning.denoised_errors on the held-out pairs the trainer used (same flags, same
    encoding), with the trained UNet."""
    from diffusers import UNet2DConditionModel

    from ip2p.training.config import parse_config
    from ip2p.training.pairs import load_splits
    from ip2p.models import load_parts
    from ip2p.training.loop import encode_heldout_split

    cfg = parse_config(cmd[2:])
    parts = load_parts(cfg)
    held = encode_heldout_split(cfg, parts, load_splits(cfg)[1], torch.device("cpu"), torch.float32)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet").eval()
    return denoised_errors(unet, held.batch, parts.noise_scheduler, parts.vae.config.scaling_factor)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=None, help="work folder (default: a new temp folder)")
    p.add_argument("--family", choices=("sdxl", "sd15"), default="sdxl", help="the tiny model's family")
    p.add_argument("--num_pairs", type=int, default=2400, help="synthetic pairs, 15%% held out")
    p.add_argument("--vae_steps", type=int, default=500, help="VAE fitting steps")
    p.add_argument("--vae_batch_size", type=int, default=32)
    p.add_argument("--train_steps", type=int, default=12000, help="trainer optimizer steps")
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--validation_steps", type=int, default=2000,
                   help="held-out loss every N steps (the curve in the summary)")
    p.add_argument("--eval_pairs", type=int, default=64, help="held-out pairs to edit at the end")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.time()
    work = Path(a.output_dir or tempfile.mkdtemp(prefix="ip2p-learning-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    raw, data, model, out = work / "pairs", work / "data", work / f"tiny-{a.family}", work / "run"
    py, timings = sys.executable, {}

    run([py, "-m", "ip2p.tiny.sample_data", "--output_dir", str(raw), "--num_pairs", str(a.num_pairs),
         "--size", "64", "--seed", str(a.seed), "--overwrite"], work / "sample_data.log")
    run([py, "convert_to_hf_dataset.py", "--data_dir", str(raw), "--output_dir", str(data),
         "--val_fraction", "0.15", "--overwrite"], work / "convert.log")
    run([py, "-m", "ip2p.tiny.model", "--output_dir", str(model), "--family", a.family, "--seed", str(a.seed),
         "--overwrite"],
        work / "tiny_model.log")
    timings["data_and_model_s"] = round(time.time() - t0, 1)

    t = time.time()
    vae = fit_vae(model, training_images(data), a.vae_steps, a.seed, batch_size=a.vae_batch_size)
    timings["vae_fit_s"] = round(time.time() - t, 1)

    t = time.time()
    cmd = train_cmd(a, model, data, out)
    run(cmd, work / "train.log")
    timings["train_s"] = round(time.time() - t, 1)
    curve = read_curve(out)
    if not curve:
        raise SystemExit(f"no held-out losses in {out}/logs/heldout.jsonl; see {work}/train.log")

    t = time.time()
    errors = check_edits(out, data, a.eval_pairs, a.seed)
    denoising = check_denoising(cmd, out)
    timings["edit_check_s"] = round(time.time() - t, 1)

    held, edits, denoised = heldout_verdict(curve[-1]), edit_verdict(errors), denoised_verdict(denoising)
    learns = all((held["uses_instruction"], held["uses_photo"], denoised["beats_copy_prior"],
                  denoised["wrong_instruction_worse"], edits["beats_copying_input"],
                  edits["wrong_instruction_worse"]))
    summary = {
        "learns": learns,
        "heldout_final": curve[-1], "heldout_verdict": held, "denoised_verdict": denoised,
        "edit_verdict": edits, "edit_errors": errors, "denoised_errors": denoising,
        "heldout_curve": curve, "vae": vae,
        "timings": timings, "wall_time_s": round(time.time() - t0, 1),
        "command": shlex.join([py, "benchmarks/learning_check.py"] + (argv if argv is not None else sys.argv[1:])),
        "train_command": shlex.join(cmd), "output_dir": str(work), "settings": vars(a),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    (work / "learning_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
