"""On a GPU: the serving engine's greedy output against a direct reference loop, and the CPU suite's
serving equivalences (a request in a mixed batch of many tasks == alone; prefix KV cache == recompute).

The engine is driven through its public API with token-id prompts (`bench.gpu_models.IdTokenizer`);
the backbone is a small random Llama at unit-scale init (well-separated greedy tokens, so fp32
results must agree exactly).
"""

import pytest
import torch

from bench.gpu_models import IdTokenizer
from bench.gpu_serve import make_engine, serve, write_store

pytestmark = pytest.mark.gpu
VOCAB, NEW = 256, 12


def _model(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # unit-scale init: greedy tokens depend on prompt and position
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5, generator=g)
        model.get_input_embeddings().weight.normal_(0.0, 1.0, generator=g)
    model = model.to("cuda", dtype).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    return model


def _requests(n_tasks: int, per_task: int):
    g = torch.Generator().manual_seed(4)
    return [
        (f"r{i}", f"task{i % n_tasks}", torch.randint(3, VOCAB, (3 + (7 * i) % 23,), generator=g).tolist())
        for i in range(n_tasks * per_task)
    ]


def _reference(model, prompt: torch.Tensor, ids: list[int]) -> list[int]:
    """Greedy decoding written out: full recompute over [soft prompt][ids][generated] each step."""
    out = []
    embed = model.get_input_embeddings()
    prompt = prompt.to("cuda", model.dtype)
    for _ in range(NEW):
        x = torch.cat([prompt, embed(torch.tensor(ids + out, device="cuda"))])[None]
        out.append(int(model(inputs_embeds=x).logits[0, -1].argmax()))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = _model()
    store = write_store(tmp_path_factory.mktemp("store"), model, 8, "tiny", num_virtual=5)
    return model, store


def test_served_greedy_output_equals_the_direct_reference(setup):
    from tuner.export import load_adapter

    model, store = setup
    reqs = _requests(8, 2)
    engine = make_engine(model, store, "tiny", "fp32", IdTokenizer(eos_token_id=None))
    got, _ = serve(engine, reqs, NEW)
    for rid, task, ids in reqs:
        assert got[rid] == _reference(model, load_adapter(store / task).prompt, ids), rid


def test_mixed_batch_of_many_tasks_equals_each_alone(setup):
    model, store = setup
    reqs = _requests(8, 3)
    engine = make_engine(model, store, "tiny", "fp32", IdTokenizer(eos_token_id=None))
    mixed, _ = serve(engine, reqs, NEW)
    for req in reqs[::5]:
        alone, _ = serve(engine, [req], NEW)
        assert alone[req[0]] == mixed[req[0]], req[0]


def test_prefix_cache_equals_recompute(setup):
    model, store = setup
    reqs = _requests(4, 3)
    cached, _ = serve(make_engine(model, store, "tiny", "fp32", IdTokenizer(eos_token_id=None)), reqs, NEW)
    engine = make_engine(model, store, "tiny", "fp32", IdTokenizer(eos_token_id=None), prefix_cache=False)
    recomputed, _ = serve(engine, reqs, NEW)
    assert cached == recomputed


def test_bf16_engine_on_cuda_serves_every_token_asked_for(setup):
    _, store = setup
    model = _model(torch.bfloat16)
    reqs = _requests(8, 4)
    engine = make_engine(model, store, "tiny", "bf16", IdTokenizer(eos_token_id=None))
    got, _ = serve(engine, reqs, NEW)
    assert all(len(v) == NEW for v in got.values())
    stats = engine.stats()
    assert stats["tokens_generated_total"] == NEW * len(reqs)
