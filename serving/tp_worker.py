"""The ranks of a tensor-parallel replica: rank 0's `ShardedRunner` and every other rank's loop.

Rank 0 runs the engine (scheduler, registry, HTTP) and a `ShardedRunner` in place of the plain
`ModelRunner`: before each step it sends the step's plan (`serving.step_plan`) to the other ranks,
then runs the same runner step on its own shard; its sampled tokens are the answers, and they ride
to the other ranks in the next plan (so a rank's next decode input is rank 0's token even where a
sampled row's random draw could differ). While the engine is idle it sends an empty plan at least
every quarter second, so a rank that waits for a plan never mistakes an idle replica for a dead one.
Every other rank (`serve_rank`) loops: receive a plan, apply its task changes, run the step.

`start_ranks` starts ranks 1..N-1 as child processes (`python -m serving.tp_worker`) on this
machine; `serving.ray_app` starts them as Ray actors in the replica's placement group instead.
Either way the ranks meet in one process group (`serving.tensor_parallel.init_group`).

Failure: a collective that raises (a rank died, or stalled past `engine.collective_timeout_s`)
becomes `RankLost` on rank 0, whose engine ends every request with 503; a non-zero rank that loses
rank 0 exits with status 1. A stop sends STOP, and each rank leaves the group and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from serving.config import EngineConfig
from serving.kv_batch import to_device
from serving.runner import ModelRunner, StepResult
from serving.scheduler import SchedulerOutput
from serving.step_plan import IDLE, RESET, STEP, STOP, PlanReader, PlanWriter, StepPlan
from serving.tensor_parallel import (
    GroupSpec,
    PeakAnon,
    RankLost,
    RankMemory,
    check_shards,
    free_port,
    full_bytes,
    init_group,
    leave_group,
    load_sharded_backbone,
    local_bytes,
    set_group_timeout,
)

log = logging.getLogger(__name__)
STOP_JOIN_S = 10.0  # a rank left this long after STOP is killed


class Collectives:
    """The replica's plan channel and step agreement; any failure of the group is `RankLost`."""

    def __init__(self, spec: GroupSpec, device: torch.device):
        self.device = device
        # Plans are pickled host objects: on GPUs they travel on a gloo group beside the NCCL one.
        self.plans = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=spec.timeout_s))
            if spec.backend == "nccl"
            else None
        )

    def send(self, plan: StepPlan) -> None:
        self._broadcast([plan])

    def receive(self) -> StepPlan:
        box: list = [None]
        self._broadcast(box)
        return box[0]

    def _broadcast(self, box: list) -> None:
        try:
            dist.broadcast_object_list(box, src=0, group=self.plans)
        except RankLost:
            raise
        except Exception as e:
            raise RankLost(f"a rank of this replica is gone ({_short(e)})") from None

    def agree(self, ok: bool) -> bool:
        """True when every rank's attempt succeeded (one tiny all-reduce)."""
        flag = torch.tensor([1 if ok else 0], device=self.device)
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        except Exception as e:
            raise RankLost(f"a rank of this replica is gone ({_short(e)})") from None
        return bool(flag.item())


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def make_runner(config: EngineConfig, spec: GroupSpec, rank: int) -> tuple[ModelRunner, Collectives]:
    """Join the group as `rank`, load this rank's shard, and build its runner."""
    from tuner.model.backbone import pick_attention, pick_dtype
    from tuner.model.model_cache import resolve_backbone

    if config.threads > 0:
        torch.set_num_threads(config.threads)
    device = init_group(spec, rank)
    comm = Collectives(spec, device)
    with PeakAnon() as anon:
        model = load_sharded_backbone(
            resolve_backbone(config.backbone),
            pick_dtype(config.dtype, device),
            pick_attention("auto", device),
        )
    runner = ModelRunner(
        model, config.prefix_cache_bytes, config.prefix_cache, shards=spec.world, agree=comm.agree
    )
    comm.memory = [None] * spec.world  # every rank's `RankMemory`, known to rank 0 (logged, tested)
    dist.all_gather_object(
        comm.memory, RankMemory(rank, local_bytes(model), full_bytes(model), anon.growth, anon.peak)
    )
    set_group_timeout(spec.timeout_s, *([comm.plans] if comm.plans is not None else []))
    return runner, comm


