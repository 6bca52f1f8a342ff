"""LoRA (--lora_rank): a frozen UNet with adapters (+ conv_in), checkpoints of what trains only,
exact resume, the adapter in diffusers' format next to the merged pipeline, inference.py --lora."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_main
from test_train_e2e import metrics, run_train, tiny_args

ROOT = Path(__file__).resolve().parents[1]
LORA = ["--lora_rank", 4, "--lora_alpha", 8, "--learning_rate", 1e-3]


def edit_with_inference(model, out: Path, photo: Path, *extra) -> np.ndarray:
    from inference import main

    proc = run_main(main, ["--model_path", model, "--input_image", photo, "--instruction", "make it blue",
                           "--output_path", out, "--num_inference_steps", 2, *extra])
    assert proc.returncode == 0, proc.stderr[-2000:]
    from PIL import Image

    return np.asarray(Image.open(out), dtype=np.float32)


@pytest.fixture(scope="module")
def lora_runs(tiny_sdxl, tiny_pairs, tmp_path_factory):
    """A 4-step LoRA run from the 4-channel tiny SDXL (EMA, dropout, validation, accumulation 2),
    and the same run resumed from its step-2 checkpoint."""
    from PIL import Image

    root = tmp_path_factory.mktemp("lora")
    photo = root / "photo.png"
    Image.new("RGB", (80, 64), (200, 40, 40)).save(photo)
    extra = [*LORA, "--max_train_steps", 4, "--checkpointing_steps", 2, "--conditioning_dropout_prob", 0.2,
             "--gradient_accumulation_steps", 2, "--use_ema", "--ema_decay", 0.9, "--report_to", "none",
             "--val_image_url_or_path", photo, "--validation_prompt", "make it blue", "--validation_steps", 2]
    whole, resumed = root / "whole", root / "resumed"
    first = run_train(*tiny_args(tiny_sdxl, tiny_pairs, whole, *extra))
    run_train(*tiny_args(tiny_sdxl, tiny_pairs, resumed, *extra, "--resume_from_checkpoint", whole / "checkpoint-2"))
    return whole, resumed, photo, first


def test_a_lora_run_resumes_bit_identically_from_a_checkpoint_of_what_trains(lora_runs, tiny_sdxl):
    from safetensors.torch import load_file

    whole, resumed, _, first = lora_runs
    assert "saved the LoRA adapter and the merged InstructPix2Pix pipeline" in first.stdout
    for name in ("pytorch_lora_weights.safetensors", "conv_in.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(whole / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    assert [m["loss"] for m in metrics(whole)][2:] == [m["loss"] for m in metrics(resumed)]

    checkpoint = whole / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists()  # accelerate's whole-UNet file
    held = load_file(checkpoint / "trainable_weights.safetensors")
    assert any("lora_A" in k for k in held) and {"conv_in.weight", "conv_in.bias"} <= set(held)
    assert not any(k.endswith("to_q.base_layer.weight") for k in held)  # no frozen weight
    trained = sum(v.numel() for v in held.values())
    unet = sum(v.numel() for v in load_file(whole / "unet" / "diffusion_pytorch_model.safetensors").values())
    assert trained < unet / 10
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    assert size < 4 * 4 * unet / 3  # weights + two Adam moments + EMA of the trained part only, and small files


def test_the_adapter_and_the_merged_pipeline_give_the_same_edit_in_plain_diffusers(lora_runs, tiny_sdxl):
    """The model card's lines: a widened base UNet, the trained conv_in, load_lora_weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInstructPix2PixPipeline, UNet2DConditionModel
    from PIL import Image
    from safetensors.torch import load_file

    whole, _, photo, _ = lora_runs
    card = (whole / "README.md").read_text()
    assert "load_lora_weights" in card and "ignore_mismatched_sizes=True" in card
    merged = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(whole, local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet", in_channels=8,
                                                ignore_mismatched_sizes=True, low_cpu_mem_usage=False)
    unet.conv_in.load_state_dict(load_file(whole / "conv_in.safetensors"))
    adapted = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(tiny_sdxl, unet=unet, local_files_only=True)
    adapted.load_lora_weights(whole)
    adapted.scheduler = EulerDiscreteScheduler.from_config(adapted.scheduler.config)
    image = Image.open(photo)

    def edit(pipe):
        return pipe("make it blue", image=image, height=64, width=64, num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    a, b = edit(merged), edit(adapted)
    assert np.abs(a - b).max() < 1e-4


def test_inference_applies_the_adapter_to_the_base_as_the_merged_pipeline_edits(lora_runs, tiny_sdxl, tmp_path):
    whole, _, photo, _ = lora_runs
    merged = edit_with_inference(whole, tmp_path / "merged.png", photo)
    adapted = edit_with_inference(tiny_sdxl, tmp_path / "adapted.png", photo, "--lora", whole)
    assert merged.shape == adapted.shape and np.abs(merged - adapted).max() <= 1  # 8-bit rounding
    off = edit_with_inference(tiny_sdxl, tmp_path / "off.png", photo, "--lora", whole, "--lora_scale", 0)
    assert np.abs(off - adapted).max() > 0


def test_on_an_instruct_pix2pix_start_only_the_adapter_trains(tiny_sd15_ip2p, tiny_pairs, tmp_path):
    """SD 1.5's InstructPix2Pix pipeline: conv_in as trained, so no conv_in file; --save_merged
    false leaves only the adapter, which inference.py applies to that pipeline."""
    from PIL import Image
    from safetensors.torch import load_file

    out = tmp_path / "run"
    run_train(*tiny_args(tiny_sd15_ip2p, tiny_pairs, out, *LORA, "--max_train_steps", 2, "--checkpointing_steps", 2,
                         "--report_to", "none", "--save_merged", "false"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / "conv_in.safetensors").exists() and not (out / "model_index.json").exists()
    held = load_file(out / "checkpoint-2" / "trainable_weights.safetensors")
    assert held and all("lora_" in k for k in held)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(photo)
    adapted = edit_with_inference(tiny_sd15_ip2p, tmp_path / "a.png", photo, "--lora", out)
    plain = edit_with_inference(tiny_sd15_ip2p, tmp_path / "p.png", photo, "--lora", out, "--lora_scale", 0)
    assert adapted.shape == plain.shape
    from inference import main

    proc = run_main(main, ["--model_path", out, "--input_image", photo, "--instruction", "x",
                           "--output_path", tmp_path / "x.png"])
    assert proc.returncode == 2 and "holds a LoRA adapter, not a pipeline" in proc.stderr


def test_bad_lora_flags_are_one_line_exit_2_and_nothing_written(tiny_sdxl, tiny_pairs, tmp_path):
    """Through the trainer for the check that needs the model (a target that matches no module), and
    in-process for the flag checks that run before anything loads (the same UserError line)."""
    from ip2p.training.config import check_config, parse_config
    from ip2p.errors import UserError

    out = tmp_path / "run"
    proc = run_train(*tiny_args(tiny_sdxl, tiny_pairs, out, "--lora_rank", 4, "--lora_target_modules",
                                "no_such_module", "--max_train_steps", 1), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--lora_target_modules no_such_module" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()
    base = ["--pretrained_model_name_or_path", str(tiny_sdxl), "--data_dir", str(tiny_pairs),
            "--output_dir", str(out)]
    for flags, message in [(["--lora_rank", "-1"], "--lora_rank -1 must be 0"),
                           (["--save_merged", "false"], "--save_merged false only applies to LoRA runs"),
                           (["--lora_rank", "4", "--lora_dropout", "1.5"], "--lora_dropout 1.5 must be in [0, 1)"),
                           (["--lora_rank", "4", "--lora_alpha", "0"], "--lora_alpha 0.0 must be positive")]:
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
            check_config(parse_config(base + flags))


def test_frozen_weights_take_the_mixed_precision_dtype_and_the_trained_ones_stay_fp32(tiny_sdxl):
    from diffusers import UNet2DConditionModel

    from ip2p.method import expand_conv_in
    from ip2p.training.lora import LoraSettings, attach_lora, cast_frozen

    unet = expand_conv_in(UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet"), 8)
    lora = LoraSettings(4, 4.0, 0.0, ("to_q", "to_k", "to_v", "to_out.0"), False)
    assert attach_lora(unet, lora, widened=True)
    cast_frozen(unet, torch.bfloat16)
    dtypes = {(p.requires_grad, p.dtype) for p in unet.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert "conv_in.weight" in names and all("lora_" in n or n.startswith("conv_in.") for n in names)
    json.dumps(lora.peft_config().to_dict(), default=str)  # the adapter file's metadata


@pytest.mark.slow
def test_lora_with_ddp_bf16_checkpointing_and_compile(tiny_sdxl, tiny_pairs, tmp_path):
    """Two processes through train.sh, bf16 autocast over bf16 frozen weights, gradient
    checkpointing (the frozen blocks still pass gradients to the adapters) and regional compilation."""
    from safetensors.torch import load_file

    from test_distributed import train_sh

    out = tmp_path / "ddp"
    proc = train_sh("--config", "configs/tiny_cpu.yaml", "--pretrained_model_name_or_path", tiny_sdxl,
                    "--data_dir", tiny_pairs, "--output_dir", out, "--report_to", "none", *LORA,
                    "--max_train_steps", 2, "--checkpointing_steps", 2, "--mixed_precision", "bf16",
                    "--gradient_checkpointing", "--torch_compile", processes=2)
    log = proc.stdout + proc.stderr
    assert log.count("weights identical on all 2 processes") == 2  # after the checkpoint and at the end
    assert all(np.isfinite(m["loss"]) for m in metrics(out))
    adapter = load_file(out / "pytorch_lora_weights.safetensors")
    ups = [v for k, v in adapter.items() if "lora_B" in k]
    assert ups and all(v.dtype == torch.float32 for v in adapter.values())
    assert any(v.abs().max() > 0 for v in ups)  # B starts at zero: every adapter that moved trained
