"""Shared fixtures. Nothing here may touch the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import io
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


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