class ShardedRunner:
    """Rank 0's runner: the plain runner's interface, each step preceded by its plan to the other ranks."""

    def __init__(self, runner: ModelRunner, comm: Collectives, stop_ranks):
        self.runner, self.comm, self._stop_ranks = runner, comm, stop_ranks
        self.writer = PlanWriter()
        self._stopped = False
        self._tokens: dict[str, int] = {}  # this rank's last sampled tokens, for the next plan
        self.model, self.prefix_cache = runner.model, runner.prefix_cache
        self.hidden_size, self.max_positions = runner.hidden_size, runner.max_positions

    @property
    def batch(self):
        return self.runner.batch

    @property
    def partial(self):
        return self.runner.partial

    @property
    def prefill_tokens_total(self) -> int:
        return self.runner.prefill_tokens_total

    def step(self, out: SchedulerOutput) -> StepResult:
        self.comm.send(self.writer.plan(out, self._tokens))
        self._tokens = {}
        result = self.runner.step(out)
        self._tokens = result.tokens
        return result

    def reset(self) -> None:
        self.comm.send(StepPlan(RESET, forget=self.writer.take_forget()))
        self.runner.reset()
        self._tokens = {}

    def idle(self) -> None:
        """Prove rank 0 alive to the waiting ranks (and pass on tasks to forget)."""
        self.comm.send(StepPlan(IDLE, forget=self.writer.take_forget()))

    def invalidate(self, task: str) -> None:
        """`task` changed or was removed: every rank drops its prompt and prefix KV."""
        self.runner.prefix_cache.invalidate(task)
        self.writer.forget(task)

    def stop(self, failed: bool = False) -> None:
        """End the other ranks: STOP when they can still hear it, else they are killed (once)."""
        if self._stopped:
            return
        self._stopped = True
        if not failed:
            try:
                self.comm.send(StepPlan(STOP))
            except RankLost:
                failed = True
        self._stop_ranks(failed)
        leave_group()


def serve_rank(runner: ModelRunner, comm: Collectives) -> None:
    """A non-zero rank's loop: run every plan rank 0 sends until STOP (RankLost if rank 0 is gone)."""
    reader = PlanReader()
    while True:
        plan = comm.receive()
        for name in reader.apply(plan):
            runner.prefix_cache.invalidate(name)
        if plan.op == STOP:
            return
        if plan.op == RESET:
            runner.reset()
        elif plan.op == STEP:
            if plan.tokens and runner.batch is not None:  # rank 0's tokens are the next inputs
                ids = [plan.tokens[rid] for rid in runner.batch.request_ids]
                runner.batch.last_tokens = to_device(ids, runner.device)
            runner.step(reader.scheduler_output(plan))
        elif plan.op != IDLE:
            raise ValueError(f"unknown plan op {plan.op!r}")


# launch(config, spec) starts ranks 1..N-1 and returns (stop(failed), their process ids or [])
Launcher = Callable[[EngineConfig, GroupSpec], tuple[Callable[[bool], None], list[int]]]


def launch_processes(config: EngineConfig, spec: GroupSpec) -> tuple[Callable[[bool], None], list[int]]:
    """Ranks 1..N-1 as child processes of this one (`python -m serving.tp_worker`)."""
    cfg, group = json.dumps(dataclasses.asdict(config)), json.dumps(dataclasses.asdict(spec))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "serving.tp_worker", "--rank", str(r), "--spec", group, "--config", cfg]
        )
        for r in range(1, spec.world)
    ]

    def stop_ranks(failed: bool) -> None:
        deadline = time.monotonic() + (0 if failed else STOP_JOIN_S)
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    return stop_ranks, [p.pid for p in procs]


def start_ranks(
    config: EngineConfig, launch: Launcher = launch_processes, host: str = "127.0.0.1"
) -> tuple[ShardedRunner, object]:
    """Rank 0 of a replica: check N, start ranks 1..N-1 (`launch`), join them at `host`.

    Returns rank 0's runner and its (sharded) model."""
    from transformers import AutoConfig

    from tuner.model.model_cache import resolve_backbone

    n = config.tensor_parallel
    check_shards(AutoConfig.from_pretrained(resolve_backbone(config.backbone)), n, config.device)
    spec = GroupSpec(n, host, free_port(host), config.collective_timeout_s, config.device)
    stop_ranks, pids = launch(config, spec)
    try:
        runner, comm = make_runner(config, spec, 0)
    except BaseException:
        stop_ranks(True)
        raise
    sharded = ShardedRunner(runner, comm, stop_ranks)
    sharded.pids = pids
    sharded.memory = comm.memory
    for m in comm.memory:
        log.info(
            "rank %d holds %.1f MB of weights (%.3f of the model's %.1f MB); its load added %.1f MB "
            "private memory (%.1f MB at its peak)",
            m.rank,
            m.weight_bytes / 2**20,
            m.ratio,
            m.full_weight_bytes / 2**20,
            m.anon_growth_bytes / 2**20,
            m.anon_peak_bytes / 2**20,
        )
    sharded.idle()  # the first plan sets up the ranks' connections: paid here, not by the first request
    return sharded, runner.model


def run_rank(config: EngineConfig, spec: GroupSpec, rank: int) -> int:
    """A non-zero rank from start to exit: 0 after STOP, 1 when rank 0 is gone."""
    runner, comm = make_runner(config, spec, rank)
    try:
        serve_rank(runner, comm)
    except RankLost as e:
        log.error("rank %d: %s; exiting", rank, e)
        return 1
    leave_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one non-zero rank of a tensor-parallel serving replica")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--spec", required=True, help="GroupSpec as JSON")
    p.add_argument("--config", required=True, help="EngineConfig as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(
        level="INFO", format=f"%(asctime)s rank {args.rank} %(levelname)s %(name)s: %(message)s"
    )
    return run_rank(EngineConfig(**json.loads(args.config)), GroupSpec(**json.loads(args.spec)), args.rank)


if __name__ == "__main__":  # what a rank sends rank 0 is defined in other modules: it unpickles there
    sys.exit(main())
