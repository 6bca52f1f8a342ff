"""benchmarks/throughput.py runs on the CPU with the tiny model: the step variants and the real loop
through train.sh. Figures are not asserted (no timed tests), only that they are there and sane."""

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from conftest import run_in_session

ROOT = Path(__file__).resolve().parents[1]
STEP_FIGURES = {"samples_per_s", "step_ms", "tflops", "mfu", "peak_memory_gib", "compile_s", "last_loss"}


def throughput(*args, timeout: int = 600, env: dict | None = None):
    return run_in_session([sys.executable, "benchmarks/throughput.py", "--tiny", *args], timeout=timeout, cwd=ROOT,
                          env=env)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_step_variants_one_row_each_and_compiling_changes_no_loss(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = throughput("--steps", "2", "--warmup", "1", "--num_samples", "8", "--loader_workers", "0",
                      "--variants", "recipe,adamw,adamw+compile,adamw+compile_full,on_the_fly", "--output_json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert lines == [json.loads(x) for x in out.read_text().splitlines()]  # printed as written
    rows = {r["variant"]: r for r in lines}
    assert list(rows) == ["cache_build", "recipe", "adamw", "adamw+compile", "adamw+compile_full", "on_the_fly",
                          "cache_loader_only"]
    assert "needs CUDA" in rows["recipe"]["skipped"]
    for name, source, compile_ in [("adamw", "cache", "none"), ("adamw+compile", "cache", "regional"),
                                   ("adamw+compile_full", "cache", "full"), ("on_the_fly", "on_the_fly", "none")]:
        r = rows[name]
        assert STEP_FIGURES <= set(r), r
        assert (r["source"], r["optimizer"], r["compile"], r["gradient_checkpointing"]) == (source, "adamw",
                                                                                            compile_, False)
        assert all(positive(r[k]) for k in ("samples_per_s", "step_ms", "tflops", "last_loss")), r
        assert r["resolution"] == 64 and r["batch_size"] == 4 and r["mfu"] is None  # no GPU peak on a CPU
    assert rows["adamw"]["compile_s"] is None and positive(rows["adamw+compile"]["compile_s"])
    assert positive(rows["adamw+compile_full"]["compile_s"])
    # the same seed and batches: compiling the repeated blocks changes the step's numbers by rounding
    # only, and the cache feeds the step what encoding on the fly does
    for name in ("adamw+compile", "adamw+compile_full", "on_the_fly"):
        assert rows[name]["last_loss"] == pytest.approx(rows["adamw"]["last_loss"], rel=1e-4), name
    assert positive(rows["cache_build"]["model_tflop_per_sample"])
    assert positive(rows["cache_loader_only"]["samples_per_s"])



@pytest.mark.slow
def test_the_lora_step_trains_only_the_adapters_of_the_24gb_recipe(tmp_path):
    proc = throughput("--steps", "1", "--warmup", "1", "--num_samples", "8", "--loader_workers", "0",
                      "--variants", "lora_24gb")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(json.loads(x) for x in proc.stdout.splitlines() if '"lora_24gb"' in x)
    assert (row["lora_rank"], row["gradient_checkpointing"], row["optimizer"]) == (16, True, "adamw")
    assert all(positive(row[k]) for k in ("samples_per_s", "step_ms", "last_loss")), row


@pytest.mark.slow
def test_lora_checkpoint_benchmark_counts_what_trains_and_weighs_the_checkpoint():
    proc = run_in_session([sys.executable, "benchmarks/lora_checkpoint.py", "--tiny", "--rank", "4"], timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.splitlines()[-1])
    assert 0 < row["conv_in_params"] < row["trained_params"] < row["unet_params"] / 5
    files = row["checkpoint_files"]
    assert "trainable_weights.safetensors" in files and "model.safetensors" not in files
    # fp32 tensors plus the safetensors header (the names: a tenth of the tiny file, nothing for SDXL's)
    assert 4 * row["trained_params"] <= files["trainable_weights.safetensors"] <= 1.2 * 4 * row["trained_params"]
    assert row["checkpoint_bytes"] < row["full_finetune_checkpoint_bytes"] / 3


@pytest.mark.slow
def test_the_sd15_step_is_timed_on_its_own_family():
    proc = throughput("--family", "sd15", "--steps", "1", "--warmup", "1", "--num_samples", "8",
                      "--loader_workers", "0", "--variants", "adamw")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in (json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{"))}
    assert rows["cache_build"]["family"] == "sd15" and positive(rows["adamw"]["samples_per_s"])
    assert positive(rows["adamw"]["last_loss"]) and rows["adamw"]["resolution"] == 64

@pytest.mark.slow
def test_the_step_at_a_bucket_trains_on_that_shape():
    """--bucket WIDTHxHEIGHT: the cache in its per-bucket layout, the step at 48x80 (3,840 pixels
    against the 64x64 square's 4,096: fewer FLOPs per sample, counted by torch)."""
    flops = {}
    for bucket in ("48x80", None):
        proc = throughput("--steps", "1", "--warmup", "1", "--num_samples", "8", "--loader_workers", "0",
                          "--variants", "adamw", *(["--bucket", bucket] if bucket else []))
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = {r["variant"]: r for r in (json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{"))}
        assert rows["adamw"]["bucket"] == bucket and positive(rows["adamw"]["samples_per_s"])
        flops[bucket] = rows["cache_build"]["model_tflop_per_sample"]
    assert flops["48x80"] < flops[None] * 0.97


def test_a_bucket_that_is_not_width_x_height_is_one_line_exit_2():
    bad = throughput("--bucket", "48 by 80")
    assert bad.returncode == 2 and "--bucket 48 by 80 is not WIDTHxHEIGHT" in bad.stderr


@pytest.mark.slow
def test_loop_times_train_sh_with_the_flags_given(tmp_path):
    out = tmp_path / "loop.jsonl"
    proc = throughput("--loop", "--steps", "4", "--logging_steps", "2", "--output_json", out,
                      "--loop_flags", "--gradient_checkpointing", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["variant"] == "loop" and row["config"] == "configs/tiny_cpu.yaml" and row["device"] == "cpu"
    assert row["loop_flags"] == ["--gradient_checkpointing"]
    assert row["gradient_checkpointing"] is True  # --loop_flags reached the trainer
    assert (row["steps"], row["logging_steps"], row["optimizer"], row["compile"]) == (4, 2, "adamw", "none")
    assert row["pairs"] == 4 * 4  # one epoch of 4 steps at the tiny recipe's batch of 4
    for k in ("samples_per_s", "samples_per_s_last", "first_interval_samples_per_s", "wall_s", "last_loss"):
        assert positive(row[k]), (k, row)
    assert row["peak_memory_gib"] == 0.0  # the CPU


@pytest.mark.slow
def test_loop_past_its_timeout_leaves_nothing_running(tmp_path):
    marker = uuid.uuid4().hex  # inherited by every process the benchmark starts
    proc = throughput("--loop", "--steps", "4", "--logging_steps", "2", "--timeout", "3", timeout=300,
                      env={**os.environ, "THROUGHPUT_TEST_MARKER": marker})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "ran past 3 s and was stopped" in proc.stderr
    time.sleep(1)  # a killed process may take a moment to leave the table

    def ours(p):
        try:
            return p.environ().get("THROUGHPUT_TEST_MARKER") == marker
        except (psutil.Error, OSError):
            return False

    assert not [p.info for p in psutil.process_iter(["pid", "cmdline"]) if ours(p)]

