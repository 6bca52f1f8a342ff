"""setup_accelerate.sh and train.sh as a user runs them."""

import subprocess
from pathlib import Path

import pytest

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
    (["--nodes", "2"], "unknown flag --nodes"),
])
def test_setup_accelerate_refuses_bad_flags(tmp_path, args, message):
    proc = sh(ROOT / "setup_accelerate.sh", *args, "--output", tmp_path / "x.yaml")
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_train_sh_without_a_gpu_points_to_the_cpu_recipe():
    proc = sh(ROOT / "train.sh", "--data_dir", "./data_hf")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "configs/tiny_cpu.yaml" in proc.stderr
