"""A run's trainable prompt parameters: the method's layout, the bank of rows, the shared part, their optimisers.

`PromptParams.build` makes them for the bank's rows from a job's `prompt` and `optim` sections: the
parameterisation (`tuner.prompts.methods`), every row initialised (`tuner.prompts.bank.init_prompts`, or
the caller's `fill`: a search initialises each variant by its own settings), one sparse Adam for the
rows and one for the shared part. With `prompt.init_from` the finished run's rows are registered next
to them and its shared part is loaded and frozen (`tuner.prompts.continual`); `transfer_init` then
starts each new task from the source row that fits it best (`prompt.init: transfer`).

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
        layout = make_layout(p.method, p.num_virtual_tokens, hidden, rank=p.rank, bottleneck=p.bottleneck)
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
                "vocab" if p.init == "transfer" else p.init,  # transfer overwrites every new row later
                label_words=label_words,
                text=p.init_text,
                std=p.init_std,
                seed=seed,
            )

        def adam() -> SparseRowAdam:
            return SparseRowAdam(o.lr, tuple(o.betas), o.eps, o.weight_decay, o.grad_clip)

        values = layout.initialise(bank, fill or init, torch.Generator().manual_seed(seed))
        shared = None if values is None else SharedParams(values, adam(), p.shared_lr_scale)
        if source:
            for name in carried:
                bank.set_prompt(name, source.rows[name])
            if shared is not None:
                shared.values = source.shared.float().clone()
                shared.frozen = True  # old tasks' prompts stay exactly as exported
        bank.to(device)  # fp32 master copy and Adam moments stay on the device
        if shared is not None:
            shared.to(device)
        return cls(layout, bank, shared, adam(), source)

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
        the lowest zero-shot loss on its first `k` examples (`tuner.prompts.continual.choose_sources`)."""
        carried = sorted(self.source.rows)
        candidates = dict(zip(carried, compose_rows(self.layout, self.bank, self.shared, carried)))
        examples = {n: t[:k] for n, t in train.items()}
        chosen = choose_sources(lm, examples, candidates, max_len=max_len, pad_id=pad_id, device=device)
        for task, (src, loss) in chosen.items():
            self.bank.set_prompt(task, self.source.rows[src])
            log(f"transfer init: {task} starts from {src} (zero-shot loss {loss:.3f} on {k} examples)")
