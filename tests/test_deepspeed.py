"""DeepSpeed ZeRO-2 for real, on the CPU: accelerate's DeepSpeed path with the kit's own configs.

DeepSpeed runs on a CPU through its CPU accelerator (gloo), one process; accelerate does not split
the data across several DeepSpeed processes without CUDA, so the multi-GPU case stays for a GPU
node (benchmarks/gpu_check.sh). Under DeepSpeed `accelerator.backward` already applies the update
and `clip_grad_norm_` returns a Python float: the kit's own non-finite check crashed on that at the
first optimizer step; DeepSpeed's own overflow check decides instead and the skip is counted.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_in_session
from test_distributed import free_port
from test_train_e2e import metrics

pytest.importorskip("deepspeed", reason="DeepSpeed is in requirements-dev.txt")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def launch(config: Path, script: Path, *args, timeout=900) -> str:
    """`accelerate launch` with a DeepSpeed config, as train.sh does on a GPU node."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    proc = run_in_session([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                           "--main_process_port", free_port(), script, *args], timeout, cwd=ROOT,
                          env={**env, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def zero2_config(tmp_path_factory) -> Path:
    """The accelerate config setup_accelerate.sh writes for ZeRO-2 on one GPU."""
    out = tmp_path_factory.mktemp("acc") / "zero2.yaml"
    proc = subprocess.run([str(ROOT / "setup_accelerate.sh"), "--backend", "deepspeed", "--num_gpus", "1",
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out


def test_zero2_trains_skips_a_non_finite_step_checkpoints_and_resumes(tiny_sdxl, tiny_pairs, zero2_config,
                                                                     tmp_path):
    out = tmp_path / "run"
    args = ["--config", "configs/tiny_cpu.yaml", "--pretrained_model_name_or_path", tiny_sdxl, "--data_dir",
            tiny_pairs, "--output_dir", out, "--report_to", "none", "--mixed_precision", "bf16",
            "--gradient_accumulation_steps", 2, "--checkpointing_steps", 2, "--lr_scheduler", "linear",
            "--lr_warmup_steps", 2]
    # the 3rd micro-batch's loss is NaN: optimizer step 2 has non-finite gradients
    patched = tmp_path / "nan_at_step_2.py"
    patched.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import ip2p.training.step as step
        real, calls = step.forward_loss, []
        def forward_loss(*args, **kwargs):
            calls.append(1)
            loss = real(*args, **kwargs)
            return loss * float("nan") if len(calls) == 3 else loss
        step.forward_loss = forward_loss
        from train_instruct_pix2pix_sdxl import main
        sys.exit(main())
    """))
    log = launch(zero2_config, patched, *args, "--max_train_steps", 4)
    assert "1 processes x 4 per device x 2 accumulation = 8 per optimizer step" in log
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]  # DeepSpeed skipped it, the kit counted it
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 5e-4, 0.0])  # counted in optimizer steps
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    log = launch(zero2_config, ROOT / "train_instruct_pix2pix_sdxl.py", *args, "--max_train_steps", 6,
                 "--resume_from_checkpoint", "latest")
    assert "resumed from" in log and "checkpoint-4" in log
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] == r["loss"] for r in rows if r["step"] != 2)  # finite after the skipped step
    assert json.loads((out / "checkpoint-6" / "training_state.json").read_text())["global_step"] == 6

    import torch
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    pipe = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(out)
    assert pipe.unet.config.in_channels == 8
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())


def test_zero2_trains_with_aspect_ratio_buckets(tiny_sdxl, zero2_config, tmp_path):
    """A batch sampler leaves the DataLoader's batch_size unset, from which accelerate fills
    DeepSpeed's "auto" micro-batch size: the kit states it instead (it crashed at prepare)."""
    from test_buckets import write_three_aspect_pairs

    data, out = write_three_aspect_pairs(tmp_path / "data"), tmp_path / "run"
    log = launch(zero2_config, ROOT / "train_instruct_pix2pix_sdxl.py", "--config", "configs/tiny_cpu.yaml",
                 "--pretrained_model_name_or_path", tiny_sdxl, "--data_dir", data, "--output_dir", out,
                 "--report_to", "none", "--aspect_ratio_buckets", "--max_train_steps", 3,
                 "--checkpointing_steps", 100, "--validation_steps", 100)
    assert "3 in use of 5, 12 samples" in log and "1 processes x 4 per device x 1 accumulation" in log
    assert [r["step"] for r in metrics(out)] == [1, 2, 3] and (out / "model_index.json").is_file()
