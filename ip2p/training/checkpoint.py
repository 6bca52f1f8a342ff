"""Checkpoints: `OUTPUT_DIR/checkpoint-N`, written whole or not at all.

A checkpoint is accelerate's full state (UNet, optimizer, RNG of every process, and the registered
objects: LR schedule, EMA, the run's position) written under a temporary name and renamed when
complete, so `latest` never picks a half-written one and old ones are pruned only after the new
one exists.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ip2p.errors import UserError

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"


@dataclass
class TrainState:
    """The run's position, saved in every checkpoint (accelerate's register_for_checkpointing)."""

    global_step: int = 0  # optimizer steps taken
    num_processes: int = 1
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches each process has consumed in this epoch
    micro_batch: int = 0  # samples per micro-batch, all processes together
    skipped_steps: int = 0  # optimizer steps skipped for non-finite gradients
    replaced_samples: int = 0  # samples that failed to decode (replaced by the next one)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def resume_position(state: TrainState, micro_batch: int, batches_per_epoch: int) -> tuple[int, int]:
    """(epoch, micro-batches to skip) to continue where the checkpoint stopped.

    With the same processes and batch size this is exact. With another number of processes (or
    per-device batch) the position is converted through the samples consumed in the epoch and
    rounded down, so at most one micro-batch of samples is seen twice; the LR schedule continues
    at the same optimizer step either way.
    """
    skip = state.batches_in_epoch
    if state.micro_batch and state.micro_batch != micro_batch:
        skip = state.batches_in_epoch * state.micro_batch // micro_batch
    if skip >= batches_per_epoch:
        return state.epoch + 1, 0
    return state.epoch, skip


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / STATE_FILE).is_file()


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: a path, `latest` (None when there is none yet) or None."""
    if not resume:
        return None
    if resume == "latest":
        done = [p for p in list_checkpoints(output_dir) if is_checkpoint(p)]
        return done[-1] if done else None
    path = Path(resume)
    if not path.exists() and (Path(output_dir) / resume).exists():
        path = Path(output_dir) / resume  # diffusers accepts a bare folder name inside output_dir
    if not path.exists():
        raise UserError(f"--resume_from_checkpoint {resume} does not exist (nor {Path(output_dir) / resume}); "
                        "pass a checkpoint-N folder or 'latest'")
    if not is_checkpoint(path):
        raise UserError(f"--resume_from_checkpoint {resume} is not a checkpoint folder "
                        f"(no {STATE_FILE}); pass a checkpoint-N folder or 'latest'")
    return path


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainState, total_limit: int | None) -> Path:
    """Write checkpoint-N atomically on every process's behalf; prune old ones afterwards."""
    final = Path(output_dir) / f"checkpoint-{state.global_step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its part (RNG, sharded states)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state.state_dict(), indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `total_limit`; returns what was deleted."""
    if not total_limit:
        return []
    done = list_checkpoints(output_dir)
    old = done[: max(0, len(done) - total_limit)]
    for p in old:
        shutil.rmtree(p)
    return old
