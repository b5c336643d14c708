"""Guard transfer initialisation: keep a task's transferred start only if it is no worse than its own.

`prompt.init=transfer` starts a new task from the source prompt with the lowest zero-shot loss on a
few of its training examples (`tuner.prompts.continual.choose_sources`). That ranks sources against
each other, never against the task's own start (its class-label initialisation), and a low
zero-shot loss does not mean a good place to train from: on the shared tasks the transferred start
trained to -2.2 points on CB against a plain prompt (BENCHMARKS.md, issue 14). So before training,
`check_transfer` races the two starts over the first `steps` steps of training itself:

  * each new task's training examples are cut into a fit part and a held-out slice (its last
    `heldout` examples, at most a quarter of them);
  * from each start, `steps` Adam steps (the job's optimiser settings and the first `steps` of its
    learning-rate schedule) on batches of the fit part, the same batches for both starts;
  * each result's mean target loss (the training loss) on the held-out slice; the transferred start
    is kept when its loss is not higher, otherwise the task falls back to its own start.

Only the *start* is chosen: the bank row is reset to the winning start, so the job's training budget
and its draws are those of an unguarded run, and the probe costs 2 x `steps` small forward/backward
passes per new task at set-up. The comparison composes rows through the method's layout, so it is the
same for every prompt method. Every rank runs the same probe on the same examples (the backbone's
collectives stay in lockstep) and so reaches the same decision.

It picks no source (`choose_sources` does) and writes nothing to disk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tuner.evaluate import mean_target_loss
from tuner.prompts.optim import SparseRowAdam, lr_at
from tuner.tasks.batching import collate

PROBE = "probe"  # the probe row's name in its own optimiser and batches


@dataclass(frozen=True)
class TransferCheck:
    """How a transferred start is checked (`prompt.transfer_check_steps`, `prompt.transfer_heldout`,
    and the job's optimiser settings)."""

    steps: int  # probe steps from each start; 0: no check
    heldout: int  # held-out examples scored (at most a quarter of the task's training examples)
    lr: float
    warmup_steps: int
    max_steps: int
    schedule: str
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    batch_size: int = 8  # examples per probe step

    @classmethod
    def of(cls, prompt, optim) -> TransferCheck:
        """From a job's `prompt` and `optim` sections."""
        o = optim
        return cls(
            prompt.transfer_check_steps,
            prompt.transfer_heldout,
            o.lr,
            o.warmup_steps,
            o.max_steps,
            o.schedule,
            tuple(o.betas),
            o.eps,
            o.grad_clip,
        )


@dataclass
class CheckResult:
    """One task's race: both starts' held-out loss after the probe, and which start it keeps."""

    task: str
    transferred_loss: float
    own_loss: float
    heldout: int  # examples scored

    @property
    def kept(self) -> bool:
        """The transferred start stays unless it is worse (a tie keeps it)."""
        return self.transferred_loss <= self.own_loss


def split_heldout(examples: list, heldout: int) -> tuple[list, list]:
    """(fit part, held-out slice): the last min(`heldout`, a quarter) examples are held out."""
    k = min(heldout, len(examples) // 4)
    return examples[: len(examples) - k], examples[len(examples) - k :]


def probe(
    lm, layout, shared, start: torch.Tensor, fit: list, check: TransferCheck, *, max_len, pad_id, device
):
    """`start` (one bank row) after `check.steps` Adam steps on batches of `fit`: the row, detached."""
    row = start[None].to(device).float().clone()
    adam = SparseRowAdam(check.lr, check.betas, check.eps, 0.0, check.grad_clip)
    b = min(check.batch_size, len(fit))
    for step in range(check.steps):
        batch = [fit[(step * b + j) % len(fit)] for j in range(b)]
        packed = collate(
            [_as_probe(e) for e in batch], {PROBE: 0}, layout.P, max_len=max_len, pad_id=pad_id
        ).to(device)
        leaf = row.clone().requires_grad_(True)
        weight = torch.full((packed.num_segments,), 1.0 / b, device=device)
        lm(packed, layout.compose(leaf, shared), seg_weight=weight).loss.backward()
        lr = lr_at(step, check.lr, check.warmup_steps, check.max_steps, check.schedule)
        row = adam.step([PROBE], leaf.detach(), leaf.grad, lr=lr)
    return row[0].detach()


def _as_probe(example):
    return dataclasses.replace(example, task=PROBE)


def check_transfer(
    lm,
    layout,
    shared: torch.Tensor | None,
    starts: dict[str, tuple[torch.Tensor, torch.Tensor]],
    train: dict[str, list],
    check: TransferCheck,
    *,
    max_len: int,
    pad_id: int,
    device: torch.device,
) -> dict[str, CheckResult]:
    """Race each task's (transferred, own) start rows in `starts` (see the module docstring).

    Args:
        shared: the method's shared vector (frozen in a transfer run), or None.
        train: task -> its training examples.
    Returns:
        task -> its `CheckResult`; a task with fewer than 4 training examples (no held-out slice) is
        left out, and keeps its transferred start.
    """
    out = {}
    shared = None if shared is None else shared.to(device)
    for task, (transferred, own) in starts.items():
        fit, held = split_heldout(list(train[task]), check.heldout)
        if not held or not fit:
            continue
        kw = {"max_len": max_len, "pad_id": pad_id, "device": device}
        prompts = {}
        with torch.enable_grad():
            for name, start in (("transferred", transferred), ("own", own)):
                row = probe(lm, layout, shared, start, fit, check, **kw)
                with torch.no_grad():
                    prompts[name] = layout.compose(row[None], shared)[0]
        loss = mean_target_loss(lm, held, prompts, **kw)
        out[task] = CheckResult(task, loss["transferred"], loss["own"], len(held))
    return out
