"""Evaluation scores each example where it is, whatever order packing put the segments in; generation
stops where the task says (never at leading whitespace) and scores against every reference."""

import pytest
import torch
from conftest import smollm2_tokenizer_dir, tiny_llama

from serving.detokenizer import IncrementalText
from tuner.evaluate import (
    cut_at_stop,
    generate_greedy,
    mean_label_nll,
    mean_target_loss,
    score_labels,
    target_losses,
)
from tuner.model.backbone import load_tokenizer
from tuner.model.prompt_lm import PromptTunedLM
from tuner.scores import classification_metrics, generation_metrics
from tuner.tasks.batching import TokenizedExample
from tuner.tasks.spec import TaskSpec


@pytest.mark.parametrize(
    "verbaliser", [{"0": " no", "1": " yes"}, {"0": " very negative", "1": " quite positive"}]
)
def test_packed_scores_equal_one_at_a_time(verbaliser):
    """Single-token labels take the fast path (one segment per example), multi-token ones the per-label path."""
    tok = load_tokenizer(smollm2_tokenizer_dir())
    lm = PromptTunedLM(tiny_llama(vocab_size=49152))
    g = torch.Generator().manual_seed(0)
    # lengths chosen so that packing reorders the segments (longest first)
    examples = [
        TokenizedExample("t", torch.randint(10, 4000, (n,), generator=g).tolist(), [0])
        for n in (3, 17, 8, 30, 5)
    ]
    prompt = torch.randn(4, 32, generator=g)
    batched = score_labels(lm, tok, examples, verbaliser, prompt, max_len=64, batch_size=8)
    for ex, scores in zip(examples, batched):
        alone = score_labels(lm, tok, [ex], verbaliser, prompt, max_len=64, batch_size=1)[0]
        assert scores == pytest.approx(alone, abs=1e-4)


def test_scoring_builds_no_autograd_graph():
    """Evaluation is inference: with a prompt that requires grad, no forward of it records a graph."""
    tok = load_tokenizer(smollm2_tokenizer_dir())
    lm = PromptTunedLM(tiny_llama(vocab_size=49152))
    seen = []
    lm.register_forward_hook(lambda mod, args, out: seen.append(torch.is_grad_enabled()))
    prompt = torch.randn(4, 32, requires_grad=True)
    ex = [TokenizedExample("t", [11, 12, 13], [0])]
    for verbaliser in ({"0": " no", "1": " yes"}, {"0": " very negative", "1": " quite positive"}):
        score_labels(lm, tok, ex, verbaliser, prompt, max_len=64)
    target_losses(lm, [TokenizedExample("t", [11, 12], [13, 14])], {"p": prompt}, max_len=64, pad_id=0)
    assert seen and not any(seen), seen


def test_mean_target_loss_equals_a_direct_computation():
    """Several prompts per forward (chunks mix them and packing reorders segments) give each prompt the mean
    over examples of its token-mean target NLL, computed here with a plain forward per (prompt, example)."""
    torch.manual_seed(0)
    lm = PromptTunedLM(tiny_llama())
    g = torch.Generator().manual_seed(1)
    examples = [
        TokenizedExample(
            "t",
            torch.randint(3, 120, (n,), generator=g).tolist(),
            torch.randint(3, 120, (k,), generator=g).tolist(),
        )
        for n, k in ((3, 1), (17, 4), (8, 2), (30, 1), (5, 6))
    ]
    prompts = {name: torch.randn(4, 32, generator=g) * 0.1 for name in ("v0", "v1", "v2")}
    got = mean_target_loss(lm, examples, prompts, max_len=64, pad_id=0, batch_size=4)
    each = target_losses(lm, examples, prompts, max_len=64, pad_id=0, batch_size=4)

    def direct(prompt, ex) -> float:
        ids = torch.tensor(ex.input_ids + ex.target_ids[:-1])
        emb = torch.cat([prompt, lm.embed(ids[None])[0]])[None]
        logits = lm.backbone(inputs_embeds=emb).logits[0]
        start = prompt.shape[0] + len(ex.input_ids) - 1
        return torch.nn.functional.cross_entropy(
            logits[start : start + len(ex.target_ids)], torch.tensor(ex.target_ids)
        ).item()

    with torch.no_grad():
        for name, prompt in prompts.items():
            per = [direct(prompt, ex) for ex in examples]
            assert each[name] == pytest.approx(per, rel=1e-5)  # example by example, in their order
            assert got[name] == pytest.approx(sum(per) / len(per), rel=1e-5)
    assert len(set(got.values())) == 3  # each prompt scored with its own embeddings


