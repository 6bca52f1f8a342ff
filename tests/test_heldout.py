"""The held-out loss: fixed noise and timesteps, three conditioning variants, logged at validation."""

import json

import datasets
import pytest
import torch

from conftest import write_pairs_dataset
from ip2p.training.config import parse_config
from ip2p.training.pairs import TrainPairs, load_splits
from ip2p.training.encode import OnTheFlyEncoder
from ip2p.training.heldout import encode_heldout, heldout_losses
from ip2p.method import expand_conv_in
from ip2p.models import load_parts
from test_train_e2e import run_train, tiny_args


@pytest.fixture(scope="module")
def split_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    train = datasets.load_from_disk(str(write_pairs_dataset(root / "train", n=8, seed=1)))
    val = datasets.load_from_disk(str(write_pairs_dataset(root / "val", n=5, seed=2)))
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(root / "data"))
    return root / "data"


def test_heldout_losses_are_deterministic_and_tell_the_conditioning_apart(tiny_sdxl, split_data):
    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_sdxl), "--data_dir", str(split_data),
                        "--resolution", "32", "--center_crop"])
    train, heldout_ds = load_splits(cfg)
    assert len(train) == 8 and len(heldout_ds) == 5
    parts = load_parts(cfg)
    torch.manual_seed(0)
    unet = expand_conv_in(parts.unet, 8)
    with torch.no_grad():  # give the new input channels weight, so the input photo matters
        unet.conv_in.weight[:, 4:].normal_(0, 0.1)
    encoder = OnTheFlyEncoder(parts, torch.float32)
    heldout = encode_heldout(TrainPairs(heldout_ds, cfg, parts.tokenizers), encoder, 1000)
    assert heldout.timesteps.tolist() == [0, 250, 500, 749, 999]
    torch.manual_seed(1)  # the global generator plays no part
    first = heldout_losses(unet, heldout, parts.noise_scheduler, parts.vae.config.scaling_factor, torch.float32)
    torch.manual_seed(2)
    again = heldout_losses(unet, heldout, parts.noise_scheduler, parts.vae.config.scaling_factor, torch.float32,
                           batch_size=2)
    assert first.keys() == {"val_loss", "val_loss_wrong_instruction", "val_loss_no_image"}
    assert first == pytest.approx(again, rel=1e-5)
    assert first["val_loss"] != first["val_loss_wrong_instruction"] and first["val_loss"] != first["val_loss_no_image"]


def test_training_logs_the_heldout_loss_at_each_validation(tiny_sdxl, split_data, tmp_path):
    out = tmp_path / "run"
    run_train(*tiny_args(tiny_sdxl, split_data, out, "--max_train_steps", 5, "--validation_steps", 2,
                         "--report_to", "none"))
    rows = [json.loads(line) for line in (out / "logs" / "heldout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5]  # every validation, and the end
    assert all(r["val_loss"] > 0 and r["val_loss_no_image"] > 0 for r in rows)
