"""What keeps a days-long run safe: preemption signals, free disk space, non-finite losses.

Each guard agrees across processes (a decision one rank takes alone would deadlock the others).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import torch

from ip2p.errors import UserError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after saving a checkpoint; resume to continue


class StopOnSignal:
    """SIGTERM / SIGINT: finish the optimizer step in progress, checkpoint it, exit 75.

    A second signal stops at once. Schedulers (SLURM preemption, `scancel`, Kubernetes) send
    SIGTERM to every process, so each rank sees it; the ranks still agree through a max-reduce.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"\nreceived {name} again: stopping now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = name
        print(f"\nreceived {name}: finishing this optimizer step, saving a checkpoint, then stopping "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def requested(self, accelerator) -> bool:
        flag = self.received is not None
        if accelerator.num_processes > 1:
            t = torch.tensor([float(flag)], device=accelerator.device)
            flag = accelerator.reduce(t, reduction="sum").item() > 0
        return flag

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def ignore_signals_in_worker(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def checkpoint_bytes_estimate(last_checkpoint: Path | None, unet, ema) -> int:
    """The size of the next checkpoint: the last one's, else the weights + AdamW states (+ EMA)."""
    if last_checkpoint is not None:
        return folder_bytes(last_checkpoint)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    return weights * (3 + (1 if ema is not None else 0))


def check_free_space(accelerator, output_dir: Path, step: int, need: int) -> None:
    """Refuse to start a checkpoint that cannot fit (10% margin); the last good one is kept."""
    ok = [True, 0]
    if accelerator.is_main_process:
        free = free_bytes(output_dir)
        ok = [free >= need * 1.1, free]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        ok = broadcast_object_list(ok)
    if not ok[0]:
        gb = 1e9
        raise UserError(
            f"not enough disk space in {output_dir} for checkpoint-{step}: about {need * 1.1 / gb:.1f} GB needed, "
            f"{ok[1] / gb:.1f} GB free; the last complete checkpoint is kept. Free some space (or lower "
            "--checkpoints_total_limit) and run again with --resume_from_checkpoint latest")


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss or gradient; too many in a row stop the run."""

    def __init__(self, max_in_row: int):
        self.max_in_row, self.in_row, self.total = max_in_row, 0, 0

    def update(self, skipped: bool, step: int, last_checkpoint: Path | None) -> None:
        if not skipped:
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        print(f"warning: optimizer step {step}: the loss or the gradients were not finite; the update was skipped "
              f"({self.in_row} in a row, {self.total} in all)", file=sys.stderr, flush=True)
        if self.in_row >= self.max_in_row:
            raise UserError(
                f"the loss or gradients were not finite for {self.in_row} optimizer steps in a row (up to step {step}). "
                "Usual causes: the stock SDXL VAE overflowing in fp16 (train with --mixed_precision bf16, keep "
                "--vae_precision fp32, or use --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix) "
                "or a learning rate too high. Last complete checkpoint: "
                f"{last_checkpoint or 'none'}")
