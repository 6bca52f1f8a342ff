"""Two real processes (gloo, CPU) through train.sh: synchronised, nothing missing, the samples served
twice to fill an epoch's last round counted and said."""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import run_in_session

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_sh(*args, processes=1) -> subprocess.CompletedProcess:
    env = dict(os.environ, CPU_PROCESSES=str(processes), MAIN_PROCESS_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    proc = run_in_session(["bash", ROOT / "train.sh", *args], timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_on_one(tiny_sdxl, tiny_pairs, tmp_path):
    common = ["--config", "configs/tiny_cpu.yaml", "--pretrained_model_name_or_path", tiny_sdxl,
              "--data_dir", tiny_pairs, "--report_to", "none", "--latent_cache_shard_size", 4]
    out = tmp_path / "two"
    proc = train_sh(*common, "--output_dir", out, "--max_train_steps", 4, "--checkpointing_steps", 2, processes=2)
    log = proc.stdout + proc.stderr
    assert "2 processes x 4 per device x 1 accumulation = 8 per optimizer step" in log
    assert "filled up with 6 samples from the start of the epoch" in log  # 10 pairs, rounds of 8
    assert log.count("weights identical on all 2 processes") == 3  # after each checkpoint and at the end
    assert log.count("latent cache: encoding 3 of 3 shards") == 1 and log.count("saved the InstructPix2Pix") == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (out / "checkpoint-4").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert steps(out) == [1, 2, 3, 4]
    assert (out / "model_index.json").is_file() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    # the cache split across two processes is byte for byte a one-process build
    one = tmp_path / "one"
    train_sh(*common, "--output_dir", one, "--max_train_steps", 1)
    (two_entry,), (one_entry,) = (list((d / "latent_cache").iterdir()) for d in (out, one))
    assert two_entry.name == one_entry.name
    shards = sorted(p.name for p in one_entry.glob("shard-*.safetensors"))
    assert len(shards) == 3 and shards == sorted(p.name for p in two_entry.glob("shard-*.safetensors"))
    import torch
    from safetensors.torch import load_file

    for s in shards:  # equal to float tolerance: the two runs use different numbers of CPU threads
        a, b = load_file(two_entry / s), load_file(one_entry / s)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)

    # resuming with another number of processes continues the step count and the schedule
    proc = train_sh(*common, "--output_dir", out, "--max_train_steps", 6, "--resume_from_checkpoint", "latest")
    assert "written by 2 processes, this run has 1" in proc.stdout + proc.stderr
    assert steps(out) == [1, 2, 3, 4, 5, 6]
    assert "latent cache: reusing" in proc.stdout


def test_train_sh_reads_the_slurm_allocation(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho gpu-node-07\necho gpu-node-08\n")
    (fake / "python8").write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then echo 8; else exec python3 "$@"; fi\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    config = tmp_path / "acc.yaml"
    config.write_text("distributed_type: MULTI_GPU\n")
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", PYTHON=str(fake / "python8"), TRAIN_SH_DRY_RUN="1",
               ACCELERATE_CONFIG=str(config), SLURM_JOB_ID="42", SLURM_JOB_NODELIST="gpu-node-[07-08]",
               SLURM_NNODES="2", SLURM_NODEID="1", MAIN_PROCESS_PORT="29555")
    proc = subprocess.run(["bash", str(ROOT / "train.sh"), "--data_dir", "./data_hf"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    flag = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert flag["--config_file"] == str(config) and flag["--num_machines"] == "2" and flag["--machine_rank"] == "1"
    assert flag["--num_processes"] == "16" and flag["--main_process_ip"] == "gpu-node-07"
    assert flag["--main_process_port"] == "29555"
    assert flag["--config"].endswith("configs/sdxl_1024_8xa100.yaml") and flag["--data_dir"] == "./data_hf"


def test_repeats_per_epoch_are_what_accelerate_serves():
    """Each process gets the same number of full micro-batches, the last round topped up from the
    epoch's start; nothing is missing. Checked against accelerate's own data loader sharding."""
    import torch
    from accelerate.data_loader import prepare_data_loader

    from ip2p.training.pairs import make_dataloader, repeats_per_epoch

    class Indices(torch.utils.data.Dataset):
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return {"index": torch.tensor(i)}

    for n, batch, processes in [(10, 4, 1), (10, 4, 2), (16, 4, 2), (17, 4, 2), (9, 2, 4), (100, 3, 8)]:
        loader, _ = make_dataloader(Indices(n), batch, 0, seed=0, pin_memory=False)
        served = []
        for rank in range(processes):
            shard = prepare_data_loader(loader, num_processes=processes, process_index=rank, put_on_device=False)
            served += [i for b in shard for i in b["index"].tolist()]
        assert sorted(set(served)) == list(range(n))  # nothing missing
        assert len(served) - n == repeats_per_epoch(n, batch, processes)
        assert max(served.count(i) for i in range(n)) <= 2  # a repeat is seen twice, no more
