"""The one dispatch point for attention over packed mixed-task rows.

A packed row (see `tuner.tasks.batching`) holds *spans*: prompt copies, which attend causally to
themselves, and segments, which attend to their prompt copy and causally to themselves. Padding
belongs to no span. `pick_kernel(requested, device)` chooses how that layout is computed and
`PackedLayout.build(kernel, batch, device)` turns a batch into the kernel's plan, once per forward;
every attention layer then receives the plan as a keyword argument through the transformers
attention interface (registered here under `ATTENTION_NAME`) and calls `plan.attend`.

Kernels (the values of `model.attn_implementation`):

* `sdpa`: span SDPA (`tuner.model.span_attention`): spans of similar length batched into a few SDPA
  calls. The CPU default; exact in fp32.
* `eager`: the dense `[R, 1, L, L]` layout mask (`MultiTaskBatch.attention_mask`) and plain
  softmax attention: the reference, L x L work per row.
* `varlen`: `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 kernels shipped with
  torch >= 2.10; CUDA, bf16/fp16). `flash_attention_2`: the same plan through flash-attn's
  `flash_attn_varlen_func`. Each span is one sequence: its queries, and as keys its prompt copy
  followed by itself (`cu_seqlens_q != cu_seqlens_k`), so the prompt prefix is expressed with a
  causal mask aligned to the bottom right (query i of n sees keys up to P + i). The alignment is
  probed once per kernel on the device (`aligns_bottom_right`); a kernel that aligns top-left instead
  gets the prompt's queries recomputed per segment (equal lengths), a correct but costlier plan.
* `flex`: FlexAttention with a document + prefix `BlockMask` over the rows as they are (no
  gathering). Building a BlockMask is costly, so masks are cached per batch layout. Compiled on
  CUDA; on CPU it runs unfused, forward only (torch has no CPU backward for it).
* `auto`: `varlen` on CUDA when torch has it, else `flash_attention_2` when flash-attn is
  installed, else `sdpa`.

Not here: KV caches and decoding (the serving runner keeps transformers' own attention), and the
last layer computed at target positions only (`tuner.model.target_layer`, plain SDPA over gathered keys).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from tuner.model.span_attention import SpanAttention
from tuner.tasks.batching import MultiTaskBatch, map_tensors

ATTENTION_NAME = "promptfleet_packed"
KERNELS = ("auto", "sdpa", "eager", "varlen", "flex", "flash_attention_2")


# ------------------------------------------------------------------------------------ choosing


def varlen_available() -> bool:
    """torch >= 2.10 ships `varlen_attn`."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def pick_kernel(requested: str, device: torch.device | str) -> str:
    """Resolve `requested` (one of `KERNELS`) to the kernel that runs packed rows on `device`.

    Raises:
        ValueError: an unknown name, or a kernel that cannot run on `device` (with the reason).
    """
    device = torch.device(device)
    if requested not in KERNELS:
        raise ValueError(f"unknown attention kernel {requested!r}; expected one of {', '.join(KERNELS)}")
    if requested == "auto":
        if device.type == "cuda" and varlen_available():
            return "varlen"
        if device.type == "cuda" and flash_attn_available():
            return "flash_attention_2"
        return "sdpa"
    if requested in ("varlen", "flash_attention_2") and device.type != "cuda":
        raise ValueError(f"the {requested} attention kernel needs a CUDA device, not {device.type}")
    if requested == "varlen" and not varlen_available():
        raise ValueError(f"varlen attention needs torch >= 2.10 (this is {torch.__version__})")
    if requested == "flash_attention_2" and not flash_attn_available():
        raise ValueError("flash_attention_2 needs the flash-attn package")
    return requested


# ------------------------------------------------------------------------------------ layouts


def _spans(batch: MultiTaskBatch) -> list[tuple[int, int, int, int]]:
    return batch.spans()


