"""Adam over prompt-bank rows, keyed by task, plus the learning-rate schedule.

`SparseRowAdam.step(names, rows, grads)` updates only the tasks present in the batch: their
moments live in a dict keyed by task name and are created on first use, and each task keeps its
own step count for bias correction (a task trained in a mix sees the same Adam as trained
alone). A step costs O(tasks in the batch), whatever the number of registered tasks. Each task's
gradient is clipped by its own norm, so one task's outlier batch cannot shrink another's update.
`lr`, `weight_decay` and `grad_clip` may also be given per row for one step (a sequence, one
value per name): in-batch hyperparameter variants (`tuner.search.state`) train rows with their own
settings in one step, at the same O(rows in the batch) cost.
State is keyed by task name, not rank or position: checkpoints resume on any number of ranks.
The moments live on the device of the values they update (a CUDA step never reads them back to
the host); state loaded from a checkpoint moves there on the task's next step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class SparseRowAdam:
    def __init__(
        self,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_clip: float = 0.0,
    ):
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.weight_decay, self.grad_clip = weight_decay, grad_clip
        self.state: dict[str, dict] = {}  # task -> {"step": int, "exp_avg": T, "exp_avg_sq": T}
        self.touched: set[str] = set()  # rows stepped since the last checkpoint (`tuner.checkpoint_chain`)

    @torch.no_grad()
    def step(
        self,
        names: list[str],
        values: torch.Tensor,
        grads: torch.Tensor,
        lr: float | Sequence[float] | None = None,
        weight_decay: float | Sequence[float] | None = None,
        grad_clip: float | Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Return updated `values` ([U, P, H]) for tasks `names` given their gradients.

        `lr`, `weight_decay` and `grad_clip` default to the optimiser's own; a sequence gives each
        row its own value (in the order of `names`).
        """
        lr = self.lr if lr is None else lr
        weight_decay = self.weight_decay if weight_decay is None else weight_decay
        grad_clip = self.grad_clip if grad_clip is None else grad_clip
        b1, b2 = self.betas
        grads = grads.float()
        if isinstance(grad_clip, Sequence):
            clip = torch.tensor(grad_clip, dtype=torch.float32).to(grads.device)
            norms = grads.flatten(1).norm(dim=1).clamp(min=1e-12)
            scale = torch.where(clip > 0, (clip / norms).clamp(max=1.0), torch.ones_like(norms))
            grads = grads * scale[:, None, None]
        elif grad_clip > 0:
            norms = grads.flatten(1).norm(dim=1).clamp(min=1e-12)
            grads = grads * (grad_clip / norms).clamp(max=1.0)[:, None, None]
        for name in names:
            if name not in self.state:
                self.state[name] = {
                    "step": 0,
                    "exp_avg": torch.zeros_like(values[0], dtype=torch.float32),
                    "exp_avg_sq": torch.zeros_like(values[0], dtype=torch.float32),
                }
        states = [self.state[n] for n in names]
        dev = values.device
        m = torch.stack([s["exp_avg"] for s in states]).to(dev).mul_(b1).add_(grads, alpha=1 - b1)
        v = (
            torch.stack([s["exp_avg_sq"] for s in states])
            .to(dev)
            .mul_(b2)
            .addcmul_(grads, grads, value=1 - b2)
        )
        # Bias corrections from the host-side step counts: one small upload, no read-back.
        steps = torch.tensor([s["step"] + 1 for s in states], dtype=torch.float64)
        corr = torch.stack([1 - b1**steps, 1 - b2**steps]).float()
        corr = corr.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else corr
        bc1 = corr[0][:, None, None]
        bc2 = corr[1][:, None, None]
        if isinstance(lr, Sequence) or isinstance(weight_decay, Sequence):
            n = len(names)
            lr_t = _per_row(lr, n, dev)
            decay = 1 - lr_t * _per_row(weight_decay, n, dev)
            out = values.detach().float() * decay
            out = out - lr_t * (m / bc1) / ((v / bc2).sqrt() + self.eps)
        else:
            out = values.detach().float() * (1 - lr * weight_decay)
            out = out - lr * (m / bc1) / ((v / bc2).sqrt() + self.eps)
        self.touched.update(names)
        for i, s in enumerate(states):
            s["step"] += 1
            s["exp_avg"], s["exp_avg_sq"] = m[i].clone(), v[i].clone()
        return out

    def state_dict(self) -> dict:
        """Task -> {"step", "exp_avg", "exp_avg_sq"}, moments copied to the host."""
        return {
            "state": {
                k: {f: x.cpu() if torch.is_tensor(x) else x for f, x in v.items()}
                for k, v in self.state.items()
            }
        }

    def load_state_dict(self, sd: dict) -> None:
        self.state = {k: dict(v) for k, v in sd["state"].items()}


def _per_row(value: float | Sequence[float], n: int, device) -> torch.Tensor:
    """A scalar or one value per row as a [n, 1, 1] tensor that broadcasts over a row's prompt."""
    values = list(value) if isinstance(value, Sequence) else [value] * n
    if len(values) != n:
        raise ValueError(f"expected {n} per-row values, got {len(values)}")
    return torch.tensor(values, dtype=torch.float32).to(device)[:, None, None]


def lr_at(step: int, peak: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to `peak`, then constant, linear-to-zero, or cosine to 10% of peak."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return peak
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return peak * (1 - frac)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
