"""setup_accelerate.sh and train.sh as a user runs them."""

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def sh(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT, timeout=300, **kw)


@pytest.mark.parametrize("gpus, kind, processes", [(8, "MULTI_GPU", 8), (1, "NO", 1), (0, "NO", 1)])
def test_setup_accelerate_writes_a_config_accelerate_loads(tmp_path, gpus, kind, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    out = tmp_path / "acc.yaml"
    proc = sh(ROOT / "setup_accelerate.sh", "--num_gpus", gpus, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert f"ACCELERATE_CONFIG={out} ./train.sh" in proc.stdout
    config = load_config_from_file(str(out))
    assert config.distributed_type.value == kind and config.num_processes == processes
    assert config.mixed_precision == "bf16" and config.use_cpu == (gpus == 0)


@pytest.mark.parametrize("args, message", [
    (["--num_gpus", "two"], "--num_gpus must be a whole number"),
    (["--mixed_precision", "fp8"], "--mixed_precision must be no, fp16 or bf16"),
    (["--nodes", "2"], "unknown flag --nodes; did you mean --num_machines?"),
    (["--num_gpu", "2"], "unknown flag --num_gpu; did you mean --num_gpus?"),
    (["--num_machines", "2", "--num_gpus", "8"], "needs --main_process_ip"),
    (["--num_machines", "2", "--machine_rank", "2", "--main_process_ip", "h", "--num_gpus", "8"], "must be below"),
    (["--offload_optimizer", "--num_gpus", "8"], "--offload_optimizer needs --backend deepspeed"),
    (["--backend", "deepspeed", "--num_gpus", "0"], "needs GPUs"),
    (["--backend", "megatron", "--num_gpus", "8"], "--backend must be ddp, deepspeed or fsdp"),
])
def test_setup_accelerate_refuses_bad_flags(tmp_path, args, message):
    proc = sh(ROOT / "setup_accelerate.sh", *args, "--output", tmp_path / "x.yaml")
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="about a machine without a GPU")
def test_setup_accelerate_without_a_gpu_points_to_the_cpu_recipe_and_writes_nothing(tmp_path):
    proc = sh(ROOT / "setup_accelerate.sh", "--output", tmp_path / "x.yaml")
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert "no CUDA GPU" in proc.stderr and "./train.sh --config configs/tiny_cpu.yaml" in proc.stderr
    assert "--num_gpus 0" in proc.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_setup_accelerate_help_is_its_usage_only():
    proc = sh(ROOT / "setup_accelerate.sh", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("Stage 2: write the accelerate config")
    assert "--num_gpus 0" in proc.stdout and "--offload_optimizer" in proc.stdout
    assert proc.stdout.rstrip().endswith("--num_gpus 0 writes a CPU config all the same.")  # the header's end
    assert not [line for line in proc.stdout.splitlines() if line.startswith("#") or "set -euo" in line]


def test_configs_written_by_setup_accelerate_are_not_tracked():
    proc = sh("git", "check-ignore", "configs/accelerate/default.yaml")
    assert proc.returncode == 0, "configs/accelerate/ is per machine and must be ignored by git"


@pytest.mark.skipif(torch.cuda.is_available(), reason="about a machine without a GPU")
def test_train_sh_without_a_gpu_points_to_the_cpu_recipe():
    proc = sh(ROOT / "train.sh", "--data_dir", "./data_hf")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "configs/tiny_cpu.yaml" in proc.stderr


def test_train_sh_help_works_without_a_gpu():
    """Its own usage, then the trainer's flags; no GPU, model or data needed."""
    proc = sh(ROOT / "train.sh", "--help")
    assert proc.returncode == 0, proc.stderr
    usage, _, trainer = proc.stdout.partition("usage: train_instruct_pix2pix_sdxl.py")
    assert usage.startswith("Stage 3: train through accelerate") and "75 stopped by SIGTERM/SIGINT" in usage
    assert not [line for line in usage.splitlines() if line.startswith("#") or "set -euo" in line]
    for flag in ("--pretrained_model_name_or_path", "--data_dir", "--resume_from_checkpoint", "--train_batch_size"):
        assert flag in trainer


@pytest.mark.parametrize("flags, kind", [
    (["--backend", "ddp"], "ddp"),
    (["--backend", "deepspeed"], "deepspeed"),
    (["--backend", "deepspeed", "--offload_optimizer"], "deepspeed_offload"),
    (["--backend", "fsdp"], "fsdp"),
    (["--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1"], "multinode"),
])
def test_accelerate_launch_accepts_every_config(tmp_path, flags, kind):
    """`accelerate launch --config_file` parses and validates each config (without starting processes)."""
    import json

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    out = tmp_path / "acc.yaml"
    proc = sh(ROOT / "setup_accelerate.sh", "--num_gpus", 8, *flags, "--output", out)
    assert proc.returncode == 0, proc.stderr
    args, _, precision_from_config = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(out), "x.py"]))
    # accelerate refuses a mixed_precision beside a DeepSpeed JSON (when the Accelerator starts): the
    # JSON's "auto" takes the trainer's --mixed_precision (tests/test_deepspeed.py trains through it)
    assert precision_from_config == (not kind.startswith("deepspeed"))
    assert args.mixed_precision == ("no" if kind.startswith("deepspeed") else "bf16")
    if kind == "ddp":
        assert args.multi_gpu and args.num_processes == 8
    if kind.startswith("deepspeed"):
        assert args.use_deepspeed and args.num_processes == 8
        ds = json.loads(Path(args.deepspeed_config_file).read_text())
        assert ds["zero_optimization"]["stage"] == 2
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == ("cpu" if "offload" in kind else "none")
        assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"
    if kind == "fsdp":
        assert args.use_fsdp and args.num_processes == 8
    if kind == "multinode":
        assert (args.num_machines, args.machine_rank, args.main_process_ip, args.num_processes) == (2, 1, "10.0.0.1", 16)
