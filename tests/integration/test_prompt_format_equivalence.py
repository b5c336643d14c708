"""Train/serve skew: for every shipped task, a served request's input token ids equal the ids
training fed for the same data row.

Training side: `tuner.tasks.spec.build_examples` (prefix + rendered row) tokenized by `tuner.tasks.data.tokenize`,
with the task's real prefix (description and seeded demonstrations from the real train split).
Serving side: the adapter's `TaskMeta` written by `save_adapter` and read back by the prompt
registry, the request's raw text (the row's field; a JSON object of the fields for a
several-field template) rendered by `serving.engine.render_prompt` and encoded like the engine encodes.
The real SmolLM2 tokenizer, real rows from ../shared/data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from serving.engine import render_prompt as format_prompt
from serving.engine import text_encoder
from serving.registry import PromptRegistry
from tuner.export import TaskAdapter, TaskMeta, save_adapter
from tuner.model.backbone import load_tokenizer
from tuner.model.model_cache import resolve_backbone
from tuner.tasks.data import tokenize
from tuner.tasks.readers import read_rows
from tuner.tasks.spec import TaskSpec, build_examples, task_prefix
from tuner.tasks.templates import template_fields

REPO = Path(__file__).resolve().parents[2]
TASK_CONFIGS = sorted((REPO / "configs" / "tasks").glob("*.yaml"))
ROWS = 8


@pytest.fixture(scope="module")
def backbone():
    path = resolve_backbone("smollm2-135m")
    return path, load_tokenizer(path), AutoConfig.from_pretrained(path)


def request_text(spec: TaskSpec, row: dict) -> str:
    """What a client sends for `row`: the input field, or a JSON object of the fields."""
    names = template_fields(spec.template)
    if len(names) == 1:
        return str(row[names[0]])
    return json.dumps({n: row[n] for n in names})


@pytest.mark.parametrize("config", TASK_CONFIGS, ids=lambda p: p.stem)
def test_served_input_ids_equal_training_input_ids(config, backbone, tmp_path):
    path, tokenizer, cfg = backbone
    spec = TaskSpec.load(config)
    prefix = task_prefix(spec, read_rows(spec, "train") if spec.few_shot else [], seed=0)
    rows = read_rows(spec, "eval")[:ROWS]
    trained = tokenize(build_examples(spec, "eval", prefix=prefix)[:ROWS], tokenizer)

    prompt = torch.zeros(2, cfg.hidden_size)
    save_adapter(
        tmp_path, TaskAdapter(spec.name, prompt, "smollm2-135m", TaskMeta.from_spec(spec, prefix)), cfg
    )
    registry = PromptRegistry(tmp_path, {"smollm2-135m"}, cfg.hidden_size)
    assert registry.refresh().added == [spec.name]
    meta = registry.get(spec.name).meta
    assert isinstance(meta, TaskMeta) and meta.prefix == prefix and meta.template == spec.template
    encode = text_encoder(tokenizer)
    for row, example in zip(rows, trained, strict=True):
        served = encode(format_prompt(meta, request_text(spec, row)))
        assert served == example.input_ids, (spec.name, row)
