"""Benchmark ranks on this machine: spawned processes joined by gloo, and what each reads off itself.

* `run_ranks(target, world_size, args)`: start `target(rank, port, out, *args)` in `world_size`
  fresh processes (spawn), wait for them, and return what each wrote to `<out>/rank<r>.json`.
* `join_gloo(rank, world_size, port)`: the process group those ranks form on 127.0.0.1;
  `leave_gloo()`: leave it once every collective this rank started has finished.
* `GatherCounter`: every all-gather through torch.distributed, counted (calls and bytes).
* `rss(field)`, `reset_peak_rss()`: the process's resident memory (VmRSS, VmHWM) from /proc.

It decides nothing about what is measured: `bench.zero_scaling` and `bench.zero_large` do.
"""

from __future__ import annotations

import faulthandler
import functools
import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp


class GatherCounter:
    """Counts every all-gather through torch.distributed (calls and gathered bytes)."""

    def __init__(self):
        self.calls = 0
        self.bytes = 0

    def install(self) -> None:
        """Wrap torch.distributed's all-gathers; call it before DeepSpeed binds its all-gather function."""
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        def counted(fn, out_of):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                out = kwargs.get("output_tensor", kwargs.get("tensor_list", args[0] if args else None))
                self.calls += 1
                self.bytes += out_of(out)
                return fn(*args, **kwargs)

            return wrapper

        tensor_bytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        list_bytes = lambda ts: sum(tensor_bytes(t) for t in ts)  # noqa: E731
        # DeepSpeed looks these up on either module (and binds one at init), so patch both first.
        for module in (dist, c10d):
            module.all_gather_into_tensor = counted(c10d.all_gather_into_tensor, tensor_bytes)
            module._all_gather_base = counted(c10d._all_gather_base, tensor_bytes)
            module.all_gather = counted(c10d.all_gather, list_bytes)


def rss(field_name: str) -> int:
    """Bytes of `field_name` (VmRSS: resident now, VmHWM: the peak) in /proc/self/status; 0 if absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS, so the next peak read is of what runs from here on."""
    Path("/proc/self/clear_refs").write_text("5")


def join_gloo(rank: int, world_size: int, port: int) -> None:
    """Join the gloo process group of `world_size` ranks on 127.0.0.1:`port`."""
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def leave_gloo() -> None:
    """Leave the process group once every collective this rank started has finished.

    ZeRO-3 leaves asynchronous all-gathers in flight (its prefetch): destroying the group with one
    still on gloo's worker thread lets that thread outlive the interpreter, which then aborts at exit
    ("terminate called without an active exception"). A gloo barrier waits for all of this rank's
    earlier work first, and no rank leaves before every rank is done.
    """
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(target: Callable[..., None], *args) -> None:
    """A rank's process: `target(*args)`, with a fatal signal printing every thread's Python stack."""
    faulthandler.enable()
    target(*args)


def run_ranks(
    target: Callable[..., None], world_size: int, args: tuple, *, timeout_s: float, what: str
) -> list[dict]:
    """Run `target(rank, port, out, *args)` in `world_size` spawned processes; each rank's JSON result.

    Each rank writes `<out>/rank<rank>.json` (`out`: a temporary folder, removed afterwards).
    RuntimeError naming `what` when a rank exits non-zero.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="promptfleet-ranks-") as out:
        port = _free_port()
        procs = [ctx.Process(target=_rank, args=(target, r, port, out, *args)) for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout_s)
        if [p.exitcode for p in procs] != [0] * world_size:
            raise RuntimeError(f"{what}: ranks exited with {[p.exitcode for p in procs]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world_size)]
