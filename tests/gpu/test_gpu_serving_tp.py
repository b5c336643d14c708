"""On a machine with 2+ GPUs: a tensor-parallel replica of 2 ranks (NCCL, one GPU each) serves a mixed
batch of tasks with the single-GPU engine's greedy tokens. Skips cleanly with fewer than 2 GPUs.

The backbone is a small random Llama at unit-scale init (well-separated greedy tokens), saved as a
checkpoint directory that each rank loads its shard of; prompts are token ids (`IdTokenizer`).
"""

import asyncio

import pytest
import torch

from bench.gpu_models import CONFIGS, IdTokenizer, ids_text
from bench.gpu_serve import write_store

pytestmark = pytest.mark.gpu
NEW = 10


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_ranks_serve_like_one_gpu(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from serving.engine import Engine, EngineConfig
    from serving.types import GenerationRequest, SamplingParams

    torch.manual_seed(0)
    cfg = LlamaConfig(**CONFIGS["tiny"])  # 4 heads, 2 KV heads: 2 ranks divide them
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5, generator=g)
        model.get_input_embeddings().weight.normal_(0.0, 1.0, generator=g)
    backbone = tmp_path / "llama"
    model.save_pretrained(backbone)
    store = write_store(tmp_path / "store", model, 4, str(backbone))
    g = torch.Generator().manual_seed(4)
    prompts = [
        (f"r{i}", f"task{i % 4}", torch.randint(3, cfg.vocab_size, (3 + 5 * i,), generator=g).tolist())
        for i in range(8)
    ]

    def run(n: int) -> dict:
        engine = Engine(
            EngineConfig(
                backbone=str(backbone),
                prompt_store=str(store),
                dtype="fp32",
                device="cuda",
                tensor_parallel=n,
                reload_interval_s=3600.0,
            ),
            tokenizer=IdTokenizer(eos_token_id=None),
        )

        async def main():
            await engine.start()
            try:

                async def one(rid, task, ids):
                    req = GenerationRequest(rid, task, ids_text(ids), SamplingParams(max_tokens=NEW))
                    return rid, [t async for out in engine.generate(req) for t in out.token_ids]

                return dict(await asyncio.gather(*(one(*p) for p in prompts)))
            finally:
                await engine.stop()

        return asyncio.run(main())

    single, sharded = run(1), run(2)
    assert sharded == single and all(len(t) == NEW for t in single.values())
