"""Evaluation's greedy decoding: the server's path (ours) against Hugging Face `generate` in left-padded
batches (what evaluation used before issue 36), on real eval examples of decoded tasks.

For each task, on the same examples, the same prompt and the same backbone object:
* HF generate, batch 16: `generate(inputs_embeds=[pad][prompt][text], attention_mask)`, greedy, the
  task's stop strings (the previous `tuner.evaluate.generate_greedy`, kept here as the baseline),
* ours, batch 16 and batch 1: `tuner.evaluate.generate_greedy` (the server's scheduler, runner and
  output path through `serving.offline`).
Each is run twice, in rotating order; the table shows the median wall time, examples/s, and how many
answers equal ours at batch 1 (the text a served request gets: the integration tests check that
equality against the engine itself).

The prompt is 16 virtual tokens drawn from the embedding table (seeded): this measures decoding, not
a tuned task's quality. fp32, SDPA, `--threads` torch threads.

    python -m bench.eval_generation [--tasks samsum,conll2003_ner] [--examples 32] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from bench.common import REPO, machine_info, markdown_table, write_result
from tuner.evaluate import cut_at_stop, generate_greedy
from tuner.model.backbone import load_backbone, load_tokenizer
from tuner.model.model_cache import resolve_backbone
from tuner.model.prompt_lm import PromptTunedLM
from tuner.tasks.data import TaskData
from tuner.tasks.spec import TaskSpec
from tuner.tasks.stops import find_stop

MAX_LEN = 512  # model.max_seq_len of the runs (the input cut: MAX_LEN - P - max_new_tokens)


class _Stops(StoppingCriteria):
    """A row is done once its decoded answer holds a stop string (whitespace before it never stops it);
    `generate(inputs_embeds=...)` hands over only the generated tokens."""

    def __init__(self, tokenizer, stop):
        self.tokenizer, self.stop = tokenizer, list(stop)

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        return torch.tensor([find_stop(t, self.stop) >= 0 for t in texts], device=input_ids.device)


def hf_generate(lm, tokenizer, examples, prompt, max_new_tokens, stop, batch_size=16) -> list[str]:
    """The baseline: left-padded batches through `generate` with the prompt before each text."""
    P, texts = prompt.shape[0], []
    for at in range(0, len(examples), batch_size):
        seqs = [e.input_ids[-(MAX_LEN - P - max_new_tokens) :] for e in examples[at : at + batch_size]]
        width = P + max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        emb_rows = []
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) - P :] = 1
        emb = lm.embed(ids)
        for i, s in enumerate(seqs):
            start = width - len(s) - P
            row = emb[i].clone()
            row[start : start + P] = prompt.to(row.dtype)
            emb_rows.append(row)
        out = lm.backbone.generate(
            inputs_embeds=torch.stack(emb_rows),
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([_Stops(tokenizer, stop)] if stop else []),
        )
        texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    return [cut_at_stop(t, stop) for t in texts]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tasks", default="samsum,conll2003_ner", help="task configs (configs/tasks/NAME.yaml)"
    )
    parser.add_argument("--examples", type=int, default=32, help="eval examples per task")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 examples, nothing recorded")
    args = parser.parse_args(argv)
    n = 4 if args.quick else args.examples
    torch.set_num_threads(args.threads)
    path = resolve_backbone("smollm2-135m")
    model, tok = load_backbone(path, torch.float32), load_tokenizer(path)
    lm = PromptTunedLM(model)
    embed = model.get_input_embeddings().weight
    prompt = embed[torch.randint(100, embed.shape[0], (16,), generator=torch.Generator().manual_seed(0))]
    prompt = prompt.detach().clone()
    methods = {
        "HF generate, batch 16": lambda ex, spec: hf_generate(
            lm, tok, ex, prompt, args.max_new_tokens, spec.stop
        ),
        "ours, batch 16": lambda ex, spec: generate_greedy(
            lm, tok, ex, prompt, args.max_new_tokens, MAX_LEN, batch_size=16, stop=spec.stop
        ),
        "ours, batch 1": lambda ex, spec: generate_greedy(
            lm, tok, ex, prompt, args.max_new_tokens, MAX_LEN, batch_size=1, stop=spec.stop
        ),
    }
    result: dict = {"machine": machine_info(), "args": vars(args), "tasks": {}}
    rows = []
    for name in args.tasks.split(","):
        spec = TaskSpec.load(REPO / "configs" / "tasks" / f"{name}.yaml")
        examples = TaskData.load(spec, tok, need_train=False, max_eval=n).eval[:n]
        times: dict[str, list[float]] = {m: [] for m in methods}
        answers: dict[str, list[str]] = {}
        order = list(methods)
        with torch.inference_mode():
            for rep in range(2):
                for m in order[rep:] + order[:rep]:
                    t0 = time.perf_counter()
                    answers[m] = methods[m](examples, spec)
                    times[m].append(time.perf_counter() - t0)
                    print(f"  {name}: {m}: {times[m][-1]:.1f} s", flush=True)
        served = answers["ours, batch 1"]
        task = {}
        for m in methods:
            wall = statistics.median(times[m])
            same = sum(a == b for a, b in zip(answers[m], served))
            task[m] = {"wall_s": times[m], "examples_per_s": n / wall, "same_as_served": same}
            rows.append([name, m, wall, n / wall, f"{same}/{n}"])
        task["examples"] = n
        task["differing"] = [
            {"hf": a, "served": b} for a, b in zip(answers["HF generate, batch 16"], served) if a != b
        ][:5]
        result["tasks"][name] = task
    print(f"machine: {result['machine']['cpu']}, {args.threads} threads, fp32")
    print(markdown_table(["task", "method", "median s", "examples/s", "answers = served (batch 1)"], rows))
    write_result("eval_generation", result, args.quick)
    return result


if __name__ == "__main__":
    main()