@pytest.mark.parametrize(
    "verbaliser",
    [
        {"a": " no", "b": " yes", "c": " maybe"},
        {"a": " very negative", "b": " quite positive", "c": " so so"},
    ],
)
def test_mean_label_nll_equals_a_direct_computation(verbaliser):
    """The rung criterion of classification tasks: minus the log-probability of the gold label among the
    labels (each label's verbaliser tokens teacher-forced after the example, their log-probabilities summed,
    renormalised over the labels), averaged over examples; here with a plain forward per (example, label)."""
    tok = load_tokenizer(smollm2_tokenizer_dir())
    torch.manual_seed(0)
    lm = PromptTunedLM(tiny_llama(vocab_size=49152))
    g = torch.Generator().manual_seed(2)
    examples = [
        TokenizedExample("t", torch.randint(10, 4000, (n,), generator=g).tolist(), [0], label=gold)
        for n, gold in ((3, "a"), (17, "c"), (8, "b"), (30, "a"), (5, "b"))
    ]
    prompt = torch.randn(4, 32, generator=g)
    got = mean_label_nll(lm, tok, examples, verbaliser, prompt, max_len=64, batch_size=2)

    def label_logp(ex, word) -> float:
        target = tok(word, add_special_tokens=False).input_ids
        ids = torch.tensor(ex.input_ids + target[:-1])
        logits = lm.backbone(inputs_embeds=torch.cat([prompt, lm.embed(ids[None])[0]])[None]).logits[0]
        start = prompt.shape[0] + len(ex.input_ids) - 1
        logp = torch.log_softmax(logits[start : start + len(target)].double(), dim=-1)
        return sum(logp[i, t].item() for i, t in enumerate(target))

    with torch.no_grad():
        want = 0.0
        for ex in examples:
            per = {lab: label_logp(ex, w) for lab, w in verbaliser.items()}
            norm = torch.logsumexp(torch.tensor(list(per.values()), dtype=torch.float64), 0).item()
            want += norm - per[ex.label]
    assert got == pytest.approx(want / len(examples), rel=1e-4)


def test_classification_metrics():
    m = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert m["accuracy"] == 0.75
    # `predicted`: how many examples were given the label (the collapse warning reads it)
    assert m["per_label"]["a"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "support": 2,
        "predicted": 1,
    }
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


# ------------------------------------------------------------------------------------ generation


def test_a_leading_newline_is_not_a_stop():
    """SAMSum zero-shot: the backbone's first token is a newline; the answer is the line after it."""
    from conftest import REPO

    stop = TaskSpec.load(REPO / "configs/tasks/samsum.yaml").stop
    generated = "\nAmanda baked cookies and will bring Jerry some tomorrow.\n\nDialogue:\nTom: hi"
    assert cut_at_stop(generated, stop) == "Amanda baked cookies and will bring Jerry some tomorrow."
    assert cut_at_stop(" \n\n  Hallo Welt\nEnglish:", ["\n"]) == "Hallo Welt"
    assert cut_at_stop("a; b. c", [".", ";"]) == "a"  # the earliest stop wins
    assert cut_at_stop("\n two lines\nkept", []) == "two lines\nkept"  # default: end of sequence only
    m = generation_metrics(["Amanda baked cookies."], [cut_at_stop(generated, stop)])
    assert m["chrf"] > 30 and m["rouge_l"] > 40


def test_stop_strings_end_a_row_only_after_its_answer_started():
    tok = load_tokenizer(smollm2_tokenizer_dir())
    ids = tok("\nHello world\nNext", add_special_tokens=False).input_ids
    text = IncrementalText(lambda t: tok.decode(t, skip_special_tokens=True), task_stop=["\n"])
    done = []  # the output path evaluation decodes through (`serving.offline`): stopped after each token
    for t in ids:
        text.append(t)
        done.append(text.stopped)
    text_done = ["\n" in tok.decode(ids[:n]).lstrip() for n in range(1, len(ids) + 1)]
    assert done == text_done and not done[0] and done[-1]


def test_generation_with_stop_equals_the_full_generation_cut():
    """Stopping early changes nothing before the stop: greedy decoding is the same, only shorter."""
    tok = load_tokenizer(smollm2_tokenizer_dir())
    lm = PromptTunedLM(tiny_llama(vocab_size=49152))
    g = torch.Generator().manual_seed(0)
    examples = [
        TokenizedExample("t", torch.randint(10, 4000, (n,), generator=g).tolist(), [0]) for n in (5, 9, 3)
    ]
    prompt = torch.randn(4, 32, generator=g)
    full = generate_greedy(lm, tok, examples, prompt, max_new_tokens=12, max_len=64, batch_size=2)
    assert all(full)
    stop = full[0][2]  # a character the first answer really contains after its start
    stopped = generate_greedy(
        lm, tok, examples, prompt, max_new_tokens=12, max_len=64, batch_size=2, stop=[stop]
    )
    assert stopped == [cut_at_stop(h, [stop]) for h in full]
    assert len(stopped[0]) < len(full[0])


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _rouge_l(ref: str, hyp: str) -> float:
    r, h = ref.lower().split(), hyp.lower().split()
    lcs = _lcs(r, h)
    return 0.0 if not lcs else 2 * (lcs / len(h)) * (lcs / len(r)) / (lcs / len(h) + lcs / len(r))


