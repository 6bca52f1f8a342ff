"""Shared fixtures. Nothing here may touch the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import contextlib
import io
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def communicate_or_kill(proc: subprocess.Popen, timeout: int) -> tuple[str, str]:
    """The output of a process started with start_new_session=True; past `timeout` its whole
    process group (a launcher, the trainer under it, DataLoader workers) is killed and the test fails."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args[:3]} ran past {timeout} s:\n{out[-3000:]}\n{err[-3000:]}") from None


def run_in_session(cmd: list, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    """A command in its own session, its output captured as text (see communicate_or_kill)."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    out, err = communicate_or_kill(proc, timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@contextlib.contextmanager
def captured_output(folder: Path):
    """Everything written to stdout and stderr meanwhile, by Python code, C code and forked children
    (DataLoader workers) alike, into two files; yields a function that returns (stdout, stderr)."""
    import sys

    files = [open(folder / name, "w+", encoding="utf-8", errors="replace") for name in ("stdout", "stderr")]
    saved_fds = [os.dup(1), os.dup(2)]
    saved_streams = sys.stdout, sys.stderr
    for stream in saved_streams:
        stream.flush()
    os.dup2(files[0].fileno(), 1)
    os.dup2(files[1].fileno(), 2)
    sys.stdout, sys.stderr = files

    def read() -> tuple[str, str]:
        texts = []
        for f in files:
            f.flush()
            f.seek(0)
            texts.append(f.read())
        return texts[0], texts[1]

    try:
        yield read
    finally:
        for f in files:
            f.flush()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        for f in files:
            f.close()


@contextlib.contextmanager
def as_a_process_warns():
    """Warnings printed to stderr as a new interpreter prints them (pytest would collect them)."""
    import sys
    import warnings

    with warnings.catch_warnings():
        warnings.resetwarnings()  # also forgets which warnings were already shown
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        yield


def reset_accelerate() -> None:
    """accelerate keeps its state in process-wide singletons; a new run in the same process (other
    mixed precision, other accumulation) needs them cleared, as a new process would have them."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_main(main, argv: list) -> subprocess.CompletedProcess:
    """A script's `main(argv)` in this process, as its subprocess would run: its output captured,
    the signal handlers and accelerate's state as they were before. A bug keeps its traceback,
    with the output so far printed after it."""
    import tempfile

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    argv, out, err, cwd = [str(a) for a in argv], "", "", os.getcwd()
    os.chdir(ROOT)  # where a script's relative paths (configs/...) are read from, as in its subprocess
    try:
        with tempfile.TemporaryDirectory() as folder, captured_output(Path(folder)) as read, as_a_process_warns():
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's own errors
                code = e.code if isinstance(e.code, int) else 1
            finally:
                out, err = read()
    except BaseException:
        print(f"output of {argv[:6]}:\n{out[-3000:]}\n{err[-6000:]}")
        raise
    finally:
        os.chdir(cwd)
        reset_accelerate()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(argv, code, out, err)


def train_in_process(*args, check: bool = True) -> subprocess.CompletedProcess:
    """train_instruct_pix2pix_sdxl.py's main in this process: the same code as `python
    train_instruct_pix2pix_sdxl.py ARGS` without a new interpreter's 8 s of imports (a tiny run's
    steps take a fraction of a second). Tests of the launcher, of signals and of several processes
    start a real process instead (run_in_session)."""
    from train_instruct_pix2pix_sdxl import main

    proc = run_main(main, list(args))
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_pairs_dataset(path: Path, n: int = 10, seed: int = 0) -> Path:
    """A small dataset in the layout convert_to_hf_dataset.py writes: varied sizes, real images."""
    import datasets

    rng = np.random.default_rng(seed)
    rows = {"input_image": [], "edit_prompt": [], "edited_image": []}
    for i in range(n):
        h, w = 48 + 8 * (i % 3), 64 + 16 * (i % 2)  # several aspect ratios
        a = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        rows["input_image"].append({"bytes": png_bytes(a), "path": None})
        rows["edited_image"].append({"bytes": png_bytes(255 - a), "path": None})
        rows["edit_prompt"].append(f"invert the colours of picture {i}")
    features = datasets.Features({"input_image": datasets.Image(), "edit_prompt": datasets.Value("string"),
                                  "edited_image": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny base SDXL (4-channel UNet) in the hub layout, built once per test session."""
    from ip2p.tiny.model import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "sdxl")


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    """A tiny base SD 1.5 (one text encoder, 4-channel UNet) in the hub layout."""
    from ip2p.tiny.model import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "sd15", "sd15")


@pytest.fixture(scope="session")
def tiny_sd15_ip2p(tmp_path_factory) -> Path:
    """A tiny SD 1.5 InstructPix2Pix pipeline (8-channel UNet), as timbrooks/instruct-pix2pix is laid out."""
    from ip2p.tiny.model import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "sd15_ip2p", "sd15", instruct_pix2pix=True)


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> Path:
    return write_pairs_dataset(tmp_path_factory.mktemp("pairs") / "data")


@pytest.fixture(scope="session")
def converted_pairs(tmp_path_factory) -> Path:
    """20 of the demo's edit pairs, written by `python -m ip2p.tiny.sample_data` and converted by
    convert_to_hf_dataset.py with two worker processes and a quarter held out: the converter's real
    output, made once per test run for every test that only reads it."""
    from convert_to_hf_dataset import main as convert_main
    from ip2p.tiny.sample_data import main as sample_data_main

    root = tmp_path_factory.mktemp("converted")
    made = run_main(sample_data_main, ["--output_dir", root / "pairs", "--num_pairs", 20])
    assert made.returncode == 0, made.stderr[-2000:]
    proc = run_main(convert_main, ["--data_dir", root / "pairs", "--output_dir", root / "data_hf", "--num_proc", 2,
                                   "--val_fraction", 0.25])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "data_hf"


@pytest.fixture(scope="session")
def trained_pipeline(tiny_sdxl, converted_pairs, tmp_path_factory):
    """The tiny recipe trained for 4 optimizer steps on `converted_pairs`, validating on a held-out
    photo at the last step, once per test run: (pipeline folder, the photo, its instruction, the
    trainer's CompletedProcess), for every test that only reads a trained pipeline."""
    import datasets

    from train_instruct_pix2pix_sdxl import main

    root = tmp_path_factory.mktemp("trained")
    held = datasets.load_from_disk(str(converted_pairs))["validation"][0]
    held["input_image"].save(root / "photo.png")
    out = root / "model"
    proc = run_main(main, ["--config", "configs/tiny_cpu.yaml", "--pretrained_model_name_or_path", tiny_sdxl,
                           "--data_dir", converted_pairs, "--output_dir", out, "--max_train_steps", 4,
                           "--checkpointing_steps", 2, "--validation_steps", 4, "--report_to", "none",
                           "--val_image_url_or_path", root / "photo.png", "--validation_prompt", held["edit_prompt"]])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, root / "photo.png", held["edit_prompt"], proc


@pytest.fixture(scope="session")
def tiny_ip2p(tmp_path_factory) -> Path:
    """A tiny 8-channel InstructPix2Pix pipeline whose photo channels are non-zero.

    Untrained, conv_in's 4 new channels are zero and the output would not depend on the input
    photo at all; then "the RGBA photo edits like its RGB view" would hold for any photo.
    """
    import torch
    from diffusers import UNet2DConditionModel

    from ip2p.tiny.model import build_tiny_sdxl

    path = build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "ip2p", instruct_pix2pix=True)
    unet = UNet2DConditionModel.from_pretrained(path / "unet")
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    unet.save_pretrained(path / "unet")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions gain nothing from threads, and on a busy 2-core machine two threads that
    wait for each other are 10x slower than one (measured: 6 s vs 0.4 s per edit)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
