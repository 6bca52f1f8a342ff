"""The trainer on CUDA: EMA across a resume, bf16, and the two optimizers the recipes use.

Each run is a subprocess: accelerate's state is one per process, and runs in other precisions
cannot share it."""

import math
from types import SimpleNamespace

import torch

from gpu.conftest import GPU

pytestmark = GPU


def test_ema_run_resumes_on_cuda_and_finishes(train, metrics, tmp_path):
    # The EMA shadow is loaded from the checkpoint; it must live where the UNet does, or the
    # first EMA step after the resume mixes devices.
    out = tmp_path / "run"
    flags = ["--use_ema", "--checkpointing_steps", 2]
    train(out, *flags, "--max_train_steps", 2)
    log = train(out, *flags, "--max_train_steps", 4, "--resume_from_checkpoint", "latest")
    assert "checkpoint-2 at optimizer step 2" in log
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert len(list((out / "checkpoint-4").glob("custom_checkpoint_*"))) == 3  # schedule, position, EMA
    assert (out / "model_index.json").is_file()


def test_bf16_with_8bit_adam_has_finite_losses(train, metrics, tmp_path):
    # the default recipe's precision and optimizer
    out = tmp_path / "run"
    train(out, "--mixed_precision", "bf16", "--use_8bit_adam", "--max_train_steps", 3)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["skipped_steps"] == 0
    from safetensors import safe_open

    with safe_open(out / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:  # --save_dtype fp32
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F32"}


def optimizer(use_8bit_adam: bool, param: torch.nn.Parameter):
    from ip2p.training.setup import make_optimizer

    cfg = SimpleNamespace(adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-8,
                          use_8bit_adam=use_8bit_adam)
    return make_optimizer(cfg, [param], 1e-3, torch.device("cuda"))


def test_8bit_adam_steps_on_cuda_with_8bit_state():
    # bitsandbytes is in requirements.txt: on a GPU node its absence is a broken install, not a skip
    param = torch.nn.Parameter(torch.randn(64, 128, device="cuda"))  # >= 4096 values: 8-bit state
    opt = optimizer(True, param)
    assert type(opt).__name__ == "AdamW8bit"
    before = param.detach().clone()
    param.grad = torch.randn_like(param)
    opt.step()
    assert not torch.equal(before, param.detach()) and torch.isfinite(param).all()
    assert opt.state[param]["state1"].dtype == torch.uint8


def test_adamw_is_fused_on_cuda():
    param = torch.nn.Parameter(torch.randn(8, 8, device="cuda"))
    opt = optimizer(False, param)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    param.grad = torch.ones_like(param)
    opt.step()


def test_encoding_on_the_fly_trains_on_cuda(train, metrics, tmp_path):
    # the batch reaches the step on the GPU, sizes included: the time ids must be made there
    out = tmp_path / "run"
    train(out, "--no_cache_latents", "--mixed_precision", "bf16", "--max_train_steps", 2)
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_lora_with_8bit_adam_bf16_and_ema_resumes_on_cuda(train, metrics, tmp_path):
    # the 24 GB recipe's settings on the tiny model, with 8-bit Adam and an EMA of the adapters
    out = tmp_path / "run"
    flags = ["--lora_rank", 4, "--mixed_precision", "bf16", "--use_8bit_adam", "--use_ema", "--gradient_checkpointing",
             "--checkpointing_steps", 2]
    train(out, *flags, "--max_train_steps", 2)
    log = train(out, *flags, "--max_train_steps", 4, "--resume_from_checkpoint", "latest")
    assert "checkpoint-2 at optimizer step 2" in log
    assert all(math.isfinite(r["loss"]) for r in metrics(out))
    assert (out / "checkpoint-4" / "trainable_weights.safetensors").is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "model_index.json").is_file()