def test_generation_metrics_with_several_references():
    # words that stemming leaves alone, so the direct LCS computation below needs no stemmer
    refs = [["the cat sat on the mat", "a cat was on a mat"], ["tom will call back", "tom calls later"]]
    hyps = ["a cat sat on a mat", "tom calls later"]
    m = generation_metrics(refs, hyps)
    direct = [max(_rouge_l(r, h) for r in rs) for rs, h in zip(refs, hyps)]
    assert m["rouge_l"] == pytest.approx(100 * sum(direct) / 2)
    assert m["exact_match"] == 0.5  # the second hypothesis equals one of its references
    # one example: the multi-reference chrF is the best single-reference chrF
    one = [generation_metrics([r], [hyps[0]])["chrf"] for r in refs[0]]
    assert generation_metrics([refs[0]], [hyps[0]])["chrf"] == pytest.approx(max(one))
    assert generation_metrics(["x y"], ["x y"]) == generation_metrics([["x y"]], ["x y"])


def test_mixed_task_scores_equal_a_direct_computation_per_task():
    """Examples of many tasks in one call (rows mix tasks; each task its own prompt and verbaliser, some
    one-token labels, some multi-token, label counts differ) score as a plain forward of each example
    with its own task's prompt prepended."""
    from tuner.evaluate import score_labels_of_tasks

    tok = load_tokenizer(smollm2_tokenizer_dir())
    torch.manual_seed(0)
    lm = PromptTunedLM(tiny_llama(vocab_size=49152))
    g = torch.Generator().manual_seed(3)
    verbalisers = {
        "a": {"0": " no", "1": " yes"},
        "b": {"x": " red", "y": " blue", "z": " green"},
        "c": {"0": " very negative", "1": " quite positive"},
        "d": {"0": " no", "1": " yes"},
    }
    prompts = {t: torch.randn(4, 32, generator=g) for t in verbalisers}
    examples = [
        TokenizedExample(t, torch.randint(10, 4000, (n,), generator=g).tolist(), [0])
        for t, n in (("a", 3), ("b", 17), ("c", 8), ("d", 30), ("b", 5), ("a", 12), ("c", 2), ("d", 9))
    ]
    got = score_labels_of_tasks(lm, tok, examples, verbalisers, prompts, max_len=64, batch_size=3)

    def label_logp(prompt, ex, word) -> float:
        target = tok(word, add_special_tokens=False).input_ids
        ids = torch.tensor(ex.input_ids + target[:-1])
        emb = lm.embed(ids[None])[0] if prompt is None else torch.cat([prompt, lm.embed(ids[None])[0]])
        logits = lm.backbone(inputs_embeds=emb[None]).logits[0]
        start = (0 if prompt is None else prompt.shape[0]) + len(ex.input_ids) - 1
        logp = torch.log_softmax(logits[start : start + len(target)], dim=-1)
        return sum(logp[i, t].item() for i, t in enumerate(target))

    with torch.no_grad():
        for ex, scores in zip(examples, got):
            want = {lab: label_logp(prompts[ex.task], ex, w) for lab, w in verbalisers[ex.task].items()}
            assert scores == pytest.approx(want, abs=1e-4)
        zero = score_labels_of_tasks(lm, tok, examples, verbalisers, None, max_len=64, batch_size=3)
        for ex, scores in zip(examples, zero):
            want = {lab: label_logp(None, ex, w) for lab, w in verbalisers[ex.task].items()}
            assert scores == pytest.approx(want, abs=1e-4)


def test_a_fleet_evaluates_as_its_tasks_one_at_a_time(tmp_path):
    """`evaluate_tasks` (every classification task's examples packed together) gives each task the scores,
    report and predictions `evaluate_task` gives it alone; generation tasks keep their own path."""
    from conftest import write_generation_task, write_tiny_tasks

    from tuner.tasks.data import TaskData
    from tuner.tasks.kinds import evaluate_task, evaluate_tasks

    tok = load_tokenizer(smollm2_tokenizer_dir())
    torch.manual_seed(0)
    lm = PromptTunedLM(tiny_llama(vocab_size=49152))
    specs = [
        TaskSpec.load(p)
        for p in write_tiny_tasks(tmp_path, n_train=4, n_eval=5, names=("pos_neg", "colors", "sizes"))
    ]
    specs.append(TaskSpec.load(write_generation_task(tmp_path)))
    specs[-1].max_new_tokens = 3
    tasks = {s.name: TaskData.load(s, tok, max_eval=4) for s in specs}
    g = torch.Generator().manual_seed(4)
    prompts = {n: torch.randn(4, 32, generator=g) for n in tasks}
    seen = []
    together = evaluate_tasks(lm, tok, tasks, prompts, 64, batch_size=4, progress=seen.append)
    assert list(together) == list(tasks) and sum(seen) == sum(len(t.eval) for t in tasks.values())
    for name, data in tasks.items():
        alone = evaluate_task(lm, tok, data, prompts[name], 64, batch_size=4)
        assert together[name].to_json() == alone.to_json()  # metrics, per-label table, samples
        assert [p["output"] for p in together[name].predictions] == [p["output"] for p in alone.predictions]
        for mine, theirs in zip(together[name].predictions, alone.predictions):
            assert mine["scores"] == pytest.approx(theirs["scores"], abs=1e-4)
