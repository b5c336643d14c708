"""What the training benchmarks share: the real recipe set up on real tasks, the PEFT baseline, timing.

* `bench_config` + `setup_recipe`: the tuner's own `MultiTaskPromptTuningRecipe` on SST-2, AG News
  and TREC (fp32, SDPA, one process), set up exactly as `promptfleet train --no-ray` would.
  Benchmarks then call the recipe's own `train_step(global_batch)` with batches drawn once by its
  sampler (`draw_batches`), so that every method in a comparison sees the same global batches.
* `PeftPromptTuning`: the baseline, Hugging Face PEFT prompt tuning (`PromptTuningConfig`) on the
  *same* backbone object, with one adapter per task and a plain PyTorch loop. PEFT puts one prompt
  in a batch, so a global step becomes one padded batch per task (the usual causal-LM collator:
  right padding, labels -100 off-target), forward with labels (PEFT's full-vocabulary loss),
  backward, then one `torch.optim.AdamW` step.
* `machine_info`, `write_result`, `markdown_table`, `points`: what every result records and how.

It does not time anything itself, nor decide what is compared: each benchmark module does.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from tuner.config import JobConfig, from_dict
from tuner.recipe import MultiTaskPromptTuningRecipe
from tuner.tasks.batching import TokenizedExample, segment_layout

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TASK_FILES = [str(REPO / "configs" / "tasks" / f"{t}.yaml") for t in ("sst2", "ag_news", "trec")]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bench_config(
    name: str,
    *,
    batch_size: int,
    max_steps: int,
    max_seq_len: int = 160,
    num_virtual_tokens: int = 16,
    max_train: int = 4000,
    max_eval: int = 200,
    lr: float = 0.03,
    warmup: int = 4,
    tasks: list[str] | None = None,
) -> JobConfig:
    """A single-process job (fp32 and SDPA, the fair pair on this CPU) on `tasks` (task YAML paths;
    default the three real tasks SST-2, AG News, TREC)."""
    return from_dict(
        JobConfig,
        {
            "name": name,
            "output_dir": tempfile.mkdtemp(prefix="promptfleet-bench-"),
            "tasks": tasks or TASK_FILES,
            "model": {
                "name": "smollm2-135m",
                "dtype": "fp32",
                "attn_implementation": "sdpa",
                "max_seq_len": max_seq_len,
            },
            "prompt": {"num_virtual_tokens": num_virtual_tokens, "init": "class_labels"},
            "optim": {"lr": lr, "batch_size": batch_size, "max_steps": max_steps, "warmup_steps": warmup},
            "data": {"max_train_examples": max_train, "max_eval_examples": max_eval, "packing": True},
            "cluster": {"num_workers": 1, "zero_stage": 0},
            "eval_every": 0,
            "checkpoint_every": 0,
            "eval_zero_shot": False,
        },
    )


def setup_recipe(cfg: JobConfig, progress: bool = False) -> MultiTaskPromptTuningRecipe:
    recipe = MultiTaskPromptTuningRecipe(cfg, progress=progress)
    recipe.setup()
    return recipe


def draw_batches(recipe: MultiTaskPromptTuningRecipe, steps: int) -> list[list[tuple[str, int]]]:
    """The recipe's own sampler draws for `steps` steps (the sampler is left where it was)."""
    state = recipe.sampler.state_dict()
    batches = [recipe.sampler.next_batch() for _ in range(steps)]
    recipe.sampler.load_state_dict(state)
    return batches


def examples_by_task(
    recipe: MultiTaskPromptTuningRecipe, draw: list[tuple[str, int]]
) -> dict[str, list[TokenizedExample]]:
    out: dict[str, list[TokenizedExample]] = defaultdict(list)
    for task, i in draw:
        out[task].append(recipe.tasks[task].train[i])
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------ PEFT baseline


class PeftPromptTuning:
    """PEFT prompt tuning, one adapter per task on one shared frozen backbone, trained by AdamW.

    Adapters of one `PeftModel` on one backbone are independent soft prompts: a task's prompt only
    ever sees its own task's batches, and AdamW state is per parameter (a task absent from a step
    has no gradient and is skipped), so this is exactly one PeftModel per task without holding the
    backbone several times. Gradients are clipped per task, as each model would be alone.
    """

    def __init__(
        self,
        backbone,
        tasks: list[str],
        initial_prompts: dict[str, torch.Tensor],
        *,
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        grad_clip: float = 1.0,
    ):
        from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        P = next(iter(initial_prompts.values())).shape[0]
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, prompt_tuning_init=PromptTuningInit.RANDOM
        )
        self.model = get_peft_model(backbone, config, adapter_name=tasks[0])
        for t in tasks[1:]:
            self.model.add_adapter(t, config)
        with torch.no_grad():  # start from the same prompts as ours (the tuner's class-label init)
            for t in tasks:
                self.param(t).copy_(initial_prompts[t])
        self.num_virtual_tokens, self.grad_clip = P, grad_clip
        self.optimizer = torch.optim.AdamW(
            [self.param(t) for t in tasks], lr=lr, betas=betas, eps=eps, weight_decay=0.0
        )

    def param(self, task: str) -> torch.nn.Parameter:
        return self.model.prompt_encoder[task].embedding.weight

    def prompt(self, task: str) -> torch.Tensor:
        return self.param(task).detach().clone()

    def collate(self, examples: list[TokenizedExample], max_len: int, pad_id: int) -> tuple[dict, int]:
        """The usual causal-LM collator: input + target, right-padded; labels only on the target.

        Inputs are cut exactly as ours cuts them (`segment_layout`), so both see the same tokens.
        Returns the model kwargs and the number of text (non-padding) tokens.
        """
        seqs, labels = [], []
        for ex in examples:
            inp, tgt = segment_layout(ex, self.num_virtual_tokens, max_len)
            seqs.append(inp + tgt)
            labels.append([-100] * len(inp) + tgt)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, y) in enumerate(zip(seqs, labels)):
            ids[i, : len(s)], lab[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(y), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}, sum(len(s) for s in seqs)

    def step(self, by_task: dict[str, list[TokenizedExample]], lr: float, max_len: int, pad_id: int) -> dict:
        """One optimiser step: a padded batch per task, forward with labels, backward, one AdamW step."""
        tokens, positions, losses = 0, 0, {}
        for task, examples in by_task.items():
            self.model.set_adapter(task)
            kwargs, n = self.collate(examples, max_len, pad_id)
            out = self.model(**kwargs)
            out.loss.backward()
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([self.param(task)], self.grad_clip)
            tokens += n
            positions += kwargs["input_ids"].numel() + len(examples) * self.num_virtual_tokens
            losses[task] = out.loss.item()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"tokens": tokens, "positions": positions, "task_loss": losses}


# ------------------------------------------------------------------------------------ recording


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "amx": bool(amx),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


PERCENT_METRICS = frozenset({"chrf", "rouge_l"})  # sacrebleu / rouge report these on 0-100 already


def points(metric: str, value: float) -> float:
    """A task's score in points (0-100): metrics on 0-1 (accuracy, F1) times 100, chrF / ROUGE-L as they are."""
    return value if metric in PERCENT_METRICS else 100 * value


def write_result(name: str, result: dict, quick: bool) -> Path:
    """Write `bench/results/<name>.json`; a `--quick` smoke run goes to a temp dir instead (never recorded)."""
    folder = Path(tempfile.gettempdir()) / "promptfleet-bench-quick" if quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_info(), **result}, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return f"{v:,.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
