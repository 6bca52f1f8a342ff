"""`accelerate launch` for train.sh: the trainer's own exit code and message, nothing more.

    python -m ip2p.training.launch [accelerate launch flags] train_instruct_pix2pix_sdxl.py [trainer flags]

accelerate's launcher turns every non-zero exit of the trainer into its own traceback and exit
code 1: a `subprocess.CalledProcessError` for one process (`--cpu`, or one GPU without a
distributed config), a torch elastic `ChildFailedError` for several (`--multi_gpu`, DeepSpeed).
The trainer has already said what went wrong, and its code is what a user or a scheduler acts
on: 2 a user error, 75 stopped by a signal after a checkpoint (resume), 1 a bug. This runs
accelerate's own parser and launch_command and returns the trainer's code instead.

Signals. SIGTERM and SIGINT must reach every trainer process exactly once: the trainer finishes
the optimizer step, checkpoints and exits 75, and takes a second signal as "stop at once".
The trainer processes run in their own session (torch elastic starts each rank so; the one
process of the simple launch is started so here), so a signal to train.sh's process group, a
Ctrl-C in the terminal or a `kill` of train.sh alone (docker or Kubernetes stop) reaches only
this launcher, which passes it on once and keeps waiting for the exit codes. Under SLURM the job
step's every process is signalled by slurmstepd itself, the trainers included, so nothing is
passed on there. The elastic agent's own handler is kept off SIGTERM and SIGINT: it would pass
the signal on as well (a second signal under SLURM) and SIGKILL the ranks 30 s later, in the
middle of a checkpoint of a large model.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT)
USER_ERROR, PREEMPTED = 2, 75


def exit_code(returncode: int) -> int:
    """A process's exit code as a shell reports it: a death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def exit_code_of_ranks(codes_in_failure_order: list[int]) -> int:
    """One exit code for several ranks. When one rank stops, torch elastic tears the others down
    (SIGTERM, or they lose their peer and fail with 1), so most codes are collateral. A rank's
    verdict wins: 2 (a user error, which the trainer named) before 75 (stopped after a checkpoint);
    otherwise the first rank to fail gives the code."""
    codes = [exit_code(c) for c in codes_in_failure_order]
    for verdict in (USER_ERROR, PREEMPTED):
        if verdict in codes:
            return verdict
    return codes[0] if codes else 1


def _child_pids() -> list[int]:
    import psutil  # an accelerate dependency

    return [p.pid for p in psutil.Process().children(recursive=False)]


def _pass_on(signum, frame) -> None:
    if os.environ.get("SLURM_JOB_ID"):
        return  # slurmstepd signals every process of the step; a second signal would stop at once
    for pid in _child_pids():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _die_with_parent() -> None:
    """In the trainer, before exec: it dies when this launcher does (a SIGKILL to train.sh's
    process group no longer reaches it directly, as it runs in its own session)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def simple_launcher(args) -> None:
    """accelerate's simple_launcher, with the trainer in its own session (see the module doc)."""
    from accelerate.utils import prepare_simple_launcher_cmd_env

    cmd, env = prepare_simple_launcher_cmd_env(args)
    process = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    process.wait()
    if process.returncode != 0:
        raise subprocess.CalledProcessError(returncode=process.returncode, cmd=cmd)


def _quiet_elastic_agent() -> None:
    """The agent logs each rank's exit and the teardown of the others (`failed (exitcode: 2) ...`,
    `Sending process ... closing signal`): the trainer's own line says it, and the exit code
    carries it. LOGLEVEL, torch elastic's own setting, still shows them."""
    if "LOGLEVEL" in os.environ:
        return
    import torch.distributed.run  # noqa: F401  (creates the agent's loggers)

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    import accelerate.commands.launch as accelerate_launch

    args = accelerate_launch.launch_command_parser().parse_args(argv)
    # torchrun's --signals_to_handle (accelerate passes on the attributes torchrun knows): the
    # agent's handler stays off the signals passed on here (see the module doc)
    args.signals_to_handle = "SIGHUP,SIGQUIT"
    for sig in FORWARDED:
        signal.signal(sig, _pass_on)
    accelerate_launch.simple_launcher = simple_launcher  # launch_command picks it by name
    _quiet_elastic_agent()
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        accelerate_launch.launch_command(args)
    except subprocess.CalledProcessError as e:  # one process; DeepSpeed's multi-node runners
        return exit_code(e.returncode)
    except ChildFailedError as e:  # torch elastic: --multi_gpu, DeepSpeed on one node
        failures = sorted(e.failures.items(), key=lambda item: item[1].timestamp)
        code = exit_code_of_ranks([f.exitcode for _, f in failures])
        rank, first = failures[0]
        if first.exitcode < 0 and code == exit_code(first.exitcode):
            # killed by a signal (the OOM killer, a SIGKILL): the rank itself could say nothing
            print(f"rank {rank} was killed by {signal.Signals(-first.exitcode).name} (exit {code}); "
                  "the other ranks were stopped", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
