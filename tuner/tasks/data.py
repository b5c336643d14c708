"""From task specs to tokenised examples, and the multi-task sampler that mixes them into steps.

`TaskData.load` reads and tokenises a task's train and eval splits. `MultiTaskSampler` decides,
for each optimiser step, which examples of which tasks form the global batch: tasks are drawn
per slot with proportional, temperature-scaled (p ~ n^(1/T)) or uniform probabilities, and each
task walks through its own reshuffled-per-epoch order. The sampler's whole state is a few
integers and a generator state, saved in every checkpoint so a resumed run draws exactly the
batches an uninterrupted one would have.

A hyperparameter search holds out a slice of each task's train split to rank its variants on
(`MultiTaskSampler.hold_out`): the last examples of the task's first-epoch order, which training then
skips. So the held-out slice changes no draw before them: a search run trains on exactly the examples
(and task mix) that the same job without a search trains on, for the first `len(train) - held out`
draws of each task, and its scores differ from the plain job's only by what the search chose.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

import torch

from tuner.tasks.batching import TokenizedExample, input_room
from tuner.tasks.readers import read_rows
from tuner.tasks.spec import TaskExample, TaskSpec, build_examples, task_prefix


def tokenize(examples: list[TaskExample], tokenizer, eos: bool = False) -> list[TokenizedExample]:
    """Tokenise prompt and target separately (the target must start on a token boundary).

    `eos` ends every target with the tokenizer's end-of-sequence token: a generated answer's
    default stop, which a tuned prompt thereby learns to emit.
    """
    if not examples:
        return []
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False).input_ids
    targets = tokenizer([e.target for e in examples], add_special_tokens=False).input_ids
    out = []
    for i, (e, p, t) in enumerate(zip(examples, prompts, targets)):
        if not t:
            raise ValueError(f"task {e.task}: empty target for example {i}")
        if eos and tokenizer.eos_token_id is not None:
            t = [*t, tokenizer.eos_token_id]
        out.append(TokenizedExample(e.task, p, t, e.label, uid=i))
    return out


@dataclass
class TaskData:
    spec: TaskSpec
    prefix: str  # description + demonstrations, identical for every example of the task
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    eval_text: list[TaskExample]  # the eval examples as text (references, gold tags, reports)
    train_text: list[TaskExample] = field(default_factory=list)  # the train examples as text

    def heldout_count(self, n: int, fraction: float) -> int:
        """How many train examples a search holds out: min(n, fraction of the train split)."""
        k = min(n, int(len(self.train) * fraction))
        if k < 1 or k >= len(self.train):
            raise ValueError(
                f"task {self.spec.name}: {len(self.train)} train examples are too few for a held-out slice"
            )
        return k

    def fitting(self, num_virtual: int, max_len: int) -> tuple[TaskData, int]:
        """This task without the train examples whose target leaves no input room in a `max_len` segment
        after `num_virtual` prompt tokens (`input_room`: a target is never cut, so such an example could only
        fail the step that draws it), and how many were left out. Eval examples are cut to fit as they are."""
        keep = [i for i, e in enumerate(self.train) if input_room(e, num_virtual, max_len) >= 1]
        if len(keep) == len(self.train):
            return self, 0
        texts = [self.train_text[i] for i in keep] if self.train_text else []
        kept = replace(self, train=[self.train[i] for i in keep], train_text=texts)
        return kept, len(self.train) - len(keep)

    def heldout_view(self, indices: list[int]) -> TaskData:
        """These train examples as the *eval* split of a view (a search's held-out slice, in the given
        order). The examples stay in `train`; `MultiTaskSampler.hold_out` keeps training off them."""
        texts = self.train_text or [None] * len(self.train)
        return TaskData(
            self.spec, self.prefix, [], [self.train[i] for i in indices], [texts[i] for i in indices]
        )

    @classmethod
    def load(
        cls,
        spec: TaskSpec,
        tokenizer,
        *,
        max_train: int = 0,
        max_eval: int = 0,
        seed: int = 0,
        need_train: bool = True,
    ) -> TaskData:
        prefix = (
            task_prefix(spec, read_rows(spec, "train"), seed)
            if spec.few_shot
            else task_prefix(spec, [], seed)
        )
        train_text = build_examples(spec, "train", max_train, seed, prefix) if need_train else []
        eval_text = build_examples(spec, "eval", max_eval, seed, prefix) if spec.data.eval else []
        eos = spec.task_kind.eos_target  # answers of free length end with end-of-sequence
        return cls(
            spec,
            prefix,
            tokenize(train_text, tokenizer, eos),
            tokenize(eval_text, tokenizer, eos),
            eval_text,
            train_text,
        )


class MultiTaskSampler:
    """Draws the global batch (a list of (task, example index)) for each optimiser step."""

    def __init__(
        self,
        sizes: dict[str, int],
        batch_size: int,
        mixing: str = "temperature",
        temperature: float = 2.0,
        seed: int = 0,
    ):
        if not sizes or any(n <= 0 for n in sizes.values()):
            raise ValueError(f"every task needs train examples: {sizes}")
        self.tasks = list(sizes)
        self.sizes = dict(sizes)
        self.batch_size = batch_size
        n = torch.tensor([sizes[t] for t in self.tasks], dtype=torch.float64)
        if mixing == "uniform":
            w = torch.ones_like(n)
        elif mixing == "proportional":
            w = n
        else:
            w = n ** (1.0 / temperature)
        self.probs = (w / w.sum()).float()
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)
        self.step = 0
        self.cursor = {t: 0 for t in self.tasks}
        self.epoch = {t: 0 for t in self.tasks}
        # task -> train indices never drawn (a search's held-out slice)
        self.held_out: dict[str, set[int]] = {}
        self.drawn: set[str] = set()  # tasks drawn since the last checkpoint (`tuner.checkpoint_chain`)
        self._orders: dict[str, torch.Tensor] = {}

    def hold_out(self, task: str, k: int) -> list[int]:
        """Keep training off `k` of `task`'s examples, and return them: the last k of its first-epoch
        order (so a random sample, and any prefix of it too). Draws before them are the ones the
        sampler makes without a held-out slice. Mixing weights stay those of the whole split."""
        if self.step:
            raise RuntimeError("hold_out() must come before the first draw")
        if not 0 < k < self.sizes[task]:
            raise ValueError(f"task {task}: cannot hold out {k} of {self.sizes[task]} train examples")
        order = self._order(task)  # epoch 0: nothing has been drawn yet
        picked = order[self.sizes[task] - k :].tolist()
        self.held_out[task] = set(picked)
        return picked

    def _order(self, task: str) -> torch.Tensor:
        key = f"{task}/{self.epoch[task]}"
        if key not in self._orders:
            g = keyed_generator(self.seed, key)
            self._orders = {key: torch.randperm(self.sizes[task], generator=g)}  # keep only the current epoch
        return self._orders[key]

    def next_batch(self) -> list[tuple[str, int]]:
        picks = torch.multinomial(self.probs, self.batch_size, replacement=True, generator=self.gen).tolist()
        batch = []
        for k in picks:
            t = self.tasks[k]
            self.drawn.add(t)
            skip = self.held_out.get(t, ())
            while True:
                i = int(self._order(t)[self.cursor[t]])
                self.cursor[t] += 1
                if self.cursor[t] == self.sizes[t]:
                    self.cursor[t] = 0
                    self.epoch[t] += 1
                if i not in skip:
                    break
            batch.append((t, i))
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "cursor": dict(self.cursor),
            "epoch": dict(self.epoch),
            "gen": self.gen.get_state(),
            "sizes": dict(self.sizes),
            "held_out": {t: len(s) for t, s in sorted(self.held_out.items())},
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd["sizes"] != self.sizes:
            raise ValueError("the task data changed since the checkpoint (train split sizes differ)")
        if sd.get("held_out", {}) != {t: len(s) for t, s in sorted(self.held_out.items())}:
            raise ValueError("the search's held-out slices changed since the checkpoint (search.heldout_*)")
        self.step, self.cursor, self.epoch = sd["step"], dict(sd["cursor"]), dict(sd["epoch"])
        self.gen.set_state(sd["gen"])
        self._orders = {}


def keyed_generator(seed: int, key: str) -> torch.Generator:
    """A random stream of its own for `key` under `seed` (a task's epoch order, a task's initial prompt).

    crc32, not hash(): str hashes differ between processes, and every rank must agree.
    """
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}".encode()))
