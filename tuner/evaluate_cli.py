"""`promptfleet eval`: score a run's exported adapters, or the zero-shot backbone, on each task.

Runs in this process (one rank). Reads prompts from `<run_dir>/adapters/<task>/` (safetensors)
and the job config the run saved in `summary.json`, unless `--config` is given. `evaluate_command`
returns the metrics; `render_results` is the human-readable form (the CLI prints one or the other,
so `--json` output is JSON alone). Every task is scored in one pass (`evaluate_tasks`: examples of
many tasks share forwards and decoding steps; each task's numbers are those it gets alone). While it
scores, a bar over every task's eval examples runs on stderr; with a run directory, each example's
prediction goes to `<run_dir>/predictions/eval_tuned/<task>.jsonl` (`eval_zero_shot` with `--zero-shot`).
"""

from __future__ import annotations

from pathlib import Path

from tuner.config import ConfigError, JobConfig, apply_overrides, from_dict, load_job_config, one_line
from tuner.job import load_task_specs
from tuner.model.backbone import load_backbone, load_tokenizer, pick_attention, pick_dtype
from tuner.model.model_cache import resolve_backbone
from tuner.model.prompt_lm import PromptTunedLM
from tuner.progress import EvalPass
from tuner.report import SUMMARY_FILE, collapse_warning, read_summary, render_table
from tuner.run_adapters import AdapterStore
from tuner.run_dir import PREDICTIONS_DIR, write_predictions
from tuner.scores import TaskScores
from tuner.tasks.data import TaskData
from tuner.tasks.kinds import evaluate_tasks


def _job_config(run_dir: str | None, config: str | None, overrides: list[str]) -> JobConfig:
    """The job to evaluate: `config` (with `overrides`), else the one the run in `run_dir` saved."""
    if config:
        return load_job_config(config, overrides)
    if not run_dir:
        raise ConfigError("give a run directory or --config")
    summary_path = Path(run_dir) / SUMMARY_FILE
    if not summary_path.is_file():
        raise ConfigError(f"{run_dir} has no {SUMMARY_FILE} (not a finished run directory)")
    try:
        saved = read_summary(run_dir).config
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{summary_path} is damaged (no readable job config in it)") from None
    return from_dict(JobConfig, apply_overrides(saved, overrides))


def _adapter_prompts(run_dir: str, names, lm: PromptTunedLM) -> dict:
    """Each task's exported prompt in `run_dir` (a packed store or per-task directories, opened once),
    checked against the backbone's width."""
    root = Path(run_dir) / "adapters"
    width = lm.embed.weight.shape[1]
    try:
        store = AdapterStore(root)
    except Exception as e:  # a damaged index, an unreadable directory...
        raise ConfigError(f"adapters {root} are unreadable ({one_line(e)})") from None
    prompts = {}
    for task in names:
        where = root / task if store.index is None else f"{task!r} of the packed store {root}"
        try:
            prompt = store.adapter(task).prompt
        except Exception as e:  # truncated safetensors, bad JSON, a non-regular file, a missing task...
            raise ConfigError(f"adapter {where} is unreadable ({one_line(e)})") from None
        if prompt.shape[1] != width:
            raise ConfigError(
                f"adapter {where} has prompts {prompt.shape[1]} wide; the backbone's embeddings are {width}"
            )
        prompts[task] = prompt
    return prompts


def evaluate_command(
    run_dir: str | None,
    config: str | None,
    overrides: list[str],
    zero_shot: bool,
    *,
    progress: bool = True,
    predictions_dir: str | Path | None = None,
) -> dict:
    """`{"tasks": {task: {"metric", "zero_shot", "tuned"}}}`, each score record as `summary.json` has it
    (`{}` where not evaluated): the JSON `promptfleet eval --json` prints.

    `progress`: a bar over the pass's examples on stderr. Each task's predictions file goes to
    `predictions_dir`, by default `<run_dir>/predictions/eval_tuned` (`eval_zero_shot`); without a
    run directory or a `predictions_dir`, none is written.
    """
    cfg = _job_config(run_dir, config, overrides)
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
    tasks = [
        TaskData.load(spec, tok, max_eval=cfg.data.max_eval_examples, seed=cfg.data.seed, need_train=False)
        for spec in load_task_specs(cfg.tasks)
    ]
    by_name = {t.spec.name: t for t in tasks}
    prompts = None if zero_shot else _adapter_prompts(run_dir, by_name, lm)
    what = "zero-shot" if zero_shot else "tuned"
    out: dict = {"tasks": {}}
    # Every task at once, as training evaluates: classification packs examples of many tasks into the
    # same rows, generation and NER decode them in the same steps (`evaluate_tasks`).
    with EvalPass(f"{what} eval", sum(len(t.eval) for t in tasks), show=progress) as bar:
        scores = evaluate_tasks(
            lm, tok, by_name, prompts, cfg.model.max_seq_len, device, progress=bar.advance
        )
    for name, data in by_name.items():
        record = scores[name].to_json() if scores[name] else {}  # as summary.json records it
        out["tasks"][name] = {
            "metric": data.spec.metric,
            "zero_shot": record if zero_shot else {},
            "tuned": {} if zero_shot else record,
        }
    if predictions_dir is None and run_dir:
        predictions_dir = Path(run_dir) / PREDICTIONS_DIR / f"eval_{what.replace('-', '_')}"
    if predictions_dir is not None:
        write_predictions(Path(predictions_dir), scores)
    return out


class _NotScored(float):
    """The tuned score of a `--zero-shot` evaluation (none): a NaN that the table shows as "-"."""

    def __format__(self, spec: str) -> str:
        return "-"


def render_results(results: dict) -> str:
    """The table (tuned vs zero-shot; "-" where a pass did not run) and per-label P / R / F1 lines."""
    lines = [
        render_table(
            (n, t["metric"], t["zero_shot"].get("score"), t["tuned"].get("score", _NotScored("nan")))
            for n, t in results["tasks"].items()
        )
    ]
    for name, t in results["tasks"].items():
        m = t["tuned"] or t["zero_shot"]
        for lab, v in (m.get("per_label") or {}).items():
            lines.append(
                f"  {name:>12} {lab:>16}  P={v['precision']:.3f} R={v['recall']:.3f} F1={v['f1']:.3f} n={v['support']}"
            )
    for name, t in results["tasks"].items():  # a tuned classifier that collapsed onto one label
        warning = collapse_warning(name, TaskScores.from_json(t["tuned"]))
        if warning:
            lines.append(f"warning: {warning}")
    return "\n".join(lines)
