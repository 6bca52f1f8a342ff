"""Learning check: does a tiny model, trained by the kit on a CPU, learn to do the edit it is told?

    python benchmarks/learning_check.py [--output_dir DIR] [--family sdxl|sd15] [--num_pairs 2400]
                                        [--vae_steps 500] [--train_steps 12000] [--eval_pairs 64] [--seed 0]
                                        [--lora_rank 8 [--lora_alpha 8] [--lora_target_modules M,...]]
                                        [--sizes 48x80,80x48,64x64]

On the demo's synthetic task (python -m ip2p.tiny.sample_data: recolour the shape, recolour the
background, swap square and circle; the instruction fully determines the edit), all through the
kit's own entry points:

  1. edit pairs -> convert_to_hf_dataset.py --val_fraction 0.15 (a held-out split);
  2. python -m ip2p.tiny.model --family F (a tiny SDXL by default, or SD 1.5), whose random VAE is
     then fitted for a few minutes on the training images (ip2p.tiny.learning.fit_vae: a random
     VAE scrambles images, see the design notes);
  3. train_instruct_pix2pix_sdxl.py --config configs/tiny_cpu.yaml with a larger batch, a cosine
     schedule and EMA (the flags are in the summary's train_command); it logs the held-out
     denoising loss with the right instruction, a wrong one and no photo (logs/heldout.jsonl);
  4. the saved pipeline edits held-out photos with their own instruction and with another pair's
     (ip2p.tiny.learning.edit_errors), compared with the ground truth and with copying the photo;
  5. the trained UNet's one-step denoised estimates at fixed noise levels, beside the best
     estimate that takes the photo for the edit (ip2p.tiny.learning.denoised_errors).

With --lora_rank the trainer trains LoRA adapters on the frozen tiny UNet (and its widened
conv_in) instead of the whole UNet; everything after reads the merged pipeline it saves. The tiny
UNet is random, so from scratch LoRA learns only when it adapts every layer (the README's LoRA
section: rank 64 on every Linear and Conv2d learns as full fine-tuning does; the default attention
targets alone do not); --continue_from an editor checks a low rank adapting a trained one.

With --sizes the pairs come in several shapes (WIDTHxHEIGHT each, taken in turn: portrait,
landscape and square pairs in equal numbers) and the trainer runs with --aspect_ratio_buckets
(the tiny model's buckets around 64², of which 48x80, 80x48 and 64x64 hold the pairs whole); the
VAE is fitted on every shape, and each measurement below is made at each shape on its own (the
summary's *_by_size entries, with their verdicts) as well as over all pairs.

"learns" is true when, at the end: the held-out loss is lower with the right instruction than
with a wrong one and than without the photo (by 2% each); at t=900 (98.6% of the variance is
noise) the UNet's estimate of the edited latent is closer to the truth than the best estimate that
takes the photo for the edit, and further with a wrong instruction (5% each); and the pipeline's
edits are closer to the ground truth than the unchanged photo, and further with a wrong
instruction (5% each, MSE of scaled latents). The sampled edits come last: sampling starts from
almost pure noise, the range a tiny model learns last (at 6,000 steps everything else holds but
the edits are not yet closer than the photo). Prints a JSON summary (also
OUT/learning_check.json); each part has its own verdict there. With several sizes "learns" also
needs the denoised estimates and the edits to pass at every size.

Continuing an editor (`--continue_from DIR`, DIR an earlier check's --output_dir): the trained
pipeline in DIR/run (8 channels, its VAE already fitted) is trained further, with the trainer's
own flags, on new pairs whose edit kinds `--edits` names, e.g. the never-seen remove_shape mixed
with the first run's kinds (replay, so that the old edits stay practised), at a lower learning
rate. Before and after, the pipeline edits held-out pairs of the new kind alone and the first
run's own held-out pairs: "learns_new_edit" when the new edit beats copying the photo after (and
did not before), "keeps_old_edits" when the first run's edits are still better than copying and
within 25% of their error before continuing (`continue_verdict`).
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
    Sampling, denoised_errors, denoised_verdict, edit_errors, edit_verdict, fit_vae, heldout_verdict, pool,
    size_groups, training_images)


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
            "--report_to", "none", "--seed", str(a.seed),
            *(lora_flags(a) if a.lora_rank else []),
            *(["--aspect_ratio_buckets"] if len(a.sizes.split(",")) > 1 else [])]


def lora_flags(a) -> list[str]:
    flags = ["--lora_rank", str(a.lora_rank), "--lora_alpha", str(a.lora_alpha or a.lora_rank)]
    return flags + (["--lora_target_modules", a.lora_target_modules] if a.lora_target_modules else [])


def read_curve(out: Path) -> list[dict]:
    path = out / "logs" / "heldout.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def check_edits_by_size(pipeline_dir: Path, data: Path, n: int, seed: int) -> dict[str, dict]:
    """ip2p.tiny.learning.edit_errors on the first `n` held-out pairs of each image size, at that
    size, with inference.py's defaults: {"WIDTHxHEIGHT": errors}."""
    import datasets
    from diffusers import DiffusionPipeline

    held = datasets.load_from_disk(str(data))["validation"]
    # the pipeline class its model_index.json names (either family)
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    inputs, prompts, truth = list(held["input_image"]), list(held["edit_prompt"]), list(held["edited_image"])
    return {size: edit_errors(pipe, [inputs[i] for i in members[:n]], [prompts[i] for i in members[:n]],
                              [truth[i] for i in members[:n]], Sampling(seed=seed))
            for size, members in size_groups(inputs).items()}


