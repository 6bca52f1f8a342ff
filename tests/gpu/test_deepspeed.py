"""DeepSpeed ZeRO-2 on one GPU, launched as users do: setup_accelerate.sh, then train.sh."""

import math

import pytest

from gpu.conftest import GPU, ROOT, run
from test_distributed import free_port

pytestmark = GPU



def test_zero2_one_gpu_trains_checkpoints_and_resumes(train, metrics, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed not installed")
    config = tmp_path / "zero2.yaml"
    run(["bash", ROOT / "setup_accelerate.sh", "--backend", "deepspeed", "--num_gpus", 1,
         "--main_process_port", free_port(), "--output", config])
    out = tmp_path / "run"
    launch = dict(launcher=("bash", ROOT / "train.sh"), env={"ACCELERATE_CONFIG": str(config)})
    flags = ["--mixed_precision", "bf16", "--checkpointing_steps", 2]
    train(out, *flags, "--max_train_steps", 2, **launch)
    assert (out / "checkpoint-2").is_dir()
    log = train(out, *flags, "--max_train_steps", 3, "--resume_from_checkpoint", "latest", **launch)
    assert "checkpoint-2 at optimizer step 2" in log
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["skipped_steps"] == 0
    assert (out / "model_index.json").is_file()