@dataclass
class DenseLayout:
    """The reference: every row's full `[L, L]` layout mask, plain softmax attention."""

    mask: torch.Tensor  # [R, 1, L, L] True = attend

    @classmethod
    def from_batch(cls, batch: MultiTaskBatch, device: torch.device) -> DenseLayout:
        return cls(batch.attention_mask().to(device))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DenseLayout:
        return DenseLayout(self.mask.to(device, non_blocking=non_blocking))

    def attend(self, query, key, value, scaling: float | None) -> torch.Tensor:
        return dense_attention(query, key, value, self.mask, scaling).transpose(1, 2)


def dense_attention(query, key, value, mask: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, written out: [R, H, L, D] -> [R, H, L, D] (GQA by repetition)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).to(value.dtype)) @ value


@dataclass
class VarlenLayout:
    """Spans as variable-length sequences, flat: queries, keys and outputs gathered only where needed.

    With a bottom-right causal alignment the sequences are the rows as they are (`_row_order`): every
    position is a query in place (padding tails are sequences of their own, whose outputs nothing
    reads), so queries need no gather and outputs no scatter; a prompt copy and the segment that
    follows it are one causal sequence (exactly what they may see), so keys need no gather either
    unless a prompt copy serves several segments (`shared_prompts`): then only the keys and values
    (the few KV heads) are gathered, each later segment's as [its prompt copy][itself]. A top-left
    alignment gets every span gathered, its prompt queries repeated (`_gathered`).
    """

    kernel: str  # varlen | flash_attention_2
    q_index: torch.Tensor | None  # [Tq] flat (row * L + col) positions read as queries; None: all, in order
    k_index: torch.Tensor | None  # [Tk] flat key positions, sequence after sequence; None: as the queries
    cu_q: torch.Tensor  # [sequences + 1] int32
    cu_k: torch.Tensor  # [sequences + 1] int32
    max_q: int
    max_k: int
    out_select: torch.Tensor | None  # [n] rows of the kernel output that are real span positions
    out_index: torch.Tensor | None  # [n] flat positions they are written to; None: the output is the rows

    @classmethod
    def from_batch(
        cls, kernel: str, batch: MultiTaskBatch, device: torch.device, bottom_right: bool | None = None
    ) -> VarlenLayout:
        """Build the plan (on the host, then moved to `device`).

        Args:
            bottom_right: the kernel's causal alignment; None probes it (`aligns_bottom_right`).
        """
        if bottom_right is None:
            bottom_right = aligns_bottom_right(kernel, device)
        plan = cls._row_order(kernel, batch) if bottom_right else cls._gathered(kernel, batch)
        return plan.to(device)

    @classmethod
    def _row_order(cls, kernel: str, batch: MultiTaskBatch) -> VarlenLayout:
        R, L = batch.input_ids.shape
        P = batch.num_virtual_tokens
        by_row: list[list[tuple[int, int, int]]] = [[] for _ in range(R)]
        for row, start, n, pre in _spans(batch):
            by_row[row].append((start, n, pre))
        q_len, pre_flat, p_len = [], [], []  # per sequence: its length, its prefix's flat start, length
        for row, spans in enumerate(by_row):
            spans.sort()
            col, i = 0, 0
            while i < len(spans):
                start, n, pre = spans[i]
                if start > col:  # uncovered positions (padding): a sequence nothing reads
                    q_len, pre_flat, p_len = q_len + [start - col], pre_flat + [0], p_len + [0]
                nxt = spans[i + 1] if i + 1 < len(spans) else None
                if pre < 0 and nxt is not None and nxt[0] == start + n and nxt[2] == start:
                    n, i = n + nxt[1], i + 1  # a prompt copy and its first segment: one causal sequence
                    pre = -1
                has_pre = pre >= 0 and P > 0
                q_len.append(n)
                pre_flat.append(row * L + pre if has_pre else 0)
                p_len.append(P if has_pre else 0)
                col, i = start + n, i + 1
            if col < L:
                q_len, pre_flat, p_len = q_len + [L - col], pre_flat + [0], p_len + [0]
        q_len_t, p = torch.tensor(q_len, dtype=torch.long), torch.tensor(p_len, dtype=torch.long)
        k_len = q_len_t + p
        k_index = None
        if int(p.sum()):  # keys of sequence i: its prefix, then its own positions
            q_start = torch.cumsum(q_len_t, 0) - q_len_t  # flat: the sequences tile the rows
            k_index = _flat_keys(q_start, q_len_t, torch.tensor(pre_flat, dtype=torch.long), p)[0]
        return cls(
            kernel=kernel,
            q_index=None,
            k_index=k_index,
            cu_q=_cumulative(q_len_t),
            cu_k=_cumulative(k_len),
            max_q=max(q_len, default=0),
            max_k=int(k_len.max()) if len(k_len) else 0,
            out_select=None,
            out_index=None,
        )

    @classmethod
    def _gathered(cls, kernel: str, batch: MultiTaskBatch) -> VarlenLayout:
        """Top-left alignment: every span gathered, its queries repeating its prefix (computed, not written back)."""
        L, P = batch.input_ids.shape[1], batch.num_virtual_tokens
        row, start, n, pre = torch.tensor(_spans(batch), dtype=torch.long).view(-1, 4).unbind(1)
        p = torch.where(pre >= 0, P, 0)  # prefix keys of each span: its prompt copy, if any
        base = row * L
        k_index, in_prefix = _flat_keys(base + start, n, base + pre.clamp(min=0), p)
        k_len = p + n
        return cls(
            kernel=kernel,
            q_index=k_index,
            k_index=k_index,
            cu_q=_cumulative(k_len),
            cu_k=_cumulative(k_len),
            max_q=int(k_len.max()) if len(k_len) else 0,
            max_k=int(k_len.max()) if len(k_len) else 0,
            out_select=(~in_prefix).nonzero().view(-1),
            out_index=k_index[~in_prefix],
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> VarlenLayout:
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def attend(self, query, key, value, scaling: float | None) -> torch.Tensor:
        R, H, L, D = query.shape
        q = query.transpose(1, 2).reshape(R * L, H, D)
        k = key.transpose(1, 2).reshape(R * L, key.shape[1], D)
        v = value.transpose(1, 2).reshape(R * L, value.shape[1], D)
        if self.q_index is not None:
            q = q.index_select(0, self.q_index)
        if self.k_index is not None:
            k, v = k.index_select(0, self.k_index), v.index_select(0, self.k_index)
        o = varlen_call(self.kernel, q, k, v, self.cu_q, self.cu_k, self.max_q, self.max_k, scaling)
        if self.out_index is None:
            return o.reshape(R, L, H, D)
        out = query.new_zeros(R * L, H, D).index_copy(0, self.out_index, o.index_select(0, self.out_select))
        return out.view(R, L, H, D)


def _flat_keys(
    own_start: torch.Tensor, n: torch.Tensor, pre_start: torch.Tensor, p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of sequences laid end to end: for each, `p` prefix positions from `pre_start`, then `n` own
    positions from `own_start` (all flat). Returns the key positions and which of them are prefix."""
    k_len = p + n
    k_seq = torch.repeat_interleave(torch.arange(len(n)), k_len)
    j = torch.arange(int(k_len.sum())) - (torch.cumsum(k_len, 0) - k_len)[k_seq]
    in_prefix = j < p[k_seq]
    return torch.where(in_prefix, pre_start[k_seq] + j, own_start[k_seq] + j - p[k_seq]), in_prefix


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    """[n] lengths -> [n + 1] int32 offsets (the kernels' cu_seqlens)."""
    return F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)


def varlen_call(kernel, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scaling: float | None):
    """One causal varlen attention call, [T, H, D] in and out, for either kernel and torch signature.

    torch 2.10's `varlen_attn` takes `is_causal=` and no `scale=` (it scales by 1/sqrt(D): another
    scale is folded into the queries), 2.11+ `window_size=(-1, 0)` and `scale=`; GQA is passed as
    `enable_gqa=` where the signature has it (2.12+), else the key/value heads are repeated.
    """
    if kernel == "flash_attention_2":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scaling, causal=True)
    from torch.nn.attention.varlen import varlen_attn

    params = varlen_params()
    kw = {}
    if "scale" in params:
        kw["scale"] = scaling
    elif scaling is not None:
        q = q * (scaling * q.shape[-1] ** 0.5)
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        kw["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return varlen_attn(q, k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k, **kw)


@functools.cache
def varlen_params() -> frozenset[str]:
    """The keyword parameters of this torch's `varlen_attn` (its signature changed between releases)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


@functools.cache
def aligns_bottom_right(kernel: str, device: torch.device) -> bool:
    """Whether `kernel`'s causal mask aligns to the bottom right when there are more keys than queries.

    One query over two keys whose values differ: bottom-right alignment lets the query see both
    keys (output = their mean, equal scores), top-left only the first. Only CUDA kernels are probed.
    """
    if device.type != "cuda":
        return True
    q = torch.zeros(1, 1, 64, device=device, dtype=torch.bfloat16)
    k = torch.zeros(2, 1, 64, device=device, dtype=torch.bfloat16)
    v = torch.stack([torch.zeros(1, 64), torch.ones(1, 64)]).to(device, torch.bfloat16)
    cu_q = torch.tensor([0, 1], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 2], dtype=torch.int32, device=device)
    out = varlen_call(kernel, q, k, v, cu_q, cu_k, 1, 2, None)
    return bool(out.float().mean() > 0.25)


@dataclass
class FlexLayout:
    """A document + prefix `BlockMask` over the rows as laid out (cached per layout)."""

    block_mask: object  # torch.nn.attention.flex_attention.BlockMask

    @classmethod
    def from_batch(cls, batch: MultiTaskBatch, device: torch.device) -> FlexLayout:
        doc, prefix = span_ids(batch)
        key = (device, tuple(doc.shape), doc.numpy().tobytes(), prefix.numpy().tobytes())
        mask = _BLOCK_MASKS.get(key)
        if mask is None:
            mask = _block_mask(doc.to(device), prefix.to(device))
            _BLOCK_MASKS[key] = mask
            while len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE:
                _BLOCK_MASKS.popitem(last=False)
        else:
            _BLOCK_MASKS.move_to_end(key)
        return cls(mask)

    def attend(self, query, key, value, scaling: float | None) -> torch.Tensor:
        out = _flex(query.device)(
            query,
            key,
            value,
            block_mask=self.block_mask,
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )
        return out.transpose(1, 2)


_BLOCK_MASK_CACHE = 64
_BLOCK_MASKS: OrderedDict = OrderedDict()


def span_ids(batch: MultiTaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: its span's id, and the id of the span it also sees whole (its prompt copy), else -1.

    Span ids are unique within a row; every padding position is a span of its own (it sees itself).
    """
    R, L = batch.input_ids.shape
    P = batch.num_virtual_tokens
    doc = (torch.arange(L) + L).repeat(R, 1)  # padding: one span per position
    prefix = torch.full((R, L), -1, dtype=torch.long)
    for i, (row, start, n, _) in enumerate(_spans(batch)):
        doc[row, start : start + n] = i
    for row, start, n, pre in _spans(batch):
        if pre >= 0 and P:
            prefix[row, start : start + n] = doc[row, pre]
    return doc, prefix


def document_mask_mod(doc: torch.Tensor, prefix: torch.Tensor):
    """FlexAttention `mask_mod`: a position sees its own span causally and its prompt copy whole."""

    def mask_mod(b, h, q, kv):
        same = (doc[b, q] == doc[b, kv]) & (kv <= q)
        return same | (prefix[b, q] == doc[b, kv])

    return mask_mod


def _block_mask(doc: torch.Tensor, prefix: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    R, L = doc.shape
    return create_block_mask(document_mask_mod(doc, prefix), R, None, L, L, device=doc.device)


@functools.cache
def _flex(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    # Unfused flex_attention materialises every score; compiled, it is a fused kernel.
    return torch.compile(flex_attention, dynamic=True) if device.type == "cuda" else flex_attention


PackedLayout = SpanAttention | DenseLayout | VarlenLayout | FlexLayout


def build_layout(kernel: str, batch: MultiTaskBatch, device: torch.device | str) -> PackedLayout:
    """The plan `kernel` (a resolved name from `pick_kernel`) runs `batch` with on `device`: the one
    `host_layout` attached to the batch ahead of time when there is one (moved with the batch)."""
    device = torch.device(device)
    if batch.attn_plan is not None and batch.attn_kernel == kernel:
        return batch.attn_plan.to(device)  # already there when the batch was moved with it: a no-op
    if kernel == "sdpa":
        return SpanAttention.from_batch(batch).to(device)
    if kernel == "eager":
        return DenseLayout.from_batch(batch, device)
    if kernel in ("varlen", "flash_attention_2"):
        return VarlenLayout.from_batch(kernel, batch, device)
    if kernel == "flex":
        return FlexLayout.from_batch(batch, device)
    raise ValueError(f"{kernel!r} is not a resolved attention kernel (see pick_kernel)")


def host_layout(kernel: str, batch: MultiTaskBatch, device: torch.device | str) -> MultiTaskBatch:
    """`batch` (on the host) with `kernel`'s plan for `device` attached, built on the host.

    Building a plan reads the batch's layout (spans, lengths) as Python values: on the host that
    costs no device synchronisation, and it can run ahead of the step (`tuner.tasks.prefetch`). The
    plan then travels with the batch (`MultiTaskBatch.to`). FlexAttention's masks are built and
    cached on the device, so a `flex` batch is returned as it is.
    """
    device = torch.device(device)
    if kernel == "flex" or not batch.num_segments:
        return batch
    if kernel in ("varlen", "flash_attention_2"):
        bottom_right = aligns_bottom_right(kernel, device)
        plan = VarlenLayout.from_batch(kernel, batch, torch.device("cpu"), bottom_right=bottom_right)
    else:
        plan = build_layout(kernel, batch, "cpu")
    return dataclasses.replace(batch, attn_plan=plan, attn_kernel=kernel)


# ------------------------------------------------------------------------------------ transformers hook


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_layout: PackedLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [R, H, L, D], key/value [R, Hkv, L, D] -> [R, L, H, D], by the batch's `packed_layout`."""
    if packed_layout is None:
        raise ValueError(f"the {ATTENTION_NAME!r} attention needs a packed_layout= plan")
    if dropout:
        raise ValueError("packed attention does not implement dropout (the backbone is frozen, in eval mode)")
    return packed_layout.attend(query, key, value, scaling), None


def _no_mask(*args, **kwargs) -> None:
    return None  # the layout is the mask


AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def decode(
    decoder: torch.nn.Module, batch: MultiTaskBatch, embeds: torch.Tensor, kernel: str
) -> torch.Tensor:
    """Run `decoder` over a packed batch with `kernel` (resolved): final hidden states [R, L, H]."""
    if not batch.num_segments:
        kernel = "eager"  # nothing but padding: no spans to plan
    config = decoder.config
    impl = config._attn_implementation
    layout = build_layout(kernel, batch, embeds.device)
    config._attn_implementation = ATTENTION_NAME
    try:
        out = decoder(
            inputs_embeds=embeds, position_ids=batch.position_ids, use_cache=False, packed_layout=layout
        )
    finally:
        config._attn_implementation = impl
    return out.last_hidden_state
