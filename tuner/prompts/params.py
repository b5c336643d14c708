"""A run's trainable prompt parameters: the method's layout, the bank of rows, the shared part, their optimisers.

`PromptParams.build` makes them for the bank's rows from a job's `prompt` and `optim` sections: the
parameterisation (`tuner.prompts.methods`), every row initialised (`tuner.prompts.bank.init_prompts`, or
the caller's `fill`: a search initialises each variant by its own settings), one sparse Adam for the
rows and one for the shared part. With `prompt.init_from` the finished run's rows are registered next
to them and its shared part is loaded and frozen (`tuner.prompts.continual`); `transfer_init` then
starts each new task from the source row that fits it best (`prompt.init: transfer`), and keeps that start
only where it trains no worse than the task's own on a held-out slice (`tuner.prompts.transfer_guard`).
ULPT's projection and SuperPos's vocabulary sample are the shared part of their methods, frozen from the start.

It runs no training step (the recipe does) and saves nothing (`tuner.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tuner.prompts.bank import PromptBank, init_prompts
from tuner.prompts.continual import SourceRun, choose_sources, load_source
from tuner.prompts.methods import Layout, SharedParams, compose_rows, make_layout, prompt_of
from tuner.prompts.optim import SparseRowAdam
from tuner.prompts.transfer_guard import TransferCheck, check_transfer

if TYPE_CHECKING:
    from tuner.config import OptimConfig, PromptConfig


@dataclass
class PromptParams:
    """What a run trains: the rows of `bank`, composed by `layout` with the `shared` part into prompts."""

    layout: Layout
    bank: PromptBank  # fp32 master rows and their Adam moments, on the training device
    shared: SharedParams | None  # the method's shared part and its own Adam (None: independent)
    optimizer: SparseRowAdam  # the rows'
    source: SourceRun | None  # `prompt.init_from`'s finished run: its rows are carried, never trained
    transfer_check: TransferCheck | None = None  # how `transfer_init` checks a transferred start

    @classmethod
    def build(
        cls,
        prompt: PromptConfig,
        optim: OptimConfig,
        names: list[str],
        hidden: int,
        *,
        embed: torch.nn.Module,
        tokenizer,
        label_words: dict[str, list[str]],
        backbone: str,
        device: torch.device,
        seed: int,
        fill: Callable[[PromptBank], None] | None = None,
    ) -> PromptParams:
        """The parameters of bank rows `names` (hidden size `hidden`), each initialised by `prompt.init`
        (label words: task -> its verbaliser's words) or by `fill` where given; `backbone` is the
        job's `model.name` (a source run must have been trained on it)."""
        p, o = prompt, optim
        layout = make_layout(
            p.method,
            p.num_virtual_tokens,
            hidden,
            rank=p.rank,
            bottleneck=p.bottleneck,
            superpos_tokens=p.superpos_tokens,
        )
        source = (
            load_source(p.init_from, p.method, layout.row_shape, backbone, names) if p.init_from else None
        )
        carried = sorted(source.rows) if source else []
        # Carried rows are registered (so this run's checkpoint can be an init_from too) but never
        # in a batch: they are not in the sampler, so nothing ever updates them.
        bank = PromptBank(names + carried, *layout.row_shape)

        def init(bank: PromptBank) -> None:
            init_prompts(
                bank,
                embed,
                tokenizer,
                # transfer overwrites every new row later; its guard compares it with this own start
                "class_labels" if p.init == "transfer" else p.init,
                label_words=label_words,
                text=p.init_text,
                std=p.init_std,
                seed=seed,
            )

        def adam() -> SparseRowAdam:
            return SparseRowAdam(o.lr, tuple(o.betas), o.eps, o.weight_decay, o.grad_clip)

        values = layout.initialise(bank, fill or init, torch.Generator().manual_seed(seed), embed=embed)
        shared = None if values is None else SharedParams(values, adam(), p.shared_lr_scale)
        if shared is not None and layout.fixed_shared:
            shared.frozen = True  # ULPT's projection, SuperPos's vocabulary sample: never trained
        if source:
            for name in carried:
                bank.set_prompt(name, source.rows[name])
            if shared is not None:
                shared.values = source.shared.float().clone()
                shared.frozen = True  # old tasks' prompts stay exactly as exported
        bank.to(device)  # fp32 master copy and Adam moments stay on the device
        if shared is not None:
            shared.to(device)
        check = TransferCheck.of(p, o) if p.init == "transfer" and p.transfer_check_steps else None
        return cls(layout, bank, shared, adam(), source, check)

    def prompt(self, name: str) -> torch.Tensor:
        """Row `name`'s final [P, H] prompt (composed from its row and the shared part): what is evaluated
        and exported."""
        return prompt_of(self.layout, self.bank, self.shared, name)

    def transfer_init(
        self,
        lm,
        train: dict[str, list],
        k: int,
        *,
        max_len: int,
        pad_id: int,
        device: torch.device,
        log: Callable[[str], None],
    ) -> None:
        """Start each new task (`train`: task -> its train examples) from the source row whose prompt has
        the lowest zero-shot loss on its first `k` examples (`tuner.prompts.continual.choose_sources`);
        with `transfer_check`, a task whose transferred start trains worse than its own start on its
        held-out slice falls back to its own (`tuner.prompts.transfer_guard`)."""
        carried = sorted(self.source.rows)
        candidates = dict(zip(carried, compose_rows(self.layout, self.bank, self.shared, carried)))
        examples = {n: t[:k] for n, t in train.items()}
        chosen = choose_sources(lm, examples, candidates, max_len=max_len, pad_id=pad_id, device=device)
        own = {task: self.bank.prompt(task).clone() for task in chosen}
        for task, (src, loss) in chosen.items():
            self.bank.set_prompt(task, self.source.rows[src])
            log(f"transfer init: {task} starts from {src} (zero-shot loss {loss:.3f} on {k} examples)")
        if self.transfer_check is None:
            return
        starts = {t: (self.source.rows[src], own[t]) for t, (src, _) in chosen.items()}
        shared = None if self.shared is None else self.shared.values
        results = check_transfer(
            lm,
            self.layout,
            shared,
            starts,
            train,
            self.transfer_check,
            max_len=max_len,
            pad_id=pad_id,
            device=device,
        )
        for task, r in results.items():
            if not r.kept:
                self.bank.set_prompt(task, own[task])
            verdict = "keeps it" if r.kept else "falls back to its own start"
            log(
                f"transfer check: {task} {verdict} (held-out loss after {self.transfer_check.steps} steps: "
                f"transferred {r.transferred_loss:.3f}, own {r.own_loss:.3f}, {r.heldout} examples)"
            )
