"""`benchmarks/throughput.py --loop`: the real training loop, timed through ./train.sh.

Builds a model folder, synthetic pairs and their HF dataset, runs ./train.sh for a few optimizer
steps and reads the rates the trainer itself logged (OUTPUT_DIR/logs/metrics.jsonl). Every command
runs in a session of its own and dies with this process; past its time, its whole tree is killed.
See throughput.py's docstring for the figures.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

from ip2p.training.config import optimizer_name, parse_config  # throughput.py has put the repository on sys.path

ROOT = Path(__file__).resolve().parents[1]


class LoopError(RuntimeError):
    """A command of the loop failed or ran past its time; the message ends with its log's last lines."""

    def __init__(self, message: str, log: Path):
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        super().__init__("\n".join([message, f"last lines of {log.name}:", *lines[-40:]]))


def die_with_parent() -> None:
    """In a child, before exec: it gets a SIGKILL when this benchmark dies. A child in a session of
    its own is out of reach of a kill of ours (gpu_check.sh's timeout), and would train on."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)


def end_session(proc: subprocess.Popen) -> None:
    """KILL the child's process group, and the processes under it that run in sessions of their own
    (the trainer under ip2p.training.launch, torch elastic's ranks)."""
    import psutil  # an accelerate dependency

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def run_logged(cmd: list, log: Path, timeout: float, env: dict) -> float:
    """CMD in a session of its own, its output appended to LOG (a file: a pipe nobody reads would
    fill and stall the trainer); its wall time. Past TIMEOUT, or when this benchmark is stopped, the
    whole session is killed."""
    cmd = [str(c) for c in cmd]
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:
                end_session(proc)
    if rc is None:
        raise LoopError(f"{cmd[0]} ran past {timeout:.0f} s and was stopped", log)
    if rc != 0:
        raise LoopError(f"{shlex.join(cmd[:3])} ... exited {rc}", log)
    return time.perf_counter() - t0


def loop_env(args, cuda: bool, work: Path, log: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("PYTHON", sys.executable)  # train.sh's interpreter: this one
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --tiny: the CPU recipe, even on a GPU node
        env.setdefault("CPU_PROCESSES", "1")
    elif "ACCELERATE_CONFIG" not in env:
        # the figure is per GPU: one process, whatever the node has
        config = work / "accelerate.yaml"
        run_logged(["./setup_accelerate.sh", "--num_gpus", args.num_gpus, "--output", config], log, 120, env)
        env["ACCELERATE_CONFIG"] = str(config)
    return env


def loop_rates(rows: list[dict]) -> tuple[float, float]:
    """Samples/s over the logging intervals after the first (compilation, warm-up), weighted by the
    steps each holds (the last one may be shorter), and the last interval's."""
    steady = rows[1:]
    steps = [r["step"] - p["step"] for p, r in zip(rows, steady)]
    return sum(steps) / sum(n / r["samples_per_s"] for n, r in zip(steps, steady)), steady[-1]["samples_per_s"]


def samples_for(args, config: str, flags: list, cuda: bool) -> int:
    """Pairs for one epoch of --steps optimizer steps, in the recipe's batch and accumulation: the
    run never crosses an epoch (whose DataLoader workers start anew, as a long run's seldom do)."""
    cfg = parse_config(["--config", str(ROOT / config), *flags, "--pretrained_model_name_or_path", "unused",
                        "--data_dir", "unused"])
    processes = args.num_gpus if cuda else int(os.environ.get("CPU_PROCESSES", "1"))
    return args.steps * cfg.train_batch_size * cfg.gradient_accumulation_steps * processes


def run_loop(args, cuda: bool, device: str) -> dict:
    flags = shlex.split(args.loop_flags)
    config = "configs/tiny_cpu.yaml" if args.tiny else "configs/sdxl_1024_8xa100.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log = tmp / "loop.log"
        env = loop_env(args, cuda, tmp, log)
        t0 = time.perf_counter()
        model = args.model
        if not model:
            model = tmp / "model"
            build = (["-m", "ip2p.tiny.model", "--output_dir", model] if args.tiny else
                     ["-m", "ip2p.tiny.sdxl_arch", "--output_dir", model, "--device", "cuda", "--dtype", "fp16"])
            run_logged([sys.executable, *build], log, 900, env)
        pairs = args.num_samples or samples_for(args, config, flags, cuda)
        run_logged([sys.executable, "-m", "ip2p.tiny.sample_data", "--output_dir", tmp / "pairs", "--num_pairs", pairs,
                    "--size", args.resolution], log, 900, env)
        run_logged([sys.executable, "convert_to_hf_dataset.py", "--data_dir", tmp / "pairs", "--output_dir",
                    tmp / "data"], log, 900, env)
        setup_s = time.perf_counter() - t0
        out = tmp / "run"
        never = str(10**9)
        # bf16 halves the final save of the 10 GB UNet; --loop_flags come last and override anything
        saved = [] if args.tiny else ["--save_dtype", "bf16"]
        train = ["./train.sh", "--config", config, "--pretrained_model_name_or_path", model, "--data_dir",
                 tmp / "data", "--output_dir", out, "--resolution", args.resolution, "--max_train_steps", args.steps,
                 "--checkpointing_steps", never, "--validation_steps", never, "--report_to", "none",
                 "--logging_steps", args.logging_steps, *saved, *flags]
        wall_s = run_logged(train, log, args.timeout, env)
        rows = [json.loads(r) for r in (out / "logs" / "metrics.jsonl").read_text().splitlines() if r]
        if len(rows) < 2:
            raise LoopError(f"{len(rows)} rows in logs/metrics.jsonl: need 2 logging intervals at least", log)
        cfg = yaml.safe_load((out / "training_config.yaml").read_text())
    mean, last = loop_rates(rows)
    return {"variant": "loop", "device": device, "config": config,
            "loop_flags": flags, "steps": rows[-1]["step"], "logging_steps": args.logging_steps, "pairs": pairs,
            "resolution": cfg["resolution"], "train_batch_size": cfg["train_batch_size"],
            "gradient_accumulation_steps": cfg["gradient_accumulation_steps"],
            "mixed_precision": cfg["mixed_precision"],
            "optimizer": optimizer_name(SimpleNamespace(**cfg)),
            "gradient_checkpointing": cfg["gradient_checkpointing"],
            "compile": cfg["torch_compile_mode"] if cfg["torch_compile"] else "none",
            "samples_per_s": mean, "samples_per_s_last": last, "first_interval_samples_per_s": rows[0]["samples_per_s"],
            "peak_memory_gib": max(r["peak_memory_gib"] for r in rows), "last_loss": rows[-1]["loss"],
            "wall_s": wall_s, "setup_s": setup_s}
