"""Mixed-task batches: many tasks' examples in one batch, optionally packed into rows.

Each example becomes one *segment*: `[input tokens][target tokens minus the last]`, preceded by
its task's `P` virtual-token slots. The slots hold a placeholder id; `tuner.model.prompt_lm` writes the
task prompt there. Two layouts:

* **shared prompts** (default; SDPA and eager attention): a packed row holds *groups*, one per
  task present in the row: `[P virtual slots][segment][segment]...`. Every segment of the group
  attends to the group's prompt and, causally, to itself; never to the other segments. A soft
  prompt at positions `0..P-1` under causal attention depends on nothing that follows it, so one
  copy serves all the group's segments exactly: each segment's loss and gradient are those of
  `[prompt][segment]` run alone, while the prompt's positions are computed once per group
  instead of once per example. Segment positions start at `P`. Attention follows the layout
  (`tuner.model.span_attention`, or the dense `MultiTaskBatch.attention_mask()`).
* **one prompt per segment** (`share_prompts=False`; FlashAttention-2 varlen): every segment
  carries its own prompt copy, positions restart at 0 at each prompt, so transformers can turn
  restarting positions into a block-diagonal causal mask or varlen `cu_seqlens`.

Row tails are filled with padding that attends only to itself and carries no targets. Targets
are kept as flat coordinates (row, col, label id, segment), so the loss can gather the few
hidden states it needs instead of projecting every position onto the vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class TokenizedExample:
    """One example, tokenised. `task` names the prompt that goes in front of it."""

    task: str
    input_ids: list[int]
    target_ids: list[int]
    label: str | None = None  # classification: gold label key
    uid: int = 0  # position in its task's split (for reports and determinism checks)


@dataclass
class MultiTaskBatch:
    """A batch of segments from any mix of tasks.

    Shapes: R rows of length L, S segments, G prompt copies, N target tokens.
    """

    input_ids: torch.Tensor  # [R, L] token ids (placeholder at virtual-token slots and padding)
    position_ids: torch.Tensor  # [R, L]
    seg_row: torch.Tensor  # [S] row holding each segment
    seg_start: torch.Tensor  # [S] column of its first token (after its prompt copy)
    seg_len: torch.Tensor  # [S] its length
    seg_task: torch.Tensor  # [S] prompt-bank row of each segment's task
    seg_prompt: torch.Tensor  # [S] the prompt copy it attends to
    prompt_row: torch.Tensor  # [G] row of each prompt copy
    prompt_start: torch.Tensor  # [G] column of its first virtual token
    prompt_task: torch.Tensor  # [G] prompt-bank row it holds
    target_row: torch.Tensor  # [N] row of the position that predicts each target token
    target_col: torch.Tensor  # [N] column of that position
    target_ids: torch.Tensor  # [N] the target token ids
    target_seg: torch.Tensor  # [N] segment each target token belongs to
    shared_prompts: bool  # a prompt copy serves several segments: needs span attention or `attention_mask()`
    num_virtual_tokens: int
    num_text_tokens: int  # real (non-virtual, non-padding) tokens: input + target
    # The longest segment, known on the host when the batch is built: code that sizes a tensor by it
    # on the device need not read it back (a host synchronisation).
    max_seg_len: int = 0
    # The attention plan of `attn_kernel` (`tuner.model.attention.host_layout`), built ahead on the
    # host with the batch and moved with it; None: the forward builds it.
    attn_plan: Any = None
    attn_kernel: str | None = None

    @property
    def num_segments(self) -> int:
        return int(self.seg_row.numel())

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_row.numel())

    def spans(self) -> list[tuple[int, int, int, int]]:
        """Every block that attends causally within itself, as (row, start, length, prefix start).

        Prompt copies have no prefix (-1); a segment's prefix is its prompt copy (P positions).
        Padding is in no span.
        """
        P = self.num_virtual_tokens
        prompt_start = self.prompt_start.tolist()
        spans = [(row, start, P, -1) for row, start in zip(self.prompt_row.tolist(), prompt_start) if P]
        segs = zip(
            self.seg_row.tolist(), self.seg_start.tolist(), self.seg_len.tolist(), self.seg_prompt.tolist()
        )
        spans += [(row, start, n, prompt_start[prompt] if P else -1) for row, start, n, prompt in segs]
        return spans

    def attention_mask(self) -> torch.Tensor:
        """Dense [R, 1, L, L] boolean mask (True = attend) of this layout; padding sees itself."""
        R, L = self.input_ids.shape
        mask = torch.eye(L, dtype=torch.bool).repeat(R, 1, 1)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        for row, start, n, pre in self.spans():
            mask[row, start : start + n, start : start + n] = causal[:n, :n]
            if pre >= 0:
                mask[row, start : start + n, pre : pre + self.num_virtual_tokens] = True
        return mask[:, None].to(self.input_ids.device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultiTaskBatch:
        """The batch (and its attention plan) on `device`; `non_blocking` from pinned memory."""
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> MultiTaskBatch:
        """The batch in page-locked host memory, so copies to a CUDA device can be asynchronous."""
        return map_tensors(self, lambda t: t.pin_memory())


def map_tensors(obj, fn):
    """`obj` with `fn` applied to every tensor in it (tensors, dataclasses, lists and tuples of them)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: map_tensors(getattr(obj, f.name), fn) for f in fields(obj)}
        )
    if isinstance(obj, list | tuple):
        return type(obj)(map_tensors(x, fn) for x in obj)
    return obj


