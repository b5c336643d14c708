"""The prompt bank: one soft prompt (`num_virtual_tokens x hidden`) per registered task.

The table is an fp32 master copy held outside autograd. A step works on the rows of the tasks
in its batch only: `gather(task_rows)` returns a small leaf tensor to train, whose `.grad`
after backward is exactly those tasks' prompt gradients. Nothing in a step touches the rows of
tasks that are not in the batch, so 10,000 registered tasks cost a step what 10 do. The table
can live on the GPU (`to`): a step's gather, update and scatter then stay on the device, and only
a checkpoint save (`tuner.checkpoint`) copies it to the host.

Initialisation follows Lester et al. (2021): random, sampled vocabulary embeddings, a text, or
the task's class-label words (then vocabulary). Reads of the (possibly ZeRO-3 sharded) embedding
matrix go through `tuner.model.zero.gathered`. Each task draws its random numbers from its own stream,
seeded by (seed, task name): its initial prompt does not depend on which other tasks share the job
or in what order, and a search's variants of one task that share an initialisation start from the
same prompt as each other and as the task without a search (`streams`), so they differ only in
what the search varies.
"""

from __future__ import annotations

import torch

from tuner.model.zero import gathered
from tuner.tasks.data import keyed_generator


class PromptBank:
    """A `[num_tasks, num_virtual_tokens, hidden]` fp32 table addressed by task name."""

    def __init__(self, task_names: list[str], num_virtual_tokens: int, hidden_size: int):
        if len(set(task_names)) != len(task_names):
            raise ValueError("task names must be unique")
        self.task_names = list(task_names)
        self.index = {name: i for i, name in enumerate(self.task_names)}
        self.num_virtual_tokens = num_virtual_tokens
        self.hidden_size = hidden_size
        self.weight = torch.zeros(len(task_names), num_virtual_tokens, hidden_size, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.task_names)

    def rows_of(self, names: list[str]) -> torch.Tensor:
        try:
            return torch.tensor([self.index[n] for n in names], dtype=torch.long)
        except KeyError as e:
            raise KeyError(f"task {e.args[0]!r} is not registered in the prompt bank") from None

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def to(self, device: torch.device | str) -> PromptBank:
        """Move the table to `device` (in place; returns self)."""
        self.weight = self.weight.to(device)
        return self

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """A trainable copy of `rows` (a leaf tensor on the bank's device); write it back with `scatter_`."""
        return self.weight.index_select(0, rows.to(self.device)).clone().requires_grad_(True)

    def scatter_(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        self.weight.index_copy_(0, rows.to(self.device), values.detach().to(self.device, self.weight.dtype))

    def prompt(self, name: str) -> torch.Tensor:
        return self.weight[self.index[name]]

    def set_prompt(self, name: str, value: torch.Tensor) -> None:
        self.weight[self.index[name]] = value.to(self.weight.dtype)

    def load_state_dict(self, state: dict) -> None:
        """Load rows by task name (tasks absent from `state` keep their current values)."""
        for i, name in enumerate(state["task_names"]):
            if name in self.index:
                self.weight[self.index[name]] = state["weight"][i].to(self.device)


# ------------------------------------------------------------------------------------ initialisation


def init_prompts(
    bank: PromptBank,
    embeddings: torch.nn.Module,
    tokenizer,
    method: str,
    *,
    label_words: dict[str, list[str]] | None = None,
    text: str = "",
    std: float = 0.02,
    seed: int = 0,
    vocab_limit: int = 5000,
    streams: dict[str, str] | None = None,
) -> None:
    """Initialise every task's prompt in `bank`.

    Args:
        embeddings: the backbone's input embedding module (may be ZeRO-3 partitioned).
        method: random | vocab | text | class_labels.
        label_words: task name -> verbaliser words (used by class_labels; generation tasks fall back to vocab).
        vocab_limit: vocab init samples from the first `vocab_limit` token ids (BPE vocabularies are
            roughly frequency-ordered, and Lester et al. sample from the most common tokens).
        streams: row -> the name whose random stream it draws (default: its own; a search's variant
            rows draw their task's).
    """
    streams = streams or {}
    P = bank.num_virtual_tokens
    if method == "random":
        for name in bank.task_names:
            gen = keyed_generator(seed, streams.get(name, name))
            bank.set_prompt(name, torch.randn(P, bank.hidden_size, generator=gen) * std)
        return
    with gathered(embeddings.weight):
        table = embeddings.weight.detach().float().cpu()
    vocab = min(vocab_limit, table.shape[0])
    text_ids = tokenizer(text, add_special_tokens=False).input_ids if method == "text" else []
    for name in bank.task_names:
        ids: list[int] = []
        if method == "text":
            ids = (text_ids * (P // max(len(text_ids), 1) + 1))[:P]
        elif method == "class_labels" and label_words and label_words.get(name):
            for word in label_words[name]:
                ids += tokenizer(word, add_special_tokens=False).input_ids
            ids = ids[:P]
        gen = keyed_generator(seed, streams.get(name, name))
        fill = torch.randint(0, vocab, (P - len(ids),), generator=gen).tolist()
        bank.set_prompt(name, table[torch.tensor(ids + fill, dtype=torch.long)])
