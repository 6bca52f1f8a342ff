"""A run can be stopped at any moment and resumed exactly; faults get a clear answer, never a lost run."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import communicate_or_kill, png_bytes, write_pairs_dataset
from test_train_e2e import metrics, run_train, tiny_args

ROOT = Path(__file__).resolve().parents[1]


def start_patched(tmp_path, patch: str, argv: list) -> subprocess.Popen:
    """The trainer in a subprocess with `patch` applied first (to provoke a fault at a chosen moment)."""
    script = tmp_path / "patched_train.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        {textwrap.indent(textwrap.dedent(patch), '        ').strip()}
        from train_instruct_pix2pix_sdxl import main
        sys.exit(main({[str(a) for a in argv]!r}))
    """))
    return subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout=600) -> tuple[int, str]:
    """Its exit code and output; past `timeout` its whole process group is killed and the test fails."""
    out, err = communicate_or_kill(proc, timeout)
    return proc.returncode, out + err


def unet_weights(out: Path) -> dict:
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def spy_on_ema(monkeypatch) -> list[str]:
    """The order of EMAModel's calls in the runs that follow, as a list of names."""
    from diffusers.training_utils import EMAModel

    events, real = [], (EMAModel.to, EMAModel.load_state_dict, EMAModel.step)

    def to(self, device=None, dtype=None, non_blocking=False):
        events.append(f"to:{device}")
        return real[0](self, device, dtype, non_blocking)

    def load_state_dict(self, state_dict):
        events.append("load")
        return real[1](self, state_dict)

    def step(self, parameters):
        events.append("step")
        return real[2](self, parameters)

    for name, spy in (("to", to), ("load_state_dict", load_state_dict), ("step", step)):
        monkeypatch.setattr(EMAModel, name, spy)
    return events


def test_resumed_run_is_bit_identical_to_an_unbroken_one(tiny_sdxl, tiny_pairs, tmp_path, monkeypatch):
    # dropout, random flips and EMA on; 10 pairs, batch 4, accumulation 2: the break falls mid-epoch
    extra = ["--max_train_steps", 6, "--gradient_accumulation_steps", 2, "--use_ema", "--report_to", "none",
             "--checkpointing_steps", 3, "--conditioning_dropout_prob", 0.1]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_train(*tiny_args(tiny_sdxl, tiny_pairs, whole, *extra))
    half = extra.copy()
    half[1] = 3
    run_train(*tiny_args(tiny_sdxl, tiny_pairs, broken, *half))
    events = spy_on_ema(monkeypatch)
    run_train(*tiny_args(tiny_sdxl, tiny_pairs, broken, *extra, "--resume_from_checkpoint", "latest"))
    a, b = unet_weights(whole), unet_weights(broken)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert [m["loss"] for m in metrics(whole)] == [m["loss"] for m in metrics(broken)]

    # accelerate's load_state loads registered objects to the CPU (map_location="cpu") and
    # EMAModel.load_state_dict keeps what it is given: an EMA moved to the GPU before the load had
    # CPU shadows, and the first ema.step after a resume mixed devices (a crash on CUDA). On a CPU
    # the devices are the same, so the order of the calls is checked: load, then to(device), then
    # the first step. tests/gpu/ runs the resume itself on CUDA.
    load, first_step = events.index("load"), events.index("step")
    moves = [i for i, e in enumerate(events) if e == "to:cpu"]
    assert moves and load < moves[-1] < first_step, events


def wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout=300) -> None:
    path = out / "logs" / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {finish(proc)[1][-3000:]}")
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError("training did not reach the expected step")


