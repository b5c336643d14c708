"""2-process DeepSpeed ZeRO-3 (real deepspeed, gloo): evaluation decodes the same answers as 1 process.

Each rank holds half of the backbone and every forward all-gathers the weights it needs, so the
ranks must run the same forwards: evaluation decodes each rank's share of the examples in lockstep
waves through the server's runner, and a rank with nothing left runs a one-token forward per step
until every rank is done (`serving.offline`, `tuner.evaluate.generate_greedy`). Rank 1 gets fewer
examples than rank 0, so it idles while rank 0 decodes its second wave; a rank that skipped a
forward would hang or read another layer's weights. Once with no weight kept whole (persistence
threshold 0), once with the small ones kept whole after their first gather, as training runs, and a
training backward after the evaluation (a weight kept from a gather in inference mode could not be saved
for it).
"""

import json

import pytest
import torch

from bench.ranks import join_gloo, leave_gloo, run_ranks

pytestmark = pytest.mark.distributed

NEW_TOKENS, MAX_LEN, BATCH = 6, 64, 2


def _inputs():
    """Five examples (rank 0 decodes three in two waves, rank 1 two in one) and a task prompt."""
    from tuner.tasks.batching import TokenizedExample

    g = torch.Generator().manual_seed(0)
    examples = [
        TokenizedExample("t", torch.randint(20, 4000, (n,), generator=g).tolist(), [0])
        for n in (9, 4, 17, 6, 3)
    ]
    return examples, torch.randn(4, 32, generator=g) * 0.5


def _answers(backbone, backbone_dir: str) -> list[str]:
    from tuner.evaluate import generate_greedy
    from tuner.model.backbone import load_tokenizer
    from tuner.model.prompt_lm import PromptTunedLM

    examples, prompt = _inputs()
    tok = load_tokenizer(backbone_dir)
    return generate_greedy(PromptTunedLM(backbone), tok, examples, prompt, NEW_TOKENS, MAX_LEN, BATCH)


def _rank_main(rank: int, port: int, out: str, backbone_dir: str, persistence: int) -> None:
    from transformers.integrations import HfDeepSpeedConfig

    from tuner.model.prompt_lm import PromptTunedLM
    from tuner.model.zero import ZeroChoice, ZeroSettings, ZeroSetup, deepspeed_config, partitioned_numel
    from tuner.tasks.batching import collate

    torch.set_num_threads(1)
    join_gloo(rank, 2, port)
    settings = ZeroSettings(param_persistence_threshold=persistence)
    setup = ZeroSetup(
        ZeroChoice(3, 1, False, "test"),
        settings,
        HfDeepSpeedConfig(deepspeed_config(settings, torch.float32)),
    )
    backbone = setup.load(backbone_dir, torch.float32, "sdpa", torch.device("cpu"))
    local, total = partitioned_numel(backbone)
    answers = _answers(backbone, backbone_dir)
    # Training goes on after an evaluation: the weights it gathered must serve a backward too.
    examples, prompt = _inputs()
    prompts = prompt[None].clone().requires_grad_(True)
    PromptTunedLM(backbone)(
        collate(examples[rank::2], {"t": 0}, 4, max_len=MAX_LEN, pad_id=0), prompts
    ).loss.backward()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"answers": answers, "share": local / total, "grad": float(prompts.grad.norm())}, f)
    leave_gloo()  # the backward's prefetched gathers may still be in flight


@pytest.mark.parametrize("persistence", [0, 100_000], ids=["all-gathered", "small-weights-whole"])
def test_two_rank_zero3_evaluation_decodes_what_one_process_decodes(tiny_backbone_dir, persistence):
    args = (str(tiny_backbone_dir), persistence)
    ranks = run_ranks(_rank_main, 2, args, timeout_s=600, what="ZeRO-3 decoding")
    assert all(0.45 <= r["share"] <= 0.55 for r in ranks), ranks  # really partitioned
    assert all(0 < r["grad"] < float("inf") for r in ranks)

    from tuner.model.backbone import load_backbone

    alone = _answers(load_backbone(str(tiny_backbone_dir), torch.float32), str(tiny_backbone_dir))
    assert any(alone)
    assert ranks[0]["answers"] == ranks[1]["answers"] == alone  # every rank returns all answers, in order
