"""Mixed-task batches: many tasks' examples in one batch, optionally packed into rows.

Each example becomes one *segment*: `[P virtual tokens][input tokens][target tokens minus the
last]`. The virtual-token slots hold a placeholder id; `tuner.model` writes the segment's task
prompt there. Position ids restart at 0 for every segment, and with no 2-D attention mask
transformers turns restarting positions into a block-diagonal causal mask (SDPA / eager) or
varlen `cu_seqlens` (FlashAttention-2), so packed segments never attend to each other. Row
tails are filled with a padding segment that carries no targets.

Targets are kept as flat coordinates (row, col, label id, segment), so the loss can gather the
few hidden states it needs instead of projecting every position onto the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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

    Shapes: R rows of length L, S segments, N target tokens.
    """

    input_ids: torch.Tensor  # [R, L] token ids (placeholder at virtual-token slots and padding)
    position_ids: torch.Tensor  # [R, L] restart at 0 at each segment (and at the padding tail)
    seg_row: torch.Tensor  # [S] row holding each segment
    seg_start: torch.Tensor  # [S] column where the segment (its first virtual token) starts
    seg_task: torch.Tensor  # [S] prompt-bank row of each segment's task
    target_row: torch.Tensor  # [N] row of the position that predicts each target token
    target_col: torch.Tensor  # [N] column of that position
    target_ids: torch.Tensor  # [N] the target token ids
    target_seg: torch.Tensor  # [N] segment each target token belongs to
    num_virtual_tokens: int
    num_text_tokens: int  # real (non-virtual, non-padding) tokens: input + target

    @property
    def num_segments(self) -> int:
        return int(self.seg_row.numel())

    def to(self, device: torch.device | str) -> MultiTaskBatch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return MultiTaskBatch(
            **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        )


def segment_layout(ex: TokenizedExample, num_virtual: int, max_len: int) -> tuple[list[int], list[int]]:
    """Return (input part, full target) for `ex`, cutting the input from the left to fit `max_len`."""
    budget = max_len - num_virtual - max(len(ex.target_ids) - 1, 0)
    if budget < 1:
        raise ValueError(f"max_seq_len={max_len} leaves no room for the input of a {ex.task} example")
    return ex.input_ids[-budget:], ex.target_ids


def collate(
    examples: list[TokenizedExample],
    task_rows: dict[str, int],
    num_virtual: int,
    *,
    max_len: int,
    pad_id: int,
    packing: bool = True,
) -> MultiTaskBatch:
    """Build a `MultiTaskBatch`.

    Args:
        task_rows: task name -> prompt-bank row.
        max_len: longest segment; with packing also the row capacity.
        packing: first-fit-decreasing packing of segments into rows; else one segment per row.
    """
    segs = []
    for ex in examples:
        inp, tgt = segment_layout(ex, num_virtual, max_len)
        tokens = [pad_id] * num_virtual + inp + tgt[:-1]
        segs.append((tokens, len(inp), tgt, task_rows[ex.task]))

    order = sorted(range(len(segs)), key=lambda i: -len(segs[i][0])) if packing else range(len(segs))
    rows: list[list[int]] = []  # segment indices per row
    fill: list[int] = []
    for i in order:
        n = len(segs[i][0])
        for r in range(len(rows)) if packing else ():
            if fill[r] + n <= max_len:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)

    R, L = len(rows), max(fill)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    S = len(segs)
    seg_row, seg_start, seg_task = (
        torch.zeros(S, dtype=torch.long),
        torch.zeros(S, dtype=torch.long),
        torch.zeros(S, dtype=torch.long),
    )
    t_row, t_col, t_ids, t_seg = [], [], [], []
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            tokens, n_inp, tgt, task_row = segs[i]
            n = len(tokens)
            input_ids[r, col : col + n] = torch.tensor(tokens)
            position_ids[r, col : col + n] = torch.arange(n)
            seg_row[i], seg_start[i], seg_task[i] = r, col, task_row
            first = col + num_virtual + n_inp - 1  # this position predicts the first target token
            t_row += [r] * len(tgt)
            t_col += range(first, first + len(tgt))
            t_ids += tgt
            t_seg += [i] * len(tgt)
            col += n
        position_ids[r, col:] = torch.arange(L - col)  # padding tail: its own segment, no targets
    return MultiTaskBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        seg_row=seg_row,
        seg_start=seg_start,
        seg_task=seg_task,
        target_row=torch.tensor(t_row, dtype=torch.long),
        target_col=torch.tensor(t_col, dtype=torch.long),
        target_ids=torch.tensor(t_ids, dtype=torch.long),
        target_seg=torch.tensor(t_seg, dtype=torch.long),
        num_virtual_tokens=num_virtual,
        num_text_tokens=sum(len(s[0]) - num_virtual + 1 for s in segs),
    )