def test_sigterm_checkpoints_the_step_in_progress_and_exits_75(tiny_sdxl, tiny_pairs, tmp_path):
    out = tmp_path / "run"
    proc = start_patched(tmp_path, "", tiny_args(tiny_sdxl, tiny_pairs, out, "--max_train_steps", 500,
                                                "--checkpointing_steps", 1000, "--report_to", "none"))
    wait_for_steps(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    rc, log = finish(proc)
    assert rc == 75, log[-3000:]
    step = metrics(out)[-1]["step"]
    assert f"stopped by SIGTERM at optimizer step {step}" in log
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert not (out / "model_index.json").exists()  # stopped, not finished
    run_train(*tiny_args(tiny_sdxl, tiny_pairs, out, "--max_train_steps", step + 2, "--checkpointing_steps", 1000,
                         "--report_to", "none", "--resume_from_checkpoint", "latest"))
    assert [m["step"] for m in metrics(out)] == list(range(1, step + 3))


def test_a_second_signal_stops_at_once(tiny_sdxl, tiny_pairs, tmp_path):
    out = tmp_path / "run"
    # the checkpoint that the first signal asks for takes long here, so the second one lands inside it
    patch = """
        import time, accelerate
        save = accelerate.Accelerator.save_state
        def slow_save(self, *a, **k):
            time.sleep(30)
            return save(self, *a, **k)
        accelerate.Accelerator.save_state = slow_save
    """
    proc = start_patched(tmp_path, patch, tiny_args(tiny_sdxl, tiny_pairs, out, "--max_train_steps", 500,
                                                   "--checkpointing_steps", 1000, "--report_to", "none"))
    wait_for_steps(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    rc, log = finish(proc, timeout=60)
    assert rc == 128 + signal.SIGINT and "stopping now" in log
    assert not [p for p in out.glob("checkpoint-*") if not p.name.endswith(".tmp")]


def test_sigkill_during_a_save_leaves_the_last_checkpoint_usable(tiny_sdxl, tiny_pairs, tmp_path):
    out = tmp_path / "run"
    patch = """
        import time, accelerate
        save = accelerate.Accelerator.save_state
        def save_then_hang(self, output_dir=None, **k):
            result = save(self, output_dir, **k)
            if output_dir.endswith("checkpoint-4.tmp"):
                print("SAVING checkpoint-4", flush=True)
                time.sleep(600)  # killed here: the files are written, the folder not yet renamed
            return result
        accelerate.Accelerator.save_state = save_then_hang
    """
    proc = start_patched(tmp_path, patch, tiny_args(tiny_sdxl, tiny_pairs, out, "--max_train_steps", 8,
                                                   "--checkpointing_steps", 2, "--checkpoints_total_limit", 1,
                                                   "--report_to", "none"))
    deadline = time.time() + 300
    while not (out / "checkpoint-4.tmp").exists() or not (out / "checkpoint-2").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    time.sleep(2)
    proc.kill()
    proc.wait()
    assert (out / "checkpoint-2" / "training_state.json").is_file()  # the limit deletes only after a new one
    assert not (out / "checkpoint-4").exists()
    proc = run_train(*tiny_args(tiny_sdxl, tiny_pairs, out, "--max_train_steps", 4, "--checkpointing_steps", 2,
                                "--checkpoints_total_limit", 1, "--report_to", "none",
                                "--resume_from_checkpoint", "latest"))
    assert "resumed from" in proc.stdout and "checkpoint-2 at optimizer step 2" in proc.stdout
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # the stale .tmp was replaced


def test_a_full_disk_stops_before_the_checkpoint_with_a_clear_message(tiny_sdxl, tiny_pairs, tmp_path, monkeypatch):
    import ip2p.training.guards

    calls = []

    def free_bytes(folder):
        calls.append(folder)
        return 10**15 if len(calls) == 1 else 1000  # room for the first checkpoint only

    monkeypatch.setattr(ip2p.training.guards, "free_bytes", free_bytes)
    out = tmp_path / "run"
    proc = run_train(*tiny_args(tiny_sdxl, tiny_pairs, out, "--max_train_steps", 6, "--checkpointing_steps", 2,
                                "--report_to", "none"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: not enough disk space in {out} for checkpoint-4" in proc.stderr and "GB needed" in proc.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def nan_losses_at(monkeypatch, bad_calls) -> None:
    """The loss of these calls of forward_loss (counted from 1, one per micro-step) becomes NaN."""
    import ip2p.training.step

    real, calls = ip2p.training.step.forward_loss, []

    def forward_loss(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) in bad_calls else loss

    monkeypatch.setattr(ip2p.training.step, "forward_loss", forward_loss)


def test_a_non_finite_step_is_skipped_and_counted(tiny_sdxl, tiny_pairs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    nan_losses_at(monkeypatch, {3})
    proc = run_train(*tiny_args(tiny_sdxl, tiny_pairs, out, "--max_train_steps", 5, "--report_to", "none"))
    assert "optimizer step 3: the loss or the gradients were not finite; the update was skipped" in proc.stderr
    assert [m["skipped_steps"] for m in metrics(out)] == [0, 0, 1, 1, 1]
    assert "optimizer steps skipped (non-finite gradients) | 1" in (out / "README.md").read_text()


def test_too_many_non_finite_steps_in_a_row_stop_the_run(tiny_sdxl, tiny_pairs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    nan_losses_at(monkeypatch, set(range(3, 100)))
    proc = run_train(*tiny_args(tiny_sdxl, tiny_pairs, out, "--max_train_steps", 20, "--report_to", "none",
                                "--max_nonfinite_steps", 3, "--checkpointing_steps", 2), check=False)
    assert proc.returncode == 2
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: the loss or gradients were not finite for 3 optimizer steps in a row (up to step 5)")
    assert "--mixed_precision bf16" in line and line.endswith("checkpoint-4")  # skipped steps change no weight


@pytest.mark.parametrize("cache", ["--cache_latents", "--no_cache_latents"])
def test_an_image_that_fails_to_decode_is_replaced_and_counted(tiny_sdxl, tmp_path, cache):
    import datasets

    data = write_pairs_dataset(tmp_path / "data", n=8)
    ds = datasets.load_from_disk(str(data)).cast_column("input_image", datasets.Image(decode=False))
    rows = ds.to_dict()
    rows["input_image"][5] = {"bytes": png_bytes(__import__("numpy").zeros((8, 8, 3), "uint8"))[:40], "path": None}
    features = ds.features.copy()
    features["input_image"] = datasets.Image()
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "broken"))
    out = tmp_path / "run"
    proc = run_train(*tiny_args(tiny_sdxl, tmp_path / "broken", out, "--max_train_steps", 2, "--report_to", "none",
                                cache))
    assert "training sample 5 could not be read and is replaced by the next one" in proc.stderr
    assert metrics(out)[-1]["replaced_samples"] >= 1
    assert "failed to decode (replaced by the next sample) | 0" not in (out / "README.md").read_text()
