"""Prompt parameterisations (`prompt.method`): how a task's soft prompt is built from trainable parts.

    independent  P_k = E_k                                     Lester et al. (2021); the default
    residual     P_k = E_k + LN(W_up relu(W_down E_k + b_d) + b_u)   Razdaibiedina et al. (2023)
    multitask    P_k = P_shared * (u_k v_k^T)                  MPT, Wang et al. (2023)
    ulpt         P_k = (Z_k R) * s_k + b_k                      ULPT, Wu, Hao & Mou (2025)
    superpos     P_k = W_k S                                    SuperPos-Prompt (2024)

Every method splits its parameters in two:
  * per-task rows, one per row name, in a `PromptBank` (`layout.row_shape` per row), gathered,
    updated by `SparseRowAdam` and scattered back for the batch's rows only, as before;
  * one small dense shared vector (`SharedParams`: the residual MLP, or MPT's shared prompt) with its
    own single-state Adam, clipped by its own norm.
So a step costs O(rows in the batch) + O(shared size), never O(registered tasks).

`ulpt` and `superpos` have a *fixed* shared part: ULPT's random projection R [r, H] (entries
N(0, 1/r), as in the paper) and SuperPos's sample S [m, H] of vocabulary embeddings, both drawn from
the run's seed (`data.seed`) when the run starts. It is never trained (`fixed_shared`: the
`SharedParams` is frozen), and lives once per run in the checkpoint's shared slot, so a resumed or
continual run composes with the very R / S its rows were trained against (it does not depend on
regenerating them), and an exported prompt needs neither. What a task owns is its row only:
ULPT's Z_k [P, r], s_k [H], b_k [H] (P*r + 2H numbers instead of P*H), SuperPos's mixing weights
W_k [P, m].

`layout.compose(rows, shared)` is differentiable and works row by row: a task's prompt depends on
its own row and the shared vector only, so sharing a batch changes nothing for a task, and the
shared vector's gradient is the sum of the tasks' own gradients. `independent` composes to its row
itself (no graph), so it trains bitwise as the plain prompt bank does. `prompt_of` gives a row's
final [P, H] prompt, which is what evaluation uses and what is exported as a plain PEFT prompt.

This module does not know tasks' data, the backbone or files (see tuner/prompts/continual.py for loading a
finished run, tuner/checkpoint.py for saving these parts).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tuner.config import DEFAULT_RANK, PROMPT_METHODS
from tuner.model.zero import gathered
from tuner.prompts.bank import PromptBank
from tuner.prompts.optim import SparseRowAdam

SHARED = "shared"  # the shared vector's single key in its own optimiser


class Independent:
    """One free [P, H] prompt per row: the row is the prompt."""

    kind = "independent"
    fixed_shared = False

    def __init__(self, num_virtual_tokens: int, hidden: int):
        self.P, self.H = num_virtual_tokens, hidden
        self.row_shape = (num_virtual_tokens, hidden)
        self.shared_size = 0

    def compose(self, rows: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        return rows

    def init_shared(self, gen: torch.Generator) -> torch.Tensor | None:
        return None

    def initialise(self, bank: PromptBank, fill: Callable[[PromptBank], None], gen, embed=None) -> None:
        fill(bank)
        return None


class Residual:
    """Each row E_k [P, H] goes through one shared token-wise MLP with a residual connection.

    The LayerNorm's gain starts at zero, so every task starts from its own E_k exactly (the
    paper's unit gain would add a unit-variance term to embeddings of std ~0.1 here); the gain is
    the first thing the shared gradient moves, and the MLP's weights follow.
    """

    kind = "residual"
    fixed_shared = False

    def __init__(self, num_virtual_tokens: int, hidden: int, bottleneck: int):
        self.P, self.H, self.B = num_virtual_tokens, hidden, bottleneck
        self.row_shape = (num_virtual_tokens, hidden)
        H, B = hidden, bottleneck
        # (name, shape) of the pieces of the flat shared vector, in order
        self.pieces = [("w_down", (B, H)), ("b_down", (B,)), ("w_up", (H, B)), ("b_up", (H,))]
        self.pieces += [("ln_weight", (H,)), ("ln_bias", (H,))]
        self.shared_size = sum(math.prod(s) for _, s in self.pieces)

    def unflatten(self, shared: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, shape in self.pieces:
            n = math.prod(shape)
            out[name] = shared[i : i + n].view(shape)
            i += n
        return out

    def compose(self, rows: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        p = self.unflatten(shared)
        h = F.relu(F.linear(rows, p["w_down"], p["b_down"]))
        h = F.linear(h, p["w_up"], p["b_up"])
        return rows + F.layer_norm(h, (self.H,), p["ln_weight"], p["ln_bias"])

    def init_shared(self, gen: torch.Generator) -> torch.Tensor:
        # nn.Linear's default ranges (uniform +-1/sqrt(fan_in)); LayerNorm gain and bias 0 (see above)
        parts = []
        for name, shape in self.pieces:
            fan_in = self.H if name.endswith("down") else self.B
            if name.startswith("ln"):
                parts.append(torch.zeros(shape))
            else:
                parts.append((torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(fan_in))
        return torch.cat([t.flatten() for t in parts])

    def initialise(
        self, bank: PromptBank, fill: Callable[[PromptBank], None], gen, embed=None
    ) -> torch.Tensor:
        fill(bank)
        return self.init_shared(gen)


class Multitask:
    """One shared prompt [P, H], modulated per row by a rank-r factor u_k [P, r] @ v_k [r, H].

    A row is stored flat ([1, P*r + r*H]) so one `SparseRowAdam` state and one clipping norm cover
    both of a task's factors. u, v start at 1/sqrt(r) (plus N(0, 0.02) noise to break the symmetry
    between the r components), so every task starts at the shared prompt, which takes the
    configured initialisation. PEFT's MPT starts u, v at N(0, 0.02) because it distils them from a
    trained source prompt; trained from scratch that would start every prompt near zero.
    """

    kind = "multitask"
    fixed_shared = False

    def __init__(self, num_virtual_tokens: int, hidden: int, rank: int):
        self.P, self.H, self.r = num_virtual_tokens, hidden, rank
        self.row_shape = (1, num_virtual_tokens * rank + rank * hidden)
        self.shared_size = num_virtual_tokens * hidden

    def compose(self, rows: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        U, Pr = rows.shape[0], self.P * self.r
        u = rows[:, 0, :Pr].view(U, self.P, self.r)
        v = rows[:, 0, Pr:].view(U, self.r, self.H)
        return shared.view(self.P, self.H) * torch.bmm(u, v)

    def init_shared(self, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(self.shared_size, generator=gen) * 0.02

    def initialise(
        self, bank: PromptBank, fill: Callable[[PromptBank], None], gen, embed=None
    ) -> torch.Tensor:
        shared = PromptBank([SHARED], self.P, self.H)
        fill(shared)
        noise = torch.randn(bank.weight.shape, generator=gen) * 0.02
        bank.weight.copy_(noise + 1 / math.sqrt(self.r))
        return shared.weight[0].flatten().clone()


def _plain_init(bank: PromptBank, fill: Callable[[PromptBank], None], P: int, H: int) -> PromptBank:
    """The configured initialisation of `bank`'s rows as plain [P, H] prompts (the rows themselves are
    another shape): what a method with a fixed basis fits its rows to."""
    plain = PromptBank(bank.task_names, P, H)
    fill(plain)
    return plain


def _fit(basis: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The min-norm least-squares coefficients C [N, P, k] with C @ basis ~ target ([k, H] and [N, P, H]),
    every row's tokens in one solve (float64 for the solve, float32 back)."""
    N, P, H = target.shape
    rhs = target.reshape(N * P, H).T.double()  # basis^T C^T ~ target^T
    c = torch.linalg.lstsq(basis.T.double(), rhs, driver="gelsd").solution.T
    return c.float().reshape(N, P, basis.shape[0])


