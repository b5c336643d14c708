"""Checkpoints that grow with what changed: a delta holds the rows touched since the checkpoint before.

A step touches the prompt rows of the tasks in its batch and nothing else (`tuner.prompts.optim`), so
after the first checkpoint of a fleet most rows never change between two checkpoints. A *delta*
checkpoint holds only what did: the bank rows and Adam moments of rows whose Adam step count moved,
the sampler positions of tasks that were drawn (the optimiser and the sampler keep the names they
touched, so finding them costs what changed, not a scan of the fleet), and the history's parts that
differ; the rest
(step, RNG and generator states, a method's shared part, the search's state) it holds whole, as they
are small. Every `full_every`-th checkpoint of a chain is a *full* snapshot (as every checkpoint was
before), and so is the final one.

Each checkpoint directory has a `chain.json`: its random id, and for a delta the step and id of the
checkpoint it is a delta of (its parent) and the directory that parent was written to. A checkpoint
without the file (written before deltas) is full. Reading a delta (`resolve`) walks back to its full
snapshot and applies the deltas in order, so what loads is bit for bit what a full snapshot of the
same moment holds. The parent is looked up beside the delta first, then where it was written (a
delta copied out by Ray Train still finds its base in the run directory); an id that does not match
means the parent was replaced, and reading refuses. Pruning keeps every checkpoint a kept one
depends on (`needed`).

What was written last, per optimiser (`Lineage`), tells the next save what changed since; loading a
checkpoint sets it, so a resumed run extends the chain it resumed from. It writes no files itself:
`tuner.checkpoint` does, atomically.
"""

from __future__ import annotations

import json
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHAIN = "chain.json"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class Lineage:
    """The checkpoint an optimiser's state was last saved to or loaded from."""

    step: int
    id: str
    since_full: int  # deltas between it and its full snapshot (0: it is full)
    history: Any = None  # the history JSON it holds (merged)


_LINEAGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimiser -> Lineage


def lineage_of(optimizer) -> Lineage | None:
    return _LINEAGES.get(optimizer)


def set_lineage(optimizer, lineage: Lineage) -> None:
    _LINEAGES[optimizer] = lineage


@dataclass
class Chain:
    """A checkpoint's `chain.json`."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    parent: int | None = None  # the step of the checkpoint this is a delta of (None: full)
    parent_id: str = ""
    parent_root: str = ""  # the directory the parent was written to
    since_full: int = 0
    history_from_parent: list[str] = field(default_factory=list)  # history keys equal to the parent's

    @property
    def full(self) -> bool:
        return self.parent is None

    @classmethod
    def read(cls, path: Path) -> Chain:
        """`path`'s chain record; a checkpoint without one (older releases) is a full snapshot."""
        f = path / CHAIN
        if not f.is_file():
            return cls(id="")
        return cls(**json.loads(f.read_text()))

    def to_json(self) -> dict:
        return dict(self.__dict__)


def delta_parent(lineage: Lineage | None, root: Path, step: int, full_every: int) -> Chain | None:
    """The chain record of a delta at `step` in `root` on top of what `lineage` last saved or loaded,
    or None where this checkpoint must be full: no lineage, `full_every` reached, the same step
    again, or the parent is no longer in `root` as it was."""
    if lineage is None or full_every <= 1 or lineage.since_full + 1 >= full_every or lineage.step >= step:
        return None
    parent = root / step_name(lineage.step)
    if not lineage.id or not (parent / "state.json").is_file() or Chain.read(parent).id != lineage.id:
        return None
    return Chain(
        parent=lineage.step,
        parent_id=lineage.id,
        parent_root=str(root.resolve()),
        since_full=lineage.since_full + 1,
    )


def changed_rows(optimizer) -> list[str]:
    """Rows stepped since the last checkpoint saved or loaded (`SparseRowAdam.touched`): the only rows a
    step changes. Read from the set the optimiser keeps, so finding them costs O(rows changed)."""
    return sorted(optimizer.touched)


