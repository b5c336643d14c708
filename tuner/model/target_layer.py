"""The decoder's last layer, computed at the target positions only.

The loss reads the final hidden state at a few positions per segment (one for a classification
example). Below the last layer every position matters: its keys and values feed the attention
of the positions after it. In the last layer nothing reads a position's output but the LM head,
so only the keys and values need every position; the query, the attention output, `o_proj` and
the MLP are needed at the target positions alone. That is ~95% of the last layer's work, about
3% of a 30-layer step, for free and exactly.

`last_layer_at_targets(decoder, batch)` is a context manager that swaps the last layer's
`forward` for one that does this (Llama-style layers only: `input_layernorm`, `self_attn` with
`q/k/v/o_proj` and rotary embeddings, `post_attention_layernorm`, `mlp`). The layer then returns
its *input* at every non-target position and its output at the targets: only the targets of
`last_hidden_state` are valid. Each target query attends to its segment's prompt copy and, causally,
to its segment up to itself, as in `tuner.model.span_attention`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

from tuner.tasks.batching import MultiTaskBatch

# Layer classes whose forward is exactly input_layernorm -> self_attn (q/k/v/o, rotary) -> residual ->
# post_attention_layernorm -> mlp -> residual, with no extra norms, biases aside (the Linear modules own them).
SUPPORTED_LAYERS = ("LlamaDecoderLayer",)


def supports(decoder: torch.nn.Module) -> bool:
    layers = getattr(decoder, "layers", None)
    return bool(layers) and type(layers[-1]).__name__ in SUPPORTED_LAYERS


class _TargetKeys:
    """Per target: the flat positions its query reads as keys, and which of them it may attend to."""

    def __init__(self, batch: MultiTaskBatch):
        R, L = batch.input_ids.shape
        P = batch.num_virtual_tokens
        seg = batch.target_seg
        start = batch.seg_start[seg]  # [N] first column of each target's segment
        upto = batch.target_col - start + 1  # [N] positions of its segment it sees (causal)
        # the longest segment bounds every target's reach: known on the host, no read-back (a sync)
        K = P + (batch.max_seg_len or int(upto.max()))
        base = batch.target_row * L
        cols = torch.arange(K, device=seg.device)[None, :]  # [1, K]
        own = base[:, None] + start[:, None] + (cols - P).clamp(min=0)  # segment part: start + (j - P)
        if P:
            prompt_start = batch.prompt_start[batch.seg_prompt[seg]]
            prompt = base[:, None] + prompt_start[:, None] + cols.clamp(max=P - 1)
            self.k_index = torch.where(cols < P, prompt, own)
        else:
            self.k_index = own
        self.k_index = self.k_index.clamp(max=R * L - 1)  # columns past a segment's end are masked below
        self.mask = (cols < P + upto[:, None])[:, None, None, :]  # [N, 1, 1, K]
        self.q_index = base + batch.target_col  # [N]


def _forward_at_targets(
    layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: _TargetKeys
) -> torch.Tensor:
    attn = layer.self_attn
    R, L, H = hidden.shape
    D = attn.head_dim
    N = keys.q_index.numel()
    flat = hidden.reshape(R * L, H)
    x = layer.input_layernorm(flat)
    cos, sin = cos.reshape(R * L, D), sin.reshape(R * L, D)  # from the batch's [R, L] position ids

    # Keys and values at every position (the targets' queries read them); queries at the targets only.
    k = attn.k_proj(x).view(R * L, -1, D)
    v = attn.v_proj(x).view(R * L, -1, D)
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    q = attn.q_proj(x.index_select(0, keys.q_index)).view(N, -1, D)
    q_cos, q_sin = cos.index_select(0, keys.q_index), sin.index_select(0, keys.q_index)
    q = q * q_cos[:, None] + rotate_half(q) * q_sin[:, None]

    Kn = keys.k_index.shape[1]
    out = F.scaled_dot_product_attention(
        q[:, :, None],  # [N, heads, 1, D]
        k.index_select(0, keys.k_index.view(-1)).view(N, Kn, -1, D).transpose(1, 2),
        v.index_select(0, keys.k_index.view(-1)).view(N, Kn, -1, D).transpose(1, 2),
        attn_mask=keys.mask,
        scale=attn.scaling,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    h = flat.index_select(0, keys.q_index) + attn.o_proj(out.reshape(N, -1))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return flat.index_copy(0, keys.q_index, h).view(R, L, H)


@contextlib.contextmanager
def last_layer_at_targets(decoder: torch.nn.Module, batch: MultiTaskBatch) -> Iterator[None]:
    """Within the block, `decoder`'s last layer computes its output at `batch`'s targets only."""
    layer = decoder.layers[decoder.config.num_hidden_layers - 1]
    keys = _TargetKeys(batch)

    def forward(hidden_states, *args, position_embeddings=None, **kwargs):
        cos, sin = position_embeddings
        return _forward_at_targets(layer, hidden_states, cos, sin, keys)

    layer.forward = forward  # an instance attribute shadows the class's forward for this call only
    try:
        yield
    finally:
        del layer.forward