def check_edits(pipeline_dir: Path, data: Path, n: int, seed: int) -> dict:
    """`check_edits_by_size`, pooled over the sizes."""
    return pool(list(check_edits_by_size(pipeline_dir, data, n, seed).values()))


def check_denoising(cmd: list[str], pipeline_dir: Path) -> dict:
    """On the held-out pairs the trainer used (same flags, same encoding, each at its bucket when
    there are buckets), with the trained UNet, at each image size: ip2p.tiny.learning.denoised_errors
    ("denoised") and the held-out losses of the final weights ("heldout")."""
    from diffusers import UNet2DConditionModel

    from ip2p.models import load_parts, vae_scale_factor
    from ip2p.training.config import parse_config
    from ip2p.training.heldout import heldout_losses
    from ip2p.training.loop import encode_heldout_split
    from ip2p.training.pairs import load_splits

    cfg = parse_config(cmd[2:])
    parts = load_parts(cfg)
    buckets = None
    if cfg.aspect_ratio_buckets:  # the list the trainer wrote, (height, width) each
        listed = json.loads((Path(cfg.output_dir) / "logs" / "buckets.json").read_text())["listed"]
        buckets = [tuple(int(x) for x in reversed(b.split("x"))) for b in listed]
    held = encode_heldout_split(cfg, parts, load_splits(cfg)[1], torch.device("cpu"), torch.float32, buckets)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet").eval()
    sf, scale, out = parts.vae.config.scaling_factor, vae_scale_factor(parts.vae), {}
    for group in held if isinstance(held, list) else [held]:
        h, w = (scale * n for n in group.batch.original_latents.shape[-2:])
        losses = heldout_losses(unet, group, parts.noise_scheduler, sf, torch.float32)
        out[f"{w}x{h}"] = {"denoised": denoised_errors(unet, group.batch, parts.noise_scheduler, sf),
                           "heldout": {"pairs": len(group.batch), **{k: round(v, 5) for k, v in losses.items()}}}
    return out


def make_data(py: str, work: Path, name: str, a, num_pairs: int, val_fraction: float, seed: int) -> Path:
    """Synthetic pairs of the kinds in --edits, converted with a held-out split."""
    raw, data = work / f"{name}_pairs", work / f"{name}_data"
    run([py, "-m", "ip2p.tiny.sample_data", "--output_dir", str(raw), "--num_pairs", str(num_pairs),
         "--sizes", a.sizes, "--seed", str(seed), "--edits", a.edits, "--overwrite"], work / f"{name}_sample_data.log")
    run([py, "convert_to_hf_dataset.py", "--data_dir", str(raw), "--output_dir", str(data),
         "--val_fraction", str(val_fraction), "--overwrite"], work / f"{name}_convert.log")
    return data


def continue_verdict(before: dict, after: dict, max_old_ratio: float = 1.25) -> dict:
    """The new edit is learned when its edits beat copying the photo after continuing and did not
    before. (Its wrong-instruction control is reported but not judged: every pair of that held-out
    set is the same kind of edit, so another pair's instruction mostly asks for the same change.)
    The old edits are kept when they still beat copying, within `max_old_ratio` of their error
    before continuing."""
    new_before, new_after = edit_verdict(before["new_edit"]), edit_verdict(after["new_edit"])
    old_after = edit_verdict(after["old_edits"])
    old_ratio = after["old_edits"]["right_instruction_latent"] / before["old_edits"]["right_instruction_latent"]
    return {"learns_new_edit": new_after["beats_copying_input"] and not new_before["beats_copying_input"],
            "keeps_old_edits": old_after["beats_copying_input"] and old_ratio <= max_old_ratio,
            "old_edit_error_ratio": round(old_ratio, 3),
            "verdicts": {"new_before": new_before, "new_after": new_after, "old_after": old_after}}


