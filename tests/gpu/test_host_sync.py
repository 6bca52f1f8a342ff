"""On CUDA the loop does not wait for the GPU between logging steps, with either optimizer the
recipes use: torch's sync debug mode warns at every synchronising call (item(), a copy to pageable
host memory, a stream synchronisation), and none may come between logging steps."""

import json
import textwrap

import pytest

from conftest import write_pairs_dataset
from gpu.conftest import GPU
from test_reliability import finish, start_patched
from test_train_e2e import tiny_args

pytestmark = GPU

# Counts the synchronising CUDA calls per micro-step, from the first micro-step on.
SYNC_WARNINGS = """
    import atexit, json, os, warnings, torch
    import ip2p.training.step

    syncs = []  # syncs[k]: from the start of micro-step k to the start of micro-step k + 1
    real_show = warnings.showwarning
    def show(message, category, filename, lineno, file=None, line=None):
        if syncs and "synchroniz" in str(message):
            syncs[-1] += 1
            return
        real_show(message, category, filename, lineno, file, line)
    warnings.showwarning = show
    warnings.filterwarnings("always", message=".*synchroniz.*")

    real = ip2p.training.step.train_micro_step
    def train_micro_step(*a, **k):
        if not syncs:
            torch.cuda.set_sync_debug_mode("warn")
        syncs.append(0)
        return real(*a, **k)
    ip2p.training.step.train_micro_step = train_micro_step
    atexit.register(lambda: open(OUT, "w").write(json.dumps(syncs)))
"""


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_no_synchronisation_between_logging_steps(tiny_sdxl, tmp_path, optimizer):
    data = write_pairs_dataset(tmp_path / "data", n=72)  # one epoch covers the run
    out, log = tmp_path / "run", tmp_path / "syncs.json"
    steps, every, accumulation = 8, 4, 2
    proc = start_patched(tmp_path, f"OUT = {str(log)!r}\n" + textwrap.dedent(SYNC_WARNINGS), tiny_args(
        tiny_sdxl, data, out, "--max_train_steps", steps, "--logging_steps", every, "--gradient_accumulation_steps",
        accumulation, "--report_to", "none", "--dataloader_num_workers", 1, "--checkpointing_steps", 1000,
        "--validation_steps", 1000, "--mixed_precision", "bf16", "--optimizer", optimizer))
    rc, output = finish(proc)
    assert rc == 0, output[-3000:]
    syncs = json.loads(log.read_text())
    assert len(syncs) == steps * accumulation
    logging_micro_steps = {step * accumulation - 1 for step in range(every, steps, every)}
    between = {k: n for k, n in enumerate(syncs[:-1]) if k not in logging_micro_steps and n}
    assert between == {}, f"synchronising calls after these micro-steps (not logging steps): {between}"
    assert all(syncs[k] > 0 for k in logging_micro_steps)  # the loss is read there
