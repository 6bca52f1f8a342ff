"""The GPU suite: the tiny model of tests/conftest.py on CUDA, through the kit's own entry points.

    python -m pytest tests/gpu -q -m gpu

Every module is marked `gpu` and skips only where there is no CUDA (deepspeed's test also where
deepspeed is not installed). Each test takes seconds; benchmarks/gpu_check.sh runs them last.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_in_session

ROOT = Path(__file__).resolve().parents[2]
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def run(cmd: list, env: dict | None = None, timeout: int = 600) -> str:
    """A command in its own session (a timeout kills the launcher and the trainer under it); its output."""
    proc = run_in_session(cmd, timeout, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture
def train(tiny_sdxl, tiny_pairs):
    """train(out, *flags): the tiny recipe on CUDA, by the trainer script (or `launcher`, e.g. train.sh)."""

    def train(out: Path, *flags, launcher=(sys.executable, "train_instruct_pix2pix_sdxl.py"), env=None) -> str:
        return run([*launcher, "--config", "configs/tiny_cpu.yaml", "--pretrained_model_name_or_path", tiny_sdxl,
                    "--data_dir", tiny_pairs, "--output_dir", out, "--report_to", "none", *flags], env=env)

    return train


@pytest.fixture
def metrics():
    """metrics(out): the rows of OUTPUT_DIR/logs/metrics.jsonl, checked to come from a CUDA run."""

    def metrics(out: Path) -> list[dict]:
        rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(r["peak_memory_gib"] > 0 for r in rows), "the run did not use the GPU"
        return rows

    return metrics
