"""`promptfleet eval`: score a run's exported adapters, or the zero-shot backbone, on each task.

Runs in this process (one rank). Reads prompts from `<run_dir>/adapters/<task>/` (safetensors)
and the job config the run saved in `summary.json`, unless `--config` is given. `evaluate_command`
returns the metrics; `render_results` is the human-readable form (the CLI prints one or the other,
so `--json` output is JSON alone).
"""

from __future__ import annotations

from pathlib import Path

from tuner.config import ConfigError, JobConfig, apply_overrides, from_dict, load_job_config, one_line
from tuner.export import load_adapter
from tuner.job import load_task_specs
from tuner.model.backbone import load_backbone, load_tokenizer, pick_attention, pick_dtype, resolve_backbone
from tuner.model.prompt_lm import PromptTunedLM
from tuner.report import SUMMARY_FILE, read_summary, render_table
from tuner.tasks.data import TaskData
from tuner.tasks.kinds import evaluate_task


def evaluate_command(run_dir: str | None, config: str | None, overrides: list[str], zero_shot: bool) -> dict:
    """`{"tasks": {task: {"metric", "zero_shot", "tuned"}}}`, each score record as `summary.json` has it
    (`{}` where not evaluated): the JSON `promptfleet eval --json` prints."""
    if config:
        cfg = load_job_config(config, overrides)
    elif run_dir:
        summary_path = Path(run_dir) / SUMMARY_FILE
        if not summary_path.is_file():
            raise ConfigError(f"{run_dir} has no {SUMMARY_FILE} (not a finished run directory)")
        try:
            saved = read_summary(run_dir).config
        except (ValueError, KeyError, TypeError, AttributeError):
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
        scores = evaluate_task(lm, tok, data, prompt, cfg.model.max_seq_len, device)
        record = scores.to_json() if scores else {}  # as summary.json records it
        out["tasks"][spec.name] = {
            "metric": spec.metric,
            "zero_shot": record if zero_shot else {},
            "tuned": {} if zero_shot else record,
        }
    return out


def render_results(results: dict) -> str:
    """The table (tuned vs zero-shot) and per-label precision / recall / F1 lines."""
    lines = [
        render_table(
            (n, t["metric"], t["zero_shot"].get("score"), t["tuned"].get("score", float("nan")))
            for n, t in results["tasks"].items()
        )
    ]
    for name, t in results["tasks"].items():
        m = t["tuned"] or t["zero_shot"]
        for lab, v in (m.get("per_label") or {}).items():
            lines.append(
                f"  {name:>12} {lab:>16}  P={v['precision']:.3f} R={v['recall']:.3f} F1={v['f1']:.3f} n={v['support']}"
            )
    return "\n".join(lines)
