"""`promptfleet eval`: score a run's exported adapters, or the zero-shot backbone, on each task.

Runs in this process (one rank). Reads prompts from `<run_dir>/adapters/<task>/` (safetensors)
and the job config the run saved in `summary.json`, unless `--config` is given. `evaluate_command`
returns the metrics; `render_results` is the human-readable form (the CLI prints one or the other,
so `--json` output is JSON alone).
"""

from __future__ import annotations

import json
from pathlib import Path

from tuner.config import ConfigError, JobConfig, apply_overrides, from_dict, load_job_config, one_line
from tuner.evaluate import evaluate_task
from tuner.export import load_adapter
from tuner.job import load_task_specs
from tuner.model.backbone import load_backbone, load_tokenizer, pick_attention, pick_dtype, resolve_backbone
from tuner.model.prompt_lm import PromptTunedLM
from tuner.recipe import render_table
from tuner.tasks.data import TaskData


def evaluate_command(run_dir: str | None, config: str | None, overrides: list[str], zero_shot: bool) -> dict:
    if config:
        cfg = load_job_config(config, overrides)
    elif run_dir:
        summary_path = Path(run_dir) / "summary.json"
        if not summary_path.is_file():
            raise ConfigError(f"{run_dir} has no summary.json (not a finished run directory)")
        try:
            saved = json.loads(summary_path.read_text())["config"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{summary_path} is damaged (no readable job config in it)") from None
        cfg = from_dict(JobConfig, apply_overrides(saved, overrides))
    else:
        raise ConfigError("give a run directory or --config")
    if not zero_shot and not run_dir:
        raise ConfigError("scoring tuned prompts needs a run directory (or use --zero-shot)")
    import torch

    path = resolve_backbone(cfg.model.name)
    tok = load_tokenizer(path)
    device = torch.device("cpu")
    lm = PromptTunedLM(
        load_backbone(
            path, pick_dtype(cfg.model.dtype, device), pick_attention(cfg.model.attn_implementation, device)
        )
    )
    out = {"tasks": {}}
    for spec in load_task_specs(cfg.tasks):
        data = TaskData.load(
            spec, tok, max_eval=cfg.data.max_eval_examples, seed=cfg.data.seed, need_train=False
        )
        prompt = None
        if not zero_shot:
            task_dir = Path(run_dir) / "adapters" / spec.name
            try:
                prompt = load_adapter(task_dir).prompt
            except Exception as e:  # truncated safetensors, bad JSON, a non-regular file...
                raise ConfigError(f"adapter {task_dir} is unreadable ({one_line(e)})") from None
            width = lm.embed.weight.shape[1]
            if prompt.shape[1] != width:
                raise ConfigError(
                    f"adapter {task_dir} has prompts {prompt.shape[1]} wide; the backbone's embeddings are {width}"
                )
        m = evaluate_task(lm, tok, data, prompt, cfg.model.max_seq_len, device)
        out["tasks"][spec.name] = {
            "metric": spec.metric,
            "zero_shot": m if zero_shot else {},
            "tuned": {} if zero_shot else m,
        }
    return out


def render_results(results: dict) -> str:
    """The table (tuned vs zero-shot) and per-label precision / recall / F1 lines."""
    table = {
        "tasks": {
            n: {
                "metric": t["metric"],
                "zero_shot": t["zero_shot"],
                "tuned": t["tuned"] or {"score": float("nan")},
            }
            for n, t in results["tasks"].items()
        }
    }
    lines = [render_table(table)]
    for name, t in results["tasks"].items():
        m = t["tuned"] or t["zero_shot"]
        for lab, v in (m.get("per_label") or {}).items():
            lines.append(
                f"  {name:>12} {lab:>16}  P={v['precision']:.3f} R={v['recall']:.3f} F1={v['f1']:.3f} n={v['support']}"
            )
    return "\n".join(lines)
