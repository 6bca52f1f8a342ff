"""demo.sh end to end, as a new user runs it (fewer training steps through its environment variable)."""

import os
import subprocess
from pathlib import Path

import datasets
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_every_stage(tmp_path):
    demo = tmp_path / "demo"
    env = dict(os.environ, DEMO_DIR=str(demo), DEMO_STEPS="4", DEMO_PAIRS="16")
    proc = subprocess.run(["bash", str(ROOT / "demo.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-4:]
    assert [line.split(":")[0] for line in last] == ["converted data", "trained pipeline", "validation grid",
                                                       "edited photo"]
    assert len(datasets.load_from_disk(str(demo / "data_hf"))) == 16
    assert (demo / "model" / "model_index.json").is_file() and (demo / "model" / "validation" / "step-4.png").is_file()
    edited = Image.open(demo / "edited.png")
    assert edited.size == Image.open(demo / "pairs" / "photo.png").size