def changed_positions(position: dict[str, int], sampler) -> dict[str, int]:
    """The sampler positions (`cursor` or `epoch`) of the tasks drawn since the last checkpoint
    (`MultiTaskSampler.drawn`): the only ones a draw moves."""
    return {t: position[t] for t in sorted(sampler.drawn)}


def mark_saved(optimizer, sampler) -> None:
    """Start counting what changes after a checkpoint was written or read."""
    optimizer.touched.clear()
    sampler.drawn.clear()


def history_delta(history: Any, before: Any) -> tuple[Any, list[str]]:
    """`history` less the top-level keys equal to `before`'s, and those keys (a history that is not
    a mapping is kept whole)."""
    if not isinstance(history, dict) or not isinstance(before, dict):
        return history, []
    same = [k for k, v in history.items() if k in before and before[k] == v]
    return {k: v for k, v in history.items() if k not in same}, same


# ------------------------------------------------------------------------------------ reading


def parent_path(path: Path, chain: Chain) -> Path:
    """Where the parent of delta `path` is: beside it, else in the directory it was written to."""
    name = step_name(chain.parent)
    for candidate in (path.parent / name, Path(chain.parent_root) / name):
        if (candidate / "state.json").is_file() and Chain.read(candidate).id == chain.parent_id:
            return candidate
    raise ValueError(
        f"it is a delta of {name}, which is missing or was replaced (looked beside it and in "
        f"{chain.parent_root})"
    )


def lineage_chain(path: Path) -> list[tuple[Path, Chain]]:
    """`path` and its ancestors back to its full snapshot, the full snapshot first."""
    out = [(path, Chain.read(path))]
    while not out[-1][1].full:
        p, c = out[-1]
        parent = parent_path(p, c)
        out.append((parent, Chain.read(parent)))
    return out[::-1]


def merge_state(base: dict, delta: dict, chain: Chain) -> dict:
    """The state JSON of a delta applied to the merged state JSON of its parent."""
    out = dict(delta)
    out["task_names"] = base["task_names"]  # a delta's are its changed rows
    out["adam_steps"] = {**base["adam_steps"], **delta["adam_steps"]}
    sampler = dict(delta["sampler"])
    for key in ("cursor", "epoch"):
        sampler[key] = {**base["sampler"][key], **delta["sampler"][key]}
    sampler["sizes"] = base["sampler"]["sizes"]
    out["sampler"] = sampler
    if chain.history_from_parent:
        out["history"] = {**delta["history"], **{k: base["history"][k] for k in chain.history_from_parent}}
    return out


def merge_tensors(
    base: dict[str, torch.Tensor], names: list[str], delta: dict[str, torch.Tensor], rows: list[str]
) -> dict[str, torch.Tensor]:
    """A delta's tensors applied to its parent's (merged): its bank rows `rows` written into the bank
    (ordered as `names`), everything else replaced."""
    out = {**base, **{k: v for k, v in delta.items() if k != "bank"}}
    if rows:
        index = {n: i for i, n in enumerate(names)}
        bank = base["bank"].clone()
        bank.index_copy_(0, torch.tensor([index[n] for n in rows]), delta["bank"].to(bank.dtype))
        out["bank"] = bank
    return out


def needed(checkpoints: list[Path], keep: list[Path]) -> set[Path]:
    """`keep` and every checkpoint among `checkpoints` one of them is a delta of, directly or not."""
    by_name = {p.name: p for p in checkpoints}
    out: set[Path] = set()
    todo = list(keep)
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.add(p)
        try:
            chain = Chain.read(p)
        except (OSError, ValueError, TypeError):
            continue  # a damaged record: nothing to follow
        if not chain.full and step_name(chain.parent) in by_name:
            todo.append(by_name[step_name(chain.parent)])
    return out
