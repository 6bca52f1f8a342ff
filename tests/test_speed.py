"""What makes the loop fast without changing what it computes: no host reads of GPU values
between logging steps, and torch.compile (regional or full) giving eager mode's losses."""

import json
import textwrap

import pytest

from conftest import write_pairs_dataset
from test_reliability import finish, start_patched
from test_train_e2e import metrics, run_train, tiny_args

# Counts the host's reads of tensor values (item(), bool(), float(), equal(): what makes the host
# wait for a GPU), per micro-step of the training loop, from the first micro-step on. The data
# pipeline runs in a DataLoader worker (--dataloader_num_workers 1), as on a GPU node, so its own
# reads of CPU tensors are not counted.
HOST_READS = """
    import atexit, json, os, torch
    from torch.utils._python_dispatch import TorchDispatchMode
    import ip2p.training.step

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
             torch.ops.aten.is_nonzero.default}
    reads = []  # reads[k]: from the start of micro-step k to the start of micro-step k + 1

    class HostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in READS and reads and os.getpid() == PID:
                reads[-1] += 1
            return func(*args, **(kwargs or {}))

    PID, mode, real = os.getpid(), HostReads(), ip2p.training.step.train_micro_step
    def train_micro_step(*a, **k):
        if not reads:
            mode.__enter__()
        reads.append(0)
        return real(*a, **k)
    ip2p.training.step.train_micro_step = train_micro_step
    atexit.register(lambda: os.getpid() == PID and open(OUT, "w").write(json.dumps(reads)))
"""


def test_the_host_reads_gpu_values_only_at_logging_steps(tiny_sdxl, tmp_path):
    """The loss is read every --logging_steps; the non-finite check and the counters in between
    stay on the device (the check still skips: tests/test_reliability.py). With accumulation,
    micro-steps that end no optimizer step are covered too."""
    data = write_pairs_dataset(tmp_path / "data", n=72)  # one epoch covers the run (a new epoch reads its
    # DataLoader seed on the host: a CPU tensor, no GPU wait)
    out, log = tmp_path / "run", tmp_path / "reads.json"
    steps, every, accumulation = 8, 4, 2
    proc = start_patched(tmp_path, f"OUT = {str(log)!r}\n" + textwrap.dedent(HOST_READS), tiny_args(
        tiny_sdxl, data, out, "--max_train_steps", steps, "--logging_steps", every, "--gradient_accumulation_steps",
        accumulation, "--report_to", "none", "--dataloader_num_workers", 1, "--checkpointing_steps", 1000,
        "--validation_steps", 1000, "--random_flip", "false"))
    rc, output = finish(proc)
    assert rc == 0, output[-3000:]
    reads = json.loads(log.read_text())
    assert len(reads) == steps * accumulation
    logging_micro_steps = {step * accumulation - 1 for step in range(every, steps, every)}  # the last: teardown
    between = {k: n for k, n in enumerate(reads[:-1]) if k not in logging_micro_steps and n}
    assert between == {}, f"host reads after these micro-steps (not logging steps): {between}"
    assert all(reads[k] > 0 for k in logging_micro_steps)  # the loss is read there: the counter sees reads
    assert [m["step"] for m in metrics(out)] == [4, 8]


def losses(out) -> list[float]:
    return [m["loss"] for m in metrics(out)]


COMPILE_RUN = ["--max_train_steps", 4, "--gradient_accumulation_steps", 2, "--gradient_checkpointing",
               "--report_to", "none", "--checkpointing_steps", 1000, "--validation_steps", 1000]


@pytest.fixture(scope="module")
def eager_losses(tiny_sdxl, tiny_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("eager") / "run"
    run_train(*tiny_args(tiny_sdxl, tiny_pairs, out, *COMPILE_RUN))
    return losses(out)


# The full mode through the trainer takes over 2 minutes to compile on a 2-core CPU (2.4 with
# gradient checkpointing), too long for every CI run; tests/test_benchmarks.py compares its step
# with eager's (the trainer's own step function and compile_unet, one compilation, about a minute).
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["regional"])
def test_torch_compile_keeps_the_losses_of_eager_mode(tiny_sdxl, tiny_pairs, tmp_path, mode, eager_losses):
    """On the tiny model on the CPU (inductor's C++ backend), with gradient checkpointing and
    accumulation: the losses of eager mode within float tolerance."""
    compiled = tmp_path / "compiled"
    proc = run_train(*tiny_args(tiny_sdxl, tiny_pairs, compiled, *COMPILE_RUN, "--torch_compile",
                                "--torch_compile_mode", mode))
    assert f"torch.compile ({mode}): the first optimizer step took" in proc.stdout + proc.stderr
    assert losses(compiled) == pytest.approx(eager_losses, rel=1e-4, abs=1e-6)
    assert (compiled / "unet" / "config.json").is_file()  # the pipeline saves from the compiled run


def optimizer_config(**overrides):
    from ip2p.training.config import TrainConfig

    return TrainConfig(**overrides)


def test_the_optimizer_flag_picks_the_implementation(monkeypatch):
    import torch

    from ip2p.errors import UserError
    from ip2p.training.setup import make_optimizer

    params = [torch.nn.Parameter(torch.ones(4))]
    adamw = make_optimizer(optimizer_config(), params, 1e-4, torch.device("cpu"))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["fused"]  # fused on the CPU too: exact skips
    with pytest.raises(UserError, match="--optimizer adamw on this machine"):  # bitsandbytes needs CUDA
        make_optimizer(optimizer_config(optimizer="adamw8bit"), params, 1e-4, torch.device("cpu"))
    with pytest.raises(UserError, match="name two optimizers"):
        make_optimizer(optimizer_config(use_8bit_adam=True, optimizer="adamw8bit_torchao"), params, 1e-4,
                       torch.device("cpu"))
    monkeypatch.setitem(__import__("sys").modules, "torchao.optim", None)  # as where torchao is not installed
    with pytest.raises(UserError, match="pip install torchao"):
        make_optimizer(optimizer_config(optimizer="adamw8bit_torchao"), params, 1e-4, torch.device("cpu"))


def test_a_non_finite_step_leaves_fused_adamw_exactly_as_it_was():
    """The device-side skip: found_inf for fused AdamW (weights, moments and step count unchanged),
    zeroed gradients for the others; neither reads the norm on the host."""
    import torch

    from ip2p.training.step import skip_nonfinite_on_device

    def stepped(optimizer_cls, **kw):
        p = torch.nn.Parameter(torch.ones(3))
        opt = optimizer_cls([p], lr=0.1, **kw)
        p.grad = torch.ones(3)
        opt.step()
        before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
        p.grad = torch.tensor([1.0, float("nan"), 2.0])
        skipped = skip_nonfinite_on_device(opt, [p], torch.linalg.vector_norm(p.grad))
        opt.step()
        return p, opt, before, skipped

    p, opt, (weights, state), skipped = stepped(torch.optim.AdamW, fused=True)
    assert skipped.item() and torch.equal(p.detach(), weights)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())  # step count included
    p, opt, (weights, state), skipped = stepped(torch.optim.AdamW, foreach=False)  # no found_inf: zeroed
    assert skipped.item() and torch.isfinite(p).all() and torch.equal(p.grad, torch.zeros(3))
    torch.testing.assert_close(opt.state[p]["exp_avg"], state["exp_avg"] * 0.9)  # a zero gradient's update
