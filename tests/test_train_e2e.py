"""The trainer end to end on a tiny SDXL on the CPU, as users run it (its main, in this process)."""

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import train_in_process as run_train  # the trainer's main, in this process

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "tiny_cpu_losses.json"


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def tiny_args(tiny_sdxl, tiny_pairs, out, *extra):
    return ["--config", "configs/tiny_cpu.yaml", "--pretrained_model_name_or_path", tiny_sdxl,
            "--data_dir", tiny_pairs, "--output_dir", out, *extra]


def test_train_checkpoint_resume_and_load(tiny_sdxl, tiny_pairs, tmp_path):
    out = tmp_path / "run"
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (80, 64), (200, 40, 40)).save(photo)
    # 10 pairs, batch 4: every epoch ends on a short batch of 2; accumulation 2 -> 2 steps per epoch
    args = tiny_args(tiny_sdxl, tiny_pairs, out, "--gradient_accumulation_steps", 2, "--checkpointing_steps", 2,
                     "--checkpoints_total_limit", 2, "--val_image_url_or_path", photo,
                     "--validation_prompt", "make it blue", "--validation_steps", 2,
                     "--hub_token", "hf_do_not_leak_this")
    first = run_train(*args, "--max_train_steps", 4)
    assert "= 8 per optimizer step" in first.stdout + first.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert all({"loss", "lr", "samples_per_s"} <= set(m) for m in metrics(out))
    assert (out / "validation" / "step-2.png").is_file() and (out / "validation" / "step-4.png").is_file()

    second = run_train(*args, "--max_train_steps", 6, "--resume_from_checkpoint", "latest")
    assert "resumed from" in second.stdout + second.stderr and "checkpoint-4" in second.stdout + second.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    # the total limit keeps the two newest
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert json.loads((out / "checkpoint-6" / "training_state.json").read_text())["global_step"] == 6

    import torch
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    pipe = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(out)
    assert pipe.unet.config.in_channels == 8 and pipe.unet.dtype == torch.float32
    assert pipe.unet.config.sample_size * 8 == 64  # the training resolution is the default size
    image = pipe("make it blue", image=Image.open(photo), num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    card = (out / "README.md").read_text()
    assert "optimizer steps | 6" in card and "validation/step-6.png" in card
    # the token is nowhere in what the run wrote or printed
    assert "hf_do_not_leak_this" not in first.stdout + first.stderr + second.stdout + second.stderr
    for path in out.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert b"hf_do_not_leak_this" not in path.read_bytes(), path


def test_golden_losses(tiny_sdxl, tiny_pairs, tmp_path):
    """Per-step losses of the tiny recipe are stored; a silent change to the math changes them."""
    out = tmp_path / "run"
    run_train(*tiny_args(tiny_sdxl, tiny_pairs, out, "--max_train_steps", 5, "--report_to", "none"))
    losses = [m["loss"] for m in metrics(out)]
    if os.environ.get("IP2P_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=1))
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(golden, rel=1e-4, abs=1e-6)


def test_lr_schedule_counts_optimizer_steps_with_ema_workers_and_xformers_fallback(tiny_sdxl, tiny_pairs, tmp_path):
    out = tmp_path / "run"
    proc = run_train(*tiny_args(
        tiny_sdxl, tiny_pairs, out, "--max_train_steps", 6, "--gradient_accumulation_steps", 2,
        "--lr_scheduler", "linear", "--lr_warmup_steps", 2, "--learning_rate", 1e-3, "--use_ema",
        "--dataloader_num_workers", 2, "--enable_xformers_memory_efficient_attention",
        "--save_dtype", "fp16", "--report_to", "none", "--checkpointing_steps", 3))
    assert "using PyTorch SDPA" in proc.stderr
    lrs = [m["lr"] for m in metrics(out)]
    # warmup over 2 optimizer steps, then linear to zero at step 6, whatever the accumulation
    assert lrs == pytest.approx([5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0], abs=1e-9)
    assert len(list((out / "checkpoint-3").glob("custom_checkpoint_*"))) == 3  # schedule, position, EMA
    from safetensors import safe_open

    with safe_open(out / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}


def test_workers_do_not_change_the_losses(tiny_sdxl, tiny_pairs, tmp_path):
    runs = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        run_train(*tiny_args(tiny_sdxl, tiny_pairs, out, "--max_train_steps", 3, "--report_to", "none",
                             "--dataloader_num_workers", workers))
        runs.append([m["loss"] for m in metrics(out)])
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--data_dir", "/nonexistent/data"], "does not exist"),
    (["--pretrained_model_name_or_path", "/nonexistent/model"], "does not exist"),
    (["--edit_prompt_column", "instruction"], "'instruction' is not a column of the dataset; its columns are: input_image, edit_prompt, edited_image"),
    (["--resolution", "100"], "multiple of 8"),
    (["--resume_from_checkpoint", "/tmp"], "not a checkpoint folder"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-5"], "does not exist"),
    (["--push_to_hub"], "--push_to_hub needs the network, but HF_HUB_OFFLINE is set"),  # conftest: offline
    (["--report_to", "comet_ml"], "--report_to comet_ml: the comet_ml package is not installed"),
    (["--report_to", "tensorboard,wandb"], "--report_to wandb: the wandb package is not installed"),
    (["--report_to", "tensorbored"], "'tensorbored' is not a tracker accelerate supports"),
    (["--use_8bit_adam", "--optimizer", "adamw8bit_torchao"], "name two optimizers; keep one"),
    (["--optimizer", "adamw8bit_torchao"], "needs torchao: pip install torchao"),  # not installed for the tests
    pytest.param(["--use_8bit_adam"], "needs a CUDA GPU (bitsandbytes)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="8-bit Adam runs where there is CUDA")),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_sdxl, tiny_pairs, tmp_path, extra, message, capsys):
    from train_instruct_pix2pix_sdxl import main

    out = tmp_path / "run"
    rc = main([str(a) for a in tiny_args(tiny_sdxl, tiny_pairs, out) + extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert message in err[-1] and err[-1].startswith("error: ")
    assert not out.exists()


def test_a_model_folder_without_a_pipeline_index_is_refused(tiny_pairs, tmp_path, capsys):
    from train_instruct_pix2pix_sdxl import main

    (tmp_path / "model" / "unet").mkdir(parents=True)
    rc = main(["--pretrained_model_name_or_path", str(tmp_path / "model"), "--data_dir", str(tiny_pairs),
               "--output_dir", str(tmp_path / "run")])
    assert rc == 2 and "model holds no model_index.json; supported: an SDXL or SD 1.x/2.x base" in capsys.readouterr().err
