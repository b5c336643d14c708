"""A tiny but complete training job for cluster tests: a random 2-layer Llama with the real
SmolLM2 tokenizer, two small classification tasks and a job YAML, all in a temp directory.

Steps take milliseconds, so Ray / fault-tolerance tests spend their time on orchestration, not
on the model. It does not start Ray (see `tests/distributed/local_ray.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TASKS = {
    "tone": (
        "Review: {text}\nSentiment:",
        {"0": " negative", "1": " positive"},
        ["a dull film", "great acting", "boring plot", "lovely music", "awful pacing", "a joy to watch"],
    ),
    "topic": (
        "Headline: {text}\nTopic:",
        {"0": " sports", "1": " business"},
        [
            "team wins final",
            "shares fall",
            "coach resigns",
            "bank raises rates",
            "striker scores twice",
            "profits double",
        ],
    ),
}


def write_tiny_backbone(root: Path) -> Path:
    """Save a random Llama (SmolLM2's vocabulary, hidden 32, 2 layers) and SmolLM2's tokenizer under `root`."""
    from conftest import save_tiny_backbone

    root.mkdir(parents=True, exist_ok=True)
    return save_tiny_backbone(root)


def write_tiny_job(root: Path, backbone: Path, name: str = "tiny", **sections) -> Path:
    """Write task data, task YAMLs and a job YAML under `root`; `sections` update the job dict."""
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    for task, (template, verbaliser, texts) in TASKS.items():
        rows = [{"text": t, "label": str(i % 2)} for i, t in enumerate(texts * 4)]
        data = root / "data" / f"{task}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {
            "name": task,
            "kind": "classification",
            "template": template,
            "verbaliser": verbaliser,
            "data": {"format": "jsonl", "train": str(data), "eval": str(data)},
        }
        (root / "tasks" / f"{task}.yaml").write_text(yaml.safe_dump(spec))
    job = {
        "name": name,
        "output_dir": str(root / "runs"),
        "tasks": [f"tasks/{t}.yaml" for t in TASKS],
        "model": {"name": str(backbone), "max_seq_len": 64, "dtype": "fp32", "attn_implementation": "sdpa"},
        "prompt": {"num_virtual_tokens": 4, "init": "random"},
        "optim": {"lr": 0.1, "max_steps": 6, "batch_size": 4, "warmup_steps": 1},
        "data": {"max_eval_examples": 4, "seed": 0},
        "cluster": {"num_workers": 1, "cpus_per_worker": 1},
        "eval_every": 0,
        "eval_zero_shot": False,
        "checkpoint_every": 2,
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            job[key] = {**job.get(key, {}), **value}
        else:
            job[key] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path
