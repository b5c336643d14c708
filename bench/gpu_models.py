"""What the GPU run needs that cannot travel there: backbones, a tokenizer stand-in and task data.

The GPU machine has no SmolLM2 weights, no datasets and no network, so:

* `llama(name, dtype, device)` builds a randomly initialised Llama of a named config: `smollm2-135m`
  (the values of SmolLM2-135M's config.json, embedded here) or `llama-1b` (a ~1.1B Llama,
  TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads, 4 KV heads). Speed does not depend on
  weight values; equivalence tests compare implementations on the same random weights.
* `IdTokenizer` turns a prompt string of space-separated token ids into those ids (and back), so the
  serving engine can be driven with exact token-id prompts without any tokenizer files.
* `task_mix(n, seed)` synthesises tokenised examples of three tasks whose input lengths follow
  SST-2, AG News and TREC (SmolLM2 tokens with the task templates, measured here on 2,000
  training examples of each through `tuner.tasks.data.TaskData`: median 14 / 46 / 17, standard
  deviation 9.4 / 19.5 / 4.7) and whose targets are one verbaliser token.

Nothing here measures anything (see `bench.gpu_train`, `bench.gpu_serve`).
"""

from __future__ import annotations

import torch

from tuner.tasks.batching import TokenizedExample

CONFIGS = {
    # a few-MB Llama for CPU smoke runs of the benchmark code (never measured)
    "tiny": dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json)
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # ~1.1B parameters (TinyLlama-1.1B's shape), SmolLM2's vocabulary
    "llama-1b": dict(
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json): 8,030,261,248 parameters
    "llama-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}

# (median, spread) of input lengths in tokens, template included, and the number of label words.
TASK_LENGTHS = {"sst2": (14, 9.4, 2), "ag_news": (46, 19.5, 4), "trec": (17, 4.7, 6)}


def llama(name: str, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", seed: int = 0):
    """A frozen, randomly initialised LlamaForCausalLM of config `name` (see `CONFIGS`), eval mode.

    The weights are created on `device` in `dtype` (`device="meta"`: shapes only, no memory)."""
    from transformers import LlamaForCausalLM

    config = llama_config(name)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are born in `dtype`: no fp32 copy of an 8B model
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.to(dtype)  # float buffers too (rotary inv_freq), as the 1.1B and 135M runs always had them
    model.requires_grad_(False)
    return model.eval()


def llama_config(name: str):
    """The transformers `LlamaConfig` of `CONFIGS[name]` (SDPA attention, SmolLM2's special ids)."""
    from transformers import LlamaConfig

    cfg = CONFIGS[name]
    return LlamaConfig(
        **{k: v for k, v in cfg.items() if k != "rope_theta"},
        rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        attn_implementation="sdpa",
    )


class IdTokenizer:
    """Prompts are space-separated token ids ("5 17 301"); decode writes ids back the same way.

    `eos_token_id=None`: nothing ends a generation but its token limit (benchmarks)."""

    pad_token_id = 2

    def __init__(self, eos_token_id: int | None = 2):
        self.eos_token_id = eos_token_id

    class _Encoding:
        def __init__(self, ids: list[int]):
            self.input_ids = ids

    def __call__(self, text: str, add_special_tokens: bool = False):
        return self._Encoding([int(t) for t in text.split()])

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self(text).input_ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f" {int(i)}" for i in ids)


def ids_text(ids: list[int]) -> str:
    return " ".join(str(i) for i in ids)


def task_mix(n: int, seed: int = 0, vocab: int = 49152) -> list[TokenizedExample]:
    """`n` examples, tasks round-robin, lengths ~ N(median, spread) clipped to [3, 4 x median]."""
    g = torch.Generator().manual_seed(seed)
    names = list(TASK_LENGTHS)
    out = []
    for i in range(n):
        task = names[i % len(names)]
        median, spread, labels = TASK_LENGTHS[task]
        length = int(torch.randn((), generator=g) * spread + median)
        length = max(3, min(4 * median, length))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        label = 1000 + int(torch.randint(0, labels, (), generator=g))
        out.append(TokenizedExample(task, ids, [label], uid=i))
    return out
