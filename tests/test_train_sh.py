"""train.sh's exit code and output are the trainer's, through accelerate's launchers: one CPU process
(`accelerate launch --cpu`, a plain subprocess) and two (`--multi_gpu`: torch elastic, as on GPUs)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from test_distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="train.sh runs the CPU recipe only without a GPU")



def start(*args, processes: int, logs: Path) -> subprocess.Popen:
    """train.sh in a session of its own, its output in files (a pipe nobody reads while the test
    waits for a step would fill up and stall the trainer)."""
    env = dict(os.environ, CPU_PROCESSES=str(processes), MAIN_PROCESS_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        return subprocess.Popen(["bash", str(ROOT / "train.sh"), *map(str, args)], cwd=ROOT, env=env,
                                stdout=out, stderr=err, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: int, logs: Path) -> tuple[int, str, str]:
    """Its exit code and output; past `timeout`, every process under it is killed (the trainer
    processes run in sessions of their own, out of reach of a kill of train.sh's group) and the test fails."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)
        for p in tree:
            p.kill()
        proc.wait()
        raise AssertionError(f"train.sh ran past {timeout} s:\n{(logs / 'stderr').read_text()[-3000:]}") from None
    return proc.returncode, (logs / "stdout").read_text(), (logs / "stderr").read_text()


def tiny(model: Path, data: Path, out: Path, *extra) -> list:
    return ["--config", "configs/tiny_cpu.yaml", "--pretrained_model_name_or_path", model, "--data_dir", data,
            "--output_dir", out, "--report_to", "none", *extra]


@pytest.mark.parametrize("processes, flags, message", [
    (1, ["--data_dir", "MISSING"], "does not exist"),
    (2, ["--data_dir", "MISSING"], "does not exist"),  # found by the main process first, then by the other
    (2, ["--resolution", 65], "must be a positive multiple of 8"),  # found by every process
])
def test_a_user_error_is_the_trainers_line_and_exit_2(tiny_sdxl, tiny_pairs, tmp_path, processes, flags, message):
    flags = [tmp_path / "missing" if f == "MISSING" else f for f in flags]
    proc = start(*tiny(tiny_sdxl, tiny_pairs, tmp_path / "run", *flags), processes=processes, logs=tmp_path)
    rc, out, err = finish(proc, 120, tmp_path)
    assert rc == 2, err[-3000:]
    errors = {line for line in err.splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and message in errors.pop()  # each process that found it says the same line
    for launcher_noise in ("CalledProcessError", "ChildFailedError", "accelerate/commands/launch.py", "exitcode"):
        assert launcher_noise not in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


# The trainer processes run in sessions of their own, so a signal to train.sh's group and one to
# train.sh alone take the same path (the launcher passes it on); one of each, one per launcher.
@pytest.mark.slow
@pytest.mark.parametrize("processes, target", [(1, "group"), (2, "train.sh")])
def test_sigterm_checkpoints_and_train_sh_exits_75(tiny_sdxl, tiny_pairs, tmp_path, processes, target):
    """A SIGTERM to train.sh's process group (what a terminal or a job runner sends) or to train.sh
    alone (docker, Kubernetes) reaches each trainer process once: it checkpoints and train.sh exits 75."""
    out = tmp_path / "run"
    proc = start(*tiny(tiny_sdxl, tiny_pairs, out, "--max_train_steps", 500, "--checkpointing_steps", 1000,
                       "--validation_steps", 1000), processes=processes, logs=tmp_path)
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            finish(proc, 10, tmp_path)
            raise AssertionError(f"no optimizer step logged (exit {proc.returncode})")
        time.sleep(0.2)
    trainers = psutil.Process(proc.pid).children(recursive=True)
    if target == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    rc, stdout, err = finish(proc, 120, tmp_path)
    left = [p for p in trainers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in left:  # a launcher that died alone would leave them training
        p.kill()
    assert not left, f"train.sh exited {rc} and left trainer processes running"
    assert rc == 75, err[-3000:]
    step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert f"stopped by SIGTERM at optimizer step {step}" in stdout + err
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert (stdout + err).count("received SIGTERM") == processes  # once each: a second one stops at once
    assert "Traceback" not in err


@pytest.mark.slow
def test_two_compiled_processes_stop_together_when_only_one_gets_a_sigterm(tiny_sdxl, tiny_pairs, tmp_path):
    """DDP (static graph, gradients as bucket views) with regional compilation, gradient
    checkpointing and accumulation trains; a SIGTERM to the second process alone reaches the first
    through the flag reduce that is read one optimizer step later: both checkpoint the same step."""
    out = tmp_path / "run"
    proc = start(*tiny(tiny_sdxl, tiny_pairs, out, "--max_train_steps", 500, "--checkpointing_steps", 1000,
                       "--validation_steps", 1000, "--torch_compile", "--gradient_checkpointing",
                       "--gradient_accumulation_steps", 2), processes=2, logs=tmp_path)
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 400  # the first step compiles
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            finish(proc, 10, tmp_path)
            raise AssertionError(f"no two optimizer steps logged (exit {proc.returncode})")
        time.sleep(0.2)
    seen = len(metrics.read_text().splitlines())
    ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children(recursive=True)
             if "train_instruct_pix2pix_sdxl.py" in " ".join(p.cmdline())}
    assert set(ranks) == {"0", "1"}, ranks
    ranks["1"].send_signal(signal.SIGTERM)
    rc, stdout, err = finish(proc, 300, tmp_path)
    assert rc == 75, err[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    step = rows[-1]["step"]
    # signalled during step seen + 1 at the latest: seen by both after the step that follows
    assert seen < step <= seen + 3, (seen, step)
    assert f"stopped by a signal on another process at optimizer step {step}" in stdout + err
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert (stdout + err).count("received SIGTERM") == 1
    assert "torch.compile (regional): the first optimizer step took" in stdout + err
    assert all(r["loss"] == r["loss"] for r in rows)