class Ulpt:
    """Each row holds Z_k [P, r], s_k [H], b_k [H], flat ([1, P*r + 2H]); R [r, H] is fixed.

    R ~ N(0, 1/r) entrywise (the paper's up-projection), so a row of Z R has the scale of a row of Z.
    Every task starts as close to its configured initial prompt E_k (class labels, vocabulary, ...)
    as the layout allows: b_k = E_k's mean over its P tokens, s_k = 1, and Z_k the least-squares fit
    of E_k - b_k in R's row space. So the shift starts on the embeddings' own region (where a prompt
    of the right norm lies) and Z moves the tokens apart from there.
    """

    kind = "ulpt"
    fixed_shared = True

    def __init__(self, num_virtual_tokens: int, hidden: int, rank: int):
        self.P, self.H, self.r = num_virtual_tokens, hidden, rank
        self.row_shape = (1, num_virtual_tokens * rank + 2 * hidden)
        self.shared_size = rank * hidden

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Z [U, P, r], s [U, H], b [U, H] of flat rows [U, 1, P*r + 2H] (views)."""
        U, Pr, H = rows.shape[0], self.P * self.r, self.H
        flat = rows[:, 0]
        return flat[:, :Pr].view(U, self.P, self.r), flat[:, Pr : Pr + H], flat[:, Pr + H :]

    def compose(self, rows: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        z, s, b = self.split(rows)
        lifted = torch.matmul(z, shared.view(self.r, self.H))  # [U, P, H]
        return lifted * s[:, None, :] + b[:, None, :]

    def init_shared(self, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(self.shared_size, generator=gen) / math.sqrt(self.r)

    def initialise(
        self, bank: PromptBank, fill: Callable[[PromptBank], None], gen, embed=None
    ) -> torch.Tensor:
        R = self.init_shared(gen)
        plain = _plain_init(bank, fill, self.P, self.H)
        b = plain.weight.mean(dim=1)  # [N, H]
        z = _fit(R.view(self.r, self.H), plain.weight - b[:, None, :])  # Z R ~ E - b
        s = torch.ones_like(b)
        bank.weight.copy_(torch.cat([z.flatten(1), s, b], dim=1)[:, None, :])
        return R


class Superpos:
    """Each row holds mixing weights W_k [P, m] over a fixed sample S [m, H] of vocabulary embeddings.

    S is m distinct token ids drawn from the run's seed among the first `vocab_limit` ids (the common
    tokens, as the vocabulary initialisation samples), their embeddings read once through
    `tuner.model.zero.gathered` (ZeRO-3). W_k starts at the least-squares fit of the task's configured
    initial prompt E_k in S's span (min-norm, `torch.linalg.lstsq`), so a prompt made of vocabulary
    embeddings starts near itself. The paper also trains S and drops dropout; here S is fixed (a
    shared trainable part would couple the tasks) and the backbone has no dropout.
    """

    kind = "superpos"
    fixed_shared = True

    def __init__(self, num_virtual_tokens: int, hidden: int, tokens: int, vocab_limit: int = 5000):
        self.P, self.H, self.m, self.vocab_limit = num_virtual_tokens, hidden, tokens, vocab_limit
        self.row_shape = (num_virtual_tokens, tokens)
        self.shared_size = tokens * hidden

    def compose(self, rows: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        return torch.matmul(rows, shared.view(self.m, self.H))  # [U, P, m] @ [m, H]

    def sample_ids(self, gen: torch.Generator, vocab: int) -> torch.Tensor:
        """The m token ids of S (distinct) for a vocabulary of `vocab` ids."""
        limit = min(self.vocab_limit, vocab)
        if self.m > limit:
            raise ValueError(f"prompt.superpos_tokens={self.m} exceeds the {limit} sampled vocabulary ids")
        return torch.randperm(limit, generator=gen)[: self.m]

    def initialise(
        self, bank: PromptBank, fill: Callable[[PromptBank], None], gen, embed=None
    ) -> torch.Tensor:
        if embed is None:
            raise ValueError("prompt.method=superpos samples the backbone's embeddings: none given")
        with gathered(embed.weight):
            table = embed.weight.detach().float().cpu()
        S = table[self.sample_ids(gen, table.shape[0])]  # [m, H]
        plain = _plain_init(bank, fill, self.P, self.H)
        bank.weight.copy_(_fit(S, plain.weight))  # W S ~ E
        return S.flatten().clone()


Layout = Independent | Residual | Multitask | Ulpt | Superpos
METHODS = PROMPT_METHODS  # `prompt.method`'s names, one layout class above each


def make_layout(
    method: str,
    num_virtual_tokens: int,
    hidden: int,
    *,
    rank: int = 0,
    bottleneck: int = 128,
    superpos_tokens: int = 128,
):
    """The parameterisation named `method` (one of `METHODS`); `rank` 0 is the method's default."""
    rank = rank or DEFAULT_RANK.get(method, 1)
    if method == "independent":
        return Independent(num_virtual_tokens, hidden)
    if method == "residual":
        return Residual(num_virtual_tokens, hidden, bottleneck)
    if method == "multitask":
        return Multitask(num_virtual_tokens, hidden, rank)
    if method == "ulpt":
        return Ulpt(num_virtual_tokens, hidden, rank)
    if method == "superpos":
        return Superpos(num_virtual_tokens, hidden, superpos_tokens)
    raise ValueError(f"unknown prompt method {method!r}")


