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
    """SIGTERM / SIGINT: finish the optimizer step in progress, checkpoint, exit 75.

    A second signal stops at once. Schedulers (SLURM preemption, `scancel`, Kubernetes) send
    SIGTERM to every process, but the ranks must stop at the same step whoever saw it, so they
    agree through a max-reduce of their flags. That reduce is started after each optimizer step
    and read after the next one, by when it has long finished: the host never waits for it. So
    one process checkpoints the step in progress; several checkpoint the step after it.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        self._pending = None
        self._pinned = None  # the reduced flag's host copy, made on first use
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
        """Called once per optimizer step on every process; True on all of them at the same step."""
        if accelerator.num_processes == 1:
            return self.received is not None
        stop = self._pending is not None and self._pending.read()
        self._pending = None if stop else _ReducedFlag(self.received is not None, accelerator.device, self._host())
        return stop

    def _host(self):
        """One pinned host buffer for the reduced flag, reused: each is read before the next reduce."""
        if self._pinned is None:
            self._pinned = torch.empty(1, pin_memory=torch.cuda.is_available())
        return self._pinned

    def restore(self) -> None:
        """Restore the previous handlers; a reduce still in flight is waited for (every rank has one)."""
        if self._pending is not None:
            self._pending.read()
            self._pending = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _ReducedFlag:
    """A flag max-reduced over the processes, started now and read later without a device wait.

    On CUDA the reduced value is copied into pinned host memory behind an event; `read()` waits
    for that event, which by the next optimizer step the GPU has long passed."""

    def __init__(self, flag: bool, device, host: torch.Tensor):
        import torch.distributed as dist

        self.value = torch.full((1,), float(flag), device=device)  # a fill: no copy from pageable memory, no wait
        self.work = dist.all_reduce(self.value, op=dist.ReduceOp.MAX, async_op=True)
        self.event = None
        if self.value.device.type == "cuda":
            self.work.wait()  # for NCCL: orders the copy below after the reduce on the GPU; the host goes on
            self.host = host
            self.host.copy_(self.value, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def read(self) -> bool:
        if self.event is None:
            self.work.wait()  # gloo: the reduce ran on the CPU meanwhile
            return bool(self.value.numpy()[0] > 0)
        self.event.synchronize()
        return bool(self.host.numpy()[0] > 0)


def ignore_signals_in_worker(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def checkpoint_bytes_estimate(last_checkpoint: Path | None, trainable, ema) -> int:
    """The size of the next checkpoint: the last one's, else the trained weights + AdamW states (+ EMA)."""
    if last_checkpoint is not None:
        return folder_bytes(last_checkpoint)
    weights = sum(p.numel() * p.element_size() for p in trainable)
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
    """Counts optimizer steps skipped for a non-finite loss or gradient; too many in a row stop the run.

    `update` runs after every optimizer step and keeps its counts on the device (the skip flag is
    a device tensor); `check` reads them, once per logging interval and before each checkpoint,
    where the loop reads the loss anyway. A streak of `max_in_row` is therefore seen at the next
    logging step (at once with --logging_steps 1); the skipped steps in between change no weight.
    """

    def __init__(self, max_in_row: int, device, total: int = 0, step: int = 0):
        self.max_in_row, self.reported, self.checked_step = max_in_row, total, step
        self.counts = torch.tensor([total, 0, 0], device=device)  # total, current streak, longest since read

    def update(self, skipped) -> None:
        # a bool: decided on the host already (GradScaler, DeepSpeed, no check); used as a scalar,
        # it needs no copy to the device
        s = int(skipped) if isinstance(skipped, bool) else skipped.to(self.counts.dtype)
        total, in_row, longest = self.counts.unbind()
        in_row = (in_row + s) * s  # 0 after a good step
        self.counts = torch.stack([total + s, in_row, torch.maximum(longest, in_row)])

    def check(self, step: int, last_checkpoint: Path | None) -> int:
        """Read the counts (a host synchronisation); warn about new skips, stop on a long streak.
        Returns the number of skipped steps so far."""
        total, in_row, longest = self.counts.tolist()
        first, self.checked_step = self.checked_step + 1, step
        new, self.reported = total - self.reported, total
        if new and first == step:
            print(f"warning: optimizer step {step}: the loss or the gradients were not finite; the update was skipped "
                  f"({in_row} in a row, {total} in all)", file=sys.stderr, flush=True)
        elif new:
            print(f"warning: optimizer steps {first}-{step}: the loss or the gradients were not finite at {new} of "
                  f"them; those updates were skipped ({in_row} in a row now, {total} in all)",
                  file=sys.stderr, flush=True)
        self.counts[2] = in_row
        if longest >= self.max_in_row:
            raise UserError(
                f"the loss or gradients were not finite for {longest} optimizer steps in a row (up to step {step}). "
                "Usual causes: the stock SDXL VAE overflowing in fp16 (train with --mixed_precision bf16, keep "
                "--vae_precision fp32, or use --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix) "
                "or a learning rate too high. Last complete checkpoint: "
                f"{last_checkpoint or 'none'}")
        return total
