"""benchmarks/gpu_check.sh: its --tiny mode runs the GPU node's sequence on the CPU, so its logic is
tested here; only the sizes and the device differ from what a person runs on a GPU node."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import run_in_session

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
RUN_ON_CPU = ["model", "data", "train", "sigterm", "resume_ema", "infer_bf16", "throughput", "throughput_sd15",
              "throughput_lora", "throughput_buckets", "throughput_loop", "pytest_gpu"]
NEED_CUDA = ["fused_adamw", "deepspeed", "infer_fp16", "infer_offload"]


def gpu_check(*args, env: dict, timeout: int) -> subprocess.CompletedProcess:
    """The script in its own session: a timeout kills it and everything it started."""
    return run_in_session(["bash", SCRIPT, *args], timeout, cwd=ROOT, env=env)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.mark.slow
def test_tiny_mode_runs_every_check_and_reports_each_once(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    proc = gpu_check("--tiny", "--work_dir", work, env=clean_env(OUT=str(out)), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    for name in RUN_ON_CPU:
        assert len([x for x in lines if x.startswith(f"ok {name} ")]) == 1, (name, proc.stdout)
    for name in NEED_CUDA:
        assert f"skip {name}: needs CUDA" in lines, (name, proc.stdout)
    assert not [x for x in lines if x.startswith("FAIL")]
    assert lines[-1] == f"{len(RUN_ON_CPU)} passed, 0 failed, {len(NEED_CUDA)} skipped"

    rows = [json.loads(x) for x in (work / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["model", "data", "train", "sigterm", "resume_ema", "fused_adamw",
                                         "deepspeed", "infer_bf16", "infer_fp16", "infer_offload",
                                         "throughput", "throughput_sd15", "throughput_lora", "throughput_buckets",
                                         "throughput_loop",
                                         "pytest_gpu"]
    by_name = {r["name"]: r for r in rows}
    assert all(by_name[n]["status"] == "ok" and by_name[n]["seconds"] >= 0 for n in RUN_ON_CPU)
    assert all(by_name[n]["status"] == "skip" for n in NEED_CUDA)
    fig = {n: by_name[n]["figures"] for n in RUN_ON_CPU}
    assert fig["data"]["train"] + fig["data"]["validation"] == 8
    assert fig["train"]["steps"] >= 2 and fig["train"]["ema"] == "on" and fig["train"]["optimizer"] == "adamw"
    # the SIGTERM checkpointed the last step the run logged, and the resume continued from it
    assert fig["sigterm"]["step"] == fig["train"]["steps"] and fig["sigterm"]["trainer_exit"] == 75
    assert fig["resume_ema"]["from_step"] == fig["sigterm"]["step"]
    assert fig["resume_ema"]["final_step"] == fig["sigterm"]["step"] + 2
    assert fig["infer_bf16"]["size"] == "64x64" and fig["infer_bf16"]["pixel_std"] > 0
    assert fig["throughput"]["adamw_samples_per_s"] > 0 and "recipe_samples_per_s" not in fig["throughput"]  # no CUDA
    assert fig["throughput_sd15"]["adamw_samples_per_s"] > 0
    assert fig["throughput_lora"]["lora_24gb_samples_per_s"] > 0
    assert fig["throughput_buckets"]["adamw_48x80_samples_per_s"] > 0 and fig["throughput_buckets"]["adamw_128x32_samples_per_s"] > 0
    loop = fig["throughput_loop"]
    assert loop["samples_per_s"] > 0 and loop["samples_per_s_last"] > 0 and loop["wall_s"] > 0
    assert (loop["steps"], loop["optimizer"], loop["compile"]) == (4, "adamw", "none")
    assert fig["pytest_gpu"]["passed"] == 0 and fig["pytest_gpu"]["skipped"] > 0  # CUDA is hidden in --tiny
    # what a GPU machine collects from $OUT
    assert (out / "gpu_check" / "results.jsonl").read_text() == (work / "results.jsonl").read_text()
    assert (out / "gpu_check" / "summary.txt").read_text().strip() == lines[-1]
    import tarfile

    with tarfile.open(out / "gpu_check" / "logs.tar.gz") as logs:
        assert {f"logs/{n}.log" for n in RUN_ON_CPU} <= set(logs.getnames())
    # no checkpoint is left to fill a disk, and nothing is left running
    assert not list(work.glob("run*/checkpoint-*"))
    assert (work / "sessions").read_text() == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the whole GPU check")
def test_without_cuda_and_without_tiny_one_line_and_exit_2(tmp_path):
    proc = gpu_check("--work_dir", tmp_path / "work", env=clean_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1
    assert re.match(r"error: no CUDA GPU found .*--tiny", proc.stderr)
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_only_runs_the_named_checks(tmp_path):
    work = tmp_path / "work"
    proc = gpu_check("--tiny", "--only", "model,data", "--work_dir", work, env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [json.loads(x)["name"] for x in (work / "results.jsonl").read_text().splitlines()] == ["model", "data"]
    assert proc.stdout.splitlines()[-1] == "2 passed, 0 failed, 0 skipped"


def test_an_unknown_check_is_refused_with_one_line(tmp_path):
    proc = gpu_check("--tiny", "--only", "model,trian", "--work_dir", tmp_path / "other", env=clean_env(), timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --only: no check named trian")
    assert not (tmp_path / "other").exists()