def state_per_task(layout: Layout) -> int:
    """Numbers a task owns while training: its row and its two Adam moments."""
    return 3 * math.prod(layout.row_shape)


class SharedParams:
    """The shared vector of a method, its Adam (one state, clipped by its own norm) and lr scale.

    `frozen` (continual training: the shared part of an earlier run) keeps it out of autograd and
    out of the step, so the prompts of tasks trained with it stay exactly what they were.
    """

    def __init__(self, values: torch.Tensor, optimizer: SparseRowAdam, lr_scale: float = 1.0):
        self.values = values.float()
        self.optimizer = optimizer
        self.lr_scale = lr_scale
        self.frozen = False

    def to(self, device: torch.device | str) -> SharedParams:
        self.values = self.values.to(device)
        return self

    def gather(self) -> torch.Tensor:
        """The step's copy: a trainable leaf, or the values themselves when frozen."""
        if self.frozen:
            return self.values
        return self.values.clone().requires_grad_(True)

    def step(self, leaf: torch.Tensor, lr: float) -> None:
        """Adam on the whole vector from `leaf.grad` (after the cross-rank all-reduce)."""
        if self.frozen or leaf.grad is None:
            return
        new = self.optimizer.step(
            [SHARED], leaf.detach()[None, None], leaf.grad[None, None], lr=lr * self.lr_scale
        )
        self.values = new[0, 0]


def compose_rows(
    layout: Layout, bank: PromptBank, shared: SharedParams | None, names: list[str]
) -> torch.Tensor:
    """The composed [U, P, H] prompts of rows `names`, without autograd (evaluation, export, transfer)."""
    with torch.no_grad():
        rows = bank.weight.index_select(0, bank.rows_of(names).to(bank.device))
        return layout.compose(rows, None if shared is None else shared.values).detach()


def prompt_of(layout: Layout, bank: PromptBank, shared: SharedParams | None, name: str) -> torch.Tensor:
    """Row `name`'s final [P, H] prompt: what evaluation uses and what is exported."""
    return compose_rows(layout, bank, shared, [name])[0]
