"""demo.sh end to end, as a new user runs it, shortened through its environment variables.

The short run checks every stage and what the demo leaves behind; that the edit is clearly closer
to the truth than the photo (0.7x or better) needs the full run (about 10 minutes on 2 cores).
"""

import os
import re
from pathlib import Path

import datasets
import pytest
from PIL import Image

from ip2p.errors import UserError

from conftest import run_in_session

ROOT = Path(__file__).resolve().parents[1]
FIGURES = re.compile(r"^edit MSE to the expected edit: (\d+\.\d+) "
                     r"\(the unedited photo: (\d+\.\d+), (\d+\.\d+)x\)$")


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    demo = tmp_path / "demo"
    env = dict(os.environ, DEMO_DIR=str(demo), DEMO_STEPS="4", DEMO_PAIRS="16", DEMO_VAE_STEPS="4")
    proc = run_in_session(["bash", ROOT / "demo.sh"], timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-5:]
    assert [line.split(":")[0] for line in last[:4]] == [
        "converted data", "trained pipeline", "held-out photo", "edited photo"]
    figures = FIGURES.match(last[4])
    assert figures, last[4]
    edit_mse, photo_mse, ratio = map(float, figures.groups())
    assert photo_mse > 0 and abs(ratio - edit_mse / photo_mse) < 0.01 + 0.01 * ratio

    data = datasets.load_from_disk(str(demo / "data_hf"))
    assert len(data["train"]) + len(data["validation"]) == 16 and len(data["validation"]) >= 1
    assert (demo / "model" / "model_index.json").is_file()
    assert (demo / "model" / "validation" / "step-4.png").is_file()
    names = ("photo.png", "edited.png", "expected.png")
    photo, edited, expected = (Image.open(demo / n) for n in names)
    assert photo.size == edited.size == expected.size == (32, 32)
    held = data["validation"][0]
    assert photo.convert("RGB").tobytes() == held["input_image"].convert("RGB").tobytes()
    assert expected.convert("RGB").tobytes() == held["edited_image"].convert("RGB").tobytes()
    assert held["edit_prompt"] in last[2]
    train_inputs = {bytes(row["input_image"].convert("RGB").tobytes()) for row in data["train"]}
    assert photo.convert("RGB").tobytes() not in train_inputs  # held out: the training never saw it
    assert Image.open(demo / "demo_grid.png").size[0] > 3 * 32


def test_sample_data_can_keep_one_edit_family():
    from ip2p.tiny.sample_data import EDITS, check_edits, held_out_example, make_pairs

    pairs = make_pairs(30, 32, seed=0, edits=("recolour_background",))
    assert all("background" in p.edit_prompt for p in pairs)
    assert "background" in held_out_example(32, 0, ("recolour_background",)).edit_prompt
    everything = make_pairs(12, 32, seed=0)
    same = make_pairs(12, 32, seed=0, edits=EDITS)
    assert [p.edit_prompt for p in same] == [p.edit_prompt for p in everything]
    with pytest.raises(UserError, match="recolour_sky"):
        check_edits(["recolour_sky"])


def test_score_prints_both_figures_and_writes_the_grid(tmp_path, capsys):
    from ip2p.tiny.demo import main

    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "photo.png")
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "expected.png")
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "edited.png")
    assert main(["score", "--output_dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == \
        "edit MSE to the expected edit: 0.0000 (the unedited photo: 1.0000, 0.00x)"
    assert Image.open(tmp_path / "demo_grid.png").size[1] > 8 * 8