def continue_check(a, work: Path, t0: float) -> dict:
    """Train the earlier check's pipeline further on --edits pairs; measure new and old edits."""
    py, first = sys.executable, Path(a.continue_from).resolve()
    start, old_data = first / "run", first / "data"
    if not (start / "model_index.json").is_file() or not (old_data / "dataset_dict.json").is_file():
        raise SystemExit(f"--continue_from {first}: not the --output_dir of an earlier learning check")
    train_data = make_data(py, work, "train", a, a.num_pairs, 0.15, a.seed + 1)
    new_only = dict(vars(a), edits=a.new_edit)
    new_data = make_data(py, work, "new_edit", argparse.Namespace(**new_only), 2 * a.eval_pairs, 0.5, a.seed + 2)
    before = {"new_edit": check_edits(start, new_data, a.eval_pairs, a.seed),
              "old_edits": check_edits(start, old_data, a.eval_pairs, a.seed)}
    out = work / "run"
    cmd = train_cmd(a, start, train_data, out)
    t = time.time()
    run(cmd, work / "train.log")
    train_s = round(time.time() - t, 1)
    after = {"new_edit": check_edits(out, new_data, a.eval_pairs, a.seed),
             "old_edits": check_edits(out, old_data, a.eval_pairs, a.seed)}
    return {
        **continue_verdict(before, after), "before": before, "after": after,
        "heldout_curve": read_curve(out), "train_s": train_s, "wall_time_s": round(time.time() - t0, 1),
        "train_command": shlex.join(cmd), "continue_from": str(first), "settings": vars(a),
    }


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
    p.add_argument("--lora_rank", type=int, default=0,
                   help="train LoRA adapters of this rank (+ the widened conv_in) instead of the whole UNet")
    p.add_argument("--lora_alpha", type=float, default=None, help="with --lora_rank (default: the rank)")
    p.add_argument("--lora_target_modules", default=None,
                   help="with --lora_rank (default: the trainer's, attention and feed-forward projections)")
    p.add_argument("--continue_from", default=None,
                   help="an earlier check's --output_dir: continue its trained pipeline on --edits pairs")
    p.add_argument("--edits", default="recolour_shape,recolour_background,swap_shape",
                   help="edit kinds of the training pairs (python -m ip2p.tiny.sample_data --edits)")
    p.add_argument("--new_edit", default="remove_shape",
                   help="with --continue_from: the edit kind the first run never saw, measured alone")
    p.add_argument("--sizes", default="64x64",
                   help="the pairs' WIDTHxHEIGHT, comma-separated, taken in turn (e.g. 48x80,80x48,64x64); "
                        "more than one trains with --aspect_ratio_buckets and measures at each (default: 64x64)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.time()
    work = Path(a.output_dir or tempfile.mkdtemp(prefix="ip2p-learning-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if a.continue_from:
        summary = continue_check(a, work, t0)
        (work / "learning_check.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
        return 0
    raw, data, model, out = work / "pairs", work / "data", work / f"tiny-{a.family}", work / "run"
    py, timings = sys.executable, {}

    run([py, "-m", "ip2p.tiny.sample_data", "--output_dir", str(raw), "--num_pairs", str(a.num_pairs),
         "--sizes", a.sizes, "--seed", str(a.seed), "--edits", a.edits, "--overwrite"], work / "sample_data.log")
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
    errors_by_size = check_edits_by_size(out, data, a.eval_pairs, a.seed)
    by_size = check_denoising(cmd, out)
    timings["edit_check_s"] = round(time.time() - t, 1)
    errors = pool(list(errors_by_size.values()))
    denoising = pool([m["denoised"] for m in by_size.values()])

    held, edits, denoised = heldout_verdict(curve[-1]), edit_verdict(errors), denoised_verdict(denoising)
    per_size = {size: {"edit_verdict": edit_verdict(errors_by_size[size]),
                       "denoised_verdict": denoised_verdict(m["denoised"]),
                       "heldout_verdict": heldout_verdict(m["heldout"])} for size, m in by_size.items()}
    learns = all((held["uses_instruction"], held["uses_photo"], denoised["beats_copy_prior"],
                  denoised["wrong_instruction_worse"], edits["beats_copying_input"],
                  edits["wrong_instruction_worse"],
                  # with several sizes, the edit at each (the held-out loss per size is reported)
                  *(v["edit_verdict"]["beats_copying_input"] and v["edit_verdict"]["wrong_instruction_worse"]
                    and v["denoised_verdict"]["beats_copy_prior"] and v["denoised_verdict"]["wrong_instruction_worse"]
                    for v in per_size.values())))
    summary = {
        "learns": learns,
        "heldout_final": curve[-1], "heldout_verdict": held, "denoised_verdict": denoised,
        "edit_verdict": edits, "edit_errors": errors, "denoised_errors": denoising,
        "verdicts_by_size": per_size, "edit_errors_by_size": errors_by_size,
        "denoised_errors_by_size": {size: m["denoised"] for size, m in by_size.items()},
        "heldout_by_size": {size: m["heldout"] for size, m in by_size.items()},
        "buckets": json.loads((out / "logs" / "buckets.json").read_text()) if (out / "logs" / "buckets.json").is_file() else None,
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