def input_room(ex: TokenizedExample, num_virtual: int, max_len: int) -> int:
    """The input tokens `ex` keeps in a `max_len` segment after `num_virtual` prompt tokens: its target is
    never cut (its last token is only predicted, not read), so a long target leaves less; < 1: none."""
    return max_len - num_virtual - max(len(ex.target_ids) - 1, 0)


def segment_layout(ex: TokenizedExample, num_virtual: int, max_len: int) -> tuple[list[int], list[int]]:
    """Return (input part, full target) for `ex`, cutting the input from the left to fit `max_len`."""
    budget = input_room(ex, num_virtual, max_len)
    if budget < 1:
        raise ValueError(f"max_seq_len={max_len} leaves no room for the input of a {ex.task} example")
    return ex.input_ids[-budget:], ex.target_ids


@dataclass
class _Row:
    members: list[int] = field(default_factory=list)  # segment indices
    tasks: set[int] = field(default_factory=set)
    fill: int = 0  # positions used, prompt copies included


def _pack(
    lengths: list[int], tasks: list[int], num_virtual: int, capacity: int, share: bool
) -> list[list[int]]:
    """Pack segments into as few, as evenly filled rows as possible: segment indices per row.

    A segment costs its length, plus `num_virtual` unless (sharing) its row already holds its task.
    First-fit decreasing finds how many rows are needed; a longest-first balancing pass (each
    segment to the row it leaves shortest) then evens the rows out, since every row is padded to
    the longest. The cheaper of the layouts (rows x longest row) wins.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def cost(row: _Row, i: int) -> int:
        return lengths[i] + (0 if share and tasks[i] in row.tasks else num_virtual)

    def add(row: _Row, i: int) -> None:
        row.fill += cost(row, i)
        row.members.append(i)
        row.tasks.add(tasks[i])

    def first_fit() -> list[_Row]:
        rows: list[_Row] = []
        for i in order:
            fits = [row for row in rows if row.fill + cost(row, i) <= capacity]
            fits.sort(key=lambda row: cost(row, i) > lengths[i])  # rows already holding the task first
            if not fits:
                rows.append(_Row())
                fits = rows[-1:]
            add(fits[0], i)
        return rows

    def balanced(num_rows: int) -> list[_Row] | None:
        rows = [_Row() for _ in range(num_rows)]
        for i in order:
            row = min(rows, key=lambda row: row.fill + cost(row, i))
            if row.fill + cost(row, i) > capacity:
                return None
            add(row, i)
        return rows

    def size(rows: list[_Row]) -> int:
        return len(rows) * max(row.fill for row in rows)

    candidates = [first_fit()]
    candidates += [balanced(len(candidates[0])), balanced(len(candidates[0]) + 1)]
    best = min((rows for rows in candidates if rows), key=size)
    return [row.members for row in best]


def collate(
    examples: list[TokenizedExample],
    task_rows: dict[str, int],
    num_virtual: int,
    *,
    max_len: int,
    pad_id: int,
    packing: bool = True,
    share_prompts: bool = True,
    row_len: int = 0,
) -> MultiTaskBatch:
    """Build a `MultiTaskBatch`.

    Args:
        task_rows: task name -> prompt-bank row.
        max_len: longest `[prompt][segment]` (inputs are cut from the left to fit).
        packing: pack segments into rows (see `_pack`); else one segment per row.
        share_prompts: segments of one task in a row share a prompt copy (needs the attention
            mask this builds; SDPA and eager attention only).
        row_len: packed row capacity in positions (0 or less than `max_len`: `max_len`). Longer
            rows share prompt copies among more segments and pad less; span attention
            (`tuner.model.span_attention`) makes their length free, a dense mask costs L x L.
    """
    segs = _segments(examples, task_rows, num_virtual, max_len)
    share = share_prompts and num_virtual > 0
    if packing:
        capacity = max(row_len or max_len, max_len)
        rows = _pack([len(s[0]) for s in segs], [s[3] for s in segs], num_virtual, capacity, share)
    else:
        rows = [[i] for i in range(len(segs))]
    return _lay_out(_groups(rows, segs, share), segs, num_virtual, pad_id)


# A segment as laid out: (its tokens: input + target[:-1], input length, target ids, prompt-bank row)
_Segment = tuple[list[int], int, list[int], int]


def _segments(
    examples: list[TokenizedExample], task_rows: dict[str, int], num_virtual: int, max_len: int
) -> list[_Segment]:
    segs = []
    for ex in examples:
        inp, tgt = segment_layout(ex, num_virtual, max_len)
        segs.append((inp + tgt[:-1], len(inp), tgt, task_rows[ex.task]))
    return segs


def _groups(rows: list[list[int]], segs: list[_Segment], share: bool) -> list[list[list[int]]]:
    """Each row's groups, laid out in order as [prompt copy][segment][segment]... (one segment per
    group unless sharing)."""
    layouts = []
    for members in rows:
        groups: dict[int, list[int]] = {}
        for i in members:
            groups.setdefault(segs[i][3] if share else -1 - i, []).append(i)
        layouts.append(list(groups.values()))
    return layouts


def _lay_out(
    layouts: list[list[list[int]]], segs: list[_Segment], num_virtual: int, pad_id: int
) -> MultiTaskBatch:
    """The batch's tensors for rows of prompt-copy groups (`_groups`)."""
    L = max(sum(num_virtual + sum(len(segs[i][0]) for i in g) for g in groups) for groups in layouts)
    R, S = len(layouts), len(segs)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    seg = {k: torch.zeros(S, dtype=torch.long) for k in ("row", "start", "len", "task", "prompt")}
    prompt: dict[str, list[int]] = {"row": [], "start": [], "task": []}
    target: dict[str, list[int]] = {"row": [], "col": [], "ids": [], "seg": []}
    for r, groups in enumerate(layouts):
        col = 0
        for group in groups:
            task_row = segs[group[0]][3]
            for k, v in (("row", r), ("start", col), ("task", task_row)):
                prompt[k].append(v)
            position_ids[r, col : col + num_virtual] = torch.arange(num_virtual)
            col += num_virtual
            for i in group:
                tokens, n_inp, tgt, _ = segs[i]
                n = len(tokens)
                input_ids[r, col : col + n] = torch.tensor(tokens, dtype=torch.long)
                position_ids[r, col : col + n] = torch.arange(num_virtual, num_virtual + n)
                for k, v in (("row", r), ("start", col), ("len", n), ("task", task_row)):
                    seg[k][i] = v
                seg["prompt"][i] = len(prompt["row"]) - 1
                first = col + n_inp - 1  # this position predicts the first target token
                target["row"] += [r] * len(tgt)
                target["col"] += range(first, first + len(tgt))
                target["ids"] += tgt
                target["seg"] += [i] * len(tgt)
                col += n
        position_ids[r, col:] = torch.arange(L - col)  # padding tail: its own span, no targets

    def long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return MultiTaskBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        **{f"seg_{k}": v for k, v in seg.items()},
        **{f"prompt_{k}": long(v) for k, v in prompt.items()},
        **{f"target_{k}": long(v) for k, v in target.items()},
        shared_prompts=len(prompt["row"]) < S,
        num_virtual_tokens=num_virtual,
        num_text_tokens=sum(len(s[0]) + 1 for s in segs),
        max_seg_len=max((len(s[0]) for s in segs), default=0),
    )
