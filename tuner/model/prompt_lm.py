"""The model wrapper: a frozen causal LM whose every segment sees its own task's soft prompt.

`PromptTunedLM.forward(batch, prompts)` embeds the batch's tokens, writes the task prompts into
the batch's virtual-token slots (`inputs_embeds`), runs the decoder with the batch's positions and
attention layout (see `tuner.tasks.batching`: segments of one task may share a prompt copy), gathers the
hidden states at target positions only and applies the LM head to those alone. The vocabulary
projection is one of the largest matmuls; a classification example needs it at one or two
positions out of dozens.

It holds no trainable parameters: prompts arrive as a tensor (rows from `PromptBank.gather`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tuner.model import attention, target_layer
from tuner.tasks.batching import MultiTaskBatch


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: sum over segments of mean loss x seg_weight
    seg_loss: torch.Tensor  # [S] per-segment mean target NLL (detached)
    seg_logprob: torch.Tensor  # [S] per-segment summed target log-prob (detached)
    target_logits: torch.Tensor | None = None  # [N, V] when asked for


class PromptTunedLM(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, kernel: str | None = None):
        """`kernel`: the packed-attention kernel (`tuner.model.attention.KERNELS`); None follows the
        backbone's attention implementation (eager -> eager, else auto for the device)."""
        super().__init__()
        if kernel is not None and kernel not in attention.KERNELS:
            raise ValueError(
                f"unknown attention kernel {kernel!r}; expected one of {', '.join(attention.KERNELS)}"
            )
        self.kernel = kernel
        self.backbone = backbone
        self.decoder = getattr(backbone, backbone.base_model_prefix)
        self.embed = backbone.get_input_embeddings()
        self.lm_head = backbone.get_output_embeddings()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def attn_implementation(self) -> str:
        return self.backbone.config._attn_implementation

    @property
    def supports_shared_prompts(self) -> bool:
        """Every packed kernel of `tuner.model.attention` runs the shared-prompt layout."""
        return True

    def kernel_for(self, device: torch.device) -> str:
        """The packed-attention kernel this model runs on `device` (see `tuner.model.attention.pick_kernel`)."""
        requested = self.kernel
        if requested is None:
            impl = self.attn_implementation
            requested = impl if impl in ("eager", "flash_attention_2") else "auto"
        return attention.pick_kernel(requested, device)

    def embed_with_prompts(self, batch: MultiTaskBatch, prompts: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the prompt copies written into their virtual-token slots.

        Args:
            prompts: [U, P, H] prompt rows (fp32 master values; cast to the backbone dtype here);
                prompt copy g holds row `batch.prompt_task[g]`.
        """
        embeds = self.embed(batch.input_ids)
        P = batch.num_virtual_tokens
        if P == 0 or batch.num_prompts == 0:
            return embeds
        cols = batch.prompt_start[:, None] + torch.arange(P, device=embeds.device)[None, :]  # [G, P]
        rows = batch.prompt_row[:, None].expand_as(cols)
        # index_put (not in-place on the embedding output) keeps the prompt in the autograd graph.
        return embeds.index_put(
            (rows.reshape(-1), cols.reshape(-1)),
            prompts[batch.prompt_task].to(embeds.dtype).reshape(-1, embeds.shape[-1]),
        )

    def hidden_states(
        self, batch: MultiTaskBatch, prompts: torch.Tensor, *, targets_only: bool = False
    ) -> torch.Tensor:
        """Final hidden states [R, L, H]. `targets_only`: the last layer runs at the target positions
        alone (see `tuner.model.target_layer`), so only those positions hold valid states."""
        embeds = self.embed_with_prompts(batch, prompts)
        if targets_only and batch.target_row.numel() and target_layer.supports(self.decoder):
            with target_layer.last_layer_at_targets(self.decoder, batch):
                return self._decode(batch, embeds)
        return self._decode(batch, embeds)

    def _decode(self, batch: MultiTaskBatch, embeds: torch.Tensor) -> torch.Tensor:
        # Every layout goes through the one dispatch point: each span sees only its prompt copy
        # and, causally, itself (exact for every kernel; see tuner.model.attention).
        return attention.decode(self.decoder, batch, embeds, self.kernel_for(embeds.device))

    def target_logits(self, hidden: torch.Tensor, batch: MultiTaskBatch) -> torch.Tensor:
        """[N, V] fp32 logits at the positions that predict a target: the LM head runs there only."""
        return self.lm_head(hidden[batch.target_row, batch.target_col]).float()

    def forward(
        self,
        batch: MultiTaskBatch,
        prompts: torch.Tensor,
        *,
        seg_weight: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> LossOutput:
        """Per-segment target NLL; `loss` = sum over segments of their mean NLL x `seg_weight` (default 1)."""
        logits = self.target_logits(self.hidden_states(batch, prompts, targets_only=True), batch)
        nll = F.cross_entropy(logits, batch.target_ids, reduction="none")
        S = batch.num_segments
        seg_sum = torch.zeros(S, device=nll.device, dtype=nll.dtype).index_add(0, batch.target_seg, nll)
        # index_add, not bincount: bincount sizes its output from the data, a read-back on CUDA
        count = torch.zeros_like(seg_sum).index_add(0, batch.target_seg, torch.ones_like(nll)).clamp(min=1)
        seg_mean = seg_sum / count
        return LossOutput(
            loss=(seg_mean if seg_weight is None else seg_mean * seg_weight).sum(),
            seg_loss=seg_mean.detach(),
            seg_logprob=-seg_sum.detach(),
            target_logits=logits.detach() if return_logits else None,
        )
