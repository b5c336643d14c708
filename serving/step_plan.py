"""The step plan: what rank 0 tells the other ranks of a tensor-parallel replica before every step.

Rank 0 owns the scheduler, the registry and the requests; the other ranks own only their shard of
the model and of the KV caches. So before each step rank 0 sends one `StepPlan` (a small dataclass,
pickled by `broadcast_object_list`): the `SchedulerOutput` reduced to what the runner reads (request
ids to decode, and per new row its token ids, task, positions already computed, continuations and
sampling settings), the task prompts the ranks do not hold yet, the tasks to forget, and the
tokens rank 0 sampled in the previous step. Every rank then runs the same `ModelRunner.step` on the
same plan, so their batches, partial prefills and prefix caches stay the same row for row.

One registry version per step: a row names its task as `(name, version)`, and the prompt of a
version the ranks have not seen travels in the same plan (`PlanWriter` remembers what it sent). So
a rank never computes with a prompt the others do not have, whatever the prompt store does between
two scans; a changed or removed task is forgotten by every rank in the plan of the step where
rank 0 forgets it.

It does not run the model nor talk to the process group (`serving.tp_worker` does).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from serving.scheduler import Request, RequestKind, SchedulerOutput
from serving.types import SamplingParams

STEP, IDLE, RESET, STOP = "step", "idle", "reset", "stop"


@dataclass
class RowPlan:
    """One new row (a prefill, a chunk of one, or a classification) as the runner reads it."""

    request_id: str
    kind: RequestKind
    task: tuple[str, Hashable]  # (name, version): the prompt every rank uses for this row
    prefill_ids: list[int]
    num_computed: int
    continuations: list[list[int]]
    params: SamplingParams


@dataclass
class StepPlan:
    op: str = (
        IDLE  # STEP runs the rows below; IDLE only proves rank 0 alive; RESET drops every row; STOP ends
    )
    decode: list[str] = field(default_factory=list)  # running generations, in scheduler order
    prefill: list[RowPlan] = field(default_factory=list)
    chunks: list[tuple[RowPlan, int]] = field(default_factory=list)
    partial: frozenset[str] = frozenset()
    prompts: list[tuple[str, Hashable, torch.Tensor]] = field(
        default_factory=list
    )  # versions new to the ranks
    forget: list[str] = field(default_factory=list)  # tasks changed or removed: prompts and prefix KV dropped
    tokens: dict[str, int] = field(default_factory=dict)  # rank 0's sampled tokens of the previous step


@dataclass
class TaskPromptCopy:
    """A rank's copy of one task version's prompt (what `serving.runner.TaskPrompt` asks for)."""

    name: str
    version: Hashable
    prompt: torch.Tensor


@dataclass
class RowRequest:
    """What a non-zero rank knows of a request: the fields the runner reads of `scheduler.Request`."""

    request_id: str
    kind: RequestKind
    adapter: TaskPromptCopy
    prefill_ids: list[int]
    num_computed: int
    continuations: list[list[int]]
    params: SamplingParams
    sampler: object | None = None

    @property
    def prompt_ids(self) -> list[int]:  # a classification's prefill is its prompt
        return self.prefill_ids


class PlanWriter:
    """Rank 0: `SchedulerOutput` -> `StepPlan`, shipping each task version once."""

    def __init__(self):
        self._held: set[tuple[str, Hashable]] = set()  # versions every rank holds
        self._forget: set[str] = set()

    def forget(self, task: str) -> None:
        """`task` changed or was removed: the next plan tells the ranks to drop it."""
        self._forget.add(task)
        self._held = {k for k in self._held if k[0] != task}

    def plan(self, out: SchedulerOutput, tokens: dict[str, int]) -> StepPlan:
        prompts: list[tuple[str, Hashable, torch.Tensor]] = []

        def row(r: Request) -> RowPlan:
            key = (r.adapter.name, r.adapter.version)
            if key not in self._held:
                self._held.add(key)
                prompts.append((*key, r.adapter.prompt))
            return RowPlan(
                r.request_id, r.kind, key, list(r.prefill_ids), r.num_computed, r.continuations, r.params
            )

        plan = StepPlan(
            STEP,
            decode=[r.request_id for r in out.decode],
            prefill=[row(r) for r in out.prefill],
            chunks=[(row(r), n) for r, n in out.chunks],
            partial=frozenset(out.partial),
            tokens=tokens,
        )
        plan.prompts, plan.forget = prompts, self.take_forget()
        return plan

    def take_forget(self) -> list[str]:
        forget, self._forget = sorted(self._forget), set()
        return forget


class PlanReader:
    """A non-zero rank: `StepPlan` -> the `SchedulerOutput` its runner steps on."""

    def __init__(self):
        self.prompts: dict[tuple[str, Hashable], TaskPromptCopy] = {}

    def apply(self, plan: StepPlan) -> list[str]:
        """Take the plan's task changes; return the tasks whose prefix KV the rank must drop."""
        for name in plan.forget:
            self.prompts = {k: v for k, v in self.prompts.items() if k[0] != name}
        for name, version, prompt in plan.prompts:
            self.prompts[(name, version)] = TaskPromptCopy(name, version, prompt)
        return plan.forget

    def scheduler_output(self, plan: StepPlan) -> SchedulerOutput:
        def req(p: RowPlan) -> RowRequest:
            adapter = self.prompts[p.task]  # KeyError: rank 0 broke the one-version rule (a bug)
            return RowRequest(
                p.request_id, p.kind, adapter, p.prefill_ids, p.num_computed, p.continuations, p.params
            )

        return SchedulerOutput(
            prefill=[req(p) for p in plan.prefill],
            decode=[_Decoding(rid) for rid in plan.decode],
            chunks=[(req(p), n) for p, n in plan.chunks],
            partial=plan.partial,
        )


@dataclass
class _Decoding:
    """A running generation: the runner reads only its id."""

    request_id: str
