"""What every task kind answers: the one interface the recipe, evaluation, export and serving ask.

A kind (classification, generation, NER, ...) is one module of this package with one `TaskKind`
subclass, registered in `tuner.tasks.kinds.KINDS`. It owns the fields a row needs, the text the
model should write, the references an answer is scored against, how a task is evaluated (scoring
labels, or decoding and scoring the text), what a search ranks variants by, and what serving may do
with the task. Code outside this package never tests a kind's name: it asks the kind.

It does not read files, tokenise or batch (`tuner.tasks.readers`, `tuner.tasks.data`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from tuner.scores import TaskScores

if TYPE_CHECKING:
    import torch

    from tuner.model.prompt_lm import PromptTunedLM
    from tuner.tasks.data import TaskData
    from tuner.tasks.spec import TaskExample, TaskSpec


@dataclass(frozen=True)
class EvalSetup:
    """What evaluating any task needs besides the task: the model, its tokenizer, the length budget."""

    lm: PromptTunedLM
    tokenizer: Any
    max_len: int  # longest [prompt][input][answer] (inputs are cut from the left to fit)
    device: Any = "cpu"
    batch_size: int = 32
    progress: Callable[[int], None] | None = None  # told how many more examples are scored, piece by piece


DECODED_PIECE_BATCHES = 4  # decoded kinds: batches per piece of an evaluation pass (`in_pieces`)

# What serving may do with a task: `complete` (the completion and chat routes), `classify`
# (`/v1/classify`: label probabilities from its verbaliser).
COMPLETE, CLASSIFY = "complete", "classify"


class TaskKind:
    """One kind of task. Subclasses set the class attributes and the methods their kind needs."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]  # the headline metrics it may report; the first is the default
    serves: ClassVar[frozenset[str]] = frozenset({COMPLETE})
    # Its metric is read off the label scores of one forward per example (no decoding), and each
    # label has verbaliser words (`class_labels` initialisation uses them; serving can classify).
    label_scored: ClassVar[bool] = False
    # Training targets end with end-of-sequence: answers of free length learn where to stop.
    eos_target: ClassVar[bool] = True

    def check_spec(self, spec: TaskSpec) -> None:
        """Raise `ConfigError` for a task definition this kind cannot train (beyond the common checks)."""

    def required_fields(self, spec: TaskSpec, split: str) -> list[str]:
        """The fields (after renaming) a row of `split` needs besides the template's."""
        raise NotImplementedError

    def target_text(self, spec: TaskSpec, row: dict[str, Any]) -> tuple[str, str | None]:
        """The text the model should write for `row`, and its label key (None where there is none)."""
        raise NotImplementedError

    def references(self, spec: TaskSpec, row: dict[str, Any]) -> list[str]:
        """Every reference an eval row's answer is scored against ([]: the kind scores otherwise)."""
        return []

    def fill_example(self, example: TaskExample, row: dict[str, Any]) -> None:
        """Copy what evaluation needs beyond the text from `row` onto `example` (e.g. NER's gold tags)."""

    def evaluate(self, setup: EvalSetup, data: TaskData, prompt: torch.Tensor | None) -> TaskScores:
        """The task's scores on `data.eval` under `prompt` (None: zero-shot)."""
        raise NotImplementedError

    def evaluate_many(
        self, setup: EvalSetup, datas: list[TaskData], prompts: Mapping[str, torch.Tensor] | None
    ) -> dict[str, TaskScores]:
        """Scores of several tasks of this kind by name (`prompts`: by task; None: zero-shot). A kind
        that can batch examples of different tasks together overrides this; here, one task at a time."""
        return {
            d.spec.name: self.evaluate(setup, d, None if prompts is None else prompts[d.spec.name])
            for d in datas
        }

    def rung_criterion(self, requested: str) -> str:
        """What a search rung ranks this kind's variants by, given `search.criterion`: `metric`, `loss`
        or `label_loss` (`auto`: the metric where it costs one forward per example, else the loss)."""
        if requested == "auto":
            return "metric" if self.label_scored else "loss"
        if requested == "label_loss" and not self.label_scored:
            return "loss"  # no label set to renormalise over
        return requested


def text(value: Any) -> str:
    """A data value as text, stripped (None -> "")."""
    return "" if value is None else str(value).strip()


def in_pieces(
    setup: EvalSetup, items: list, batch_size: int, run: Callable[[list], list], batches: int = 1
) -> list:
    """`run(items)`, a piece of `batches` batches per rank at a time, each piece's examples reported to
    `setup.progress`. The batches are the ones `run` makes of the whole list (ranks take every
    world-size-th item of a piece as they would of the whole), so results are the same; every rank
    cuts the same pieces, so ZeRO-3 ranks stay in lockstep."""
    from tuner.model.zero import world

    size = batch_size * world()[1] * batches
    out: list = []
    for start in range(0, len(items), size):
        piece = items[start : start + size]
        out += run(piece)
        if setup.progress is not None:
            setup.progress(len(piece))
    return out


def prediction(
    example: TaskExample | None,
    prefix: str,
    references: Sequence[str],
    output: str,
    correct: bool,
    scores: dict[str, Any],
) -> dict[str, Any]:
    """One eval example's line of its task's predictions file: its input (without the task's prefix,
    the description and demonstrations every example shares), references, the model's output, whether
    that is right, and the kind's scores of it."""
    text = example.prompt if example is not None else ""
    return {
        "input": text[len(prefix) :] if prefix and text.startswith(prefix) else text,
        "references": list(references),
        "output": output,
        "correct": bool(correct),
        "scores": scores,
    }


def exact_matches(data: TaskData, hyps: list[str]) -> list[tuple[bool, dict]]:
    """Each answer's (correct, scores): exact match against any of its example's references."""
    out = []
    for e, h in zip(data.eval_text, hyps, strict=True):
        match = any(r.strip() == h.strip() for r in e.references or [e.target])
        out.append((match, {"exact_match": float(match)}))
    return out


def decoded_scores(
    setup: EvalSetup,
    data: TaskData,
    prompt: torch.Tensor | None,
    score: Callable[[TaskData, list[str]], dict],
    judge: Callable[[TaskData, list[str]], list[tuple[bool, dict]]] = exact_matches,
) -> TaskScores:
    """One task's scores from its greedy answers: `decoded_scores_of_tasks` with one task."""
    return decoded_scores_of_tasks(setup, [data], {data.spec.name: prompt}, score, judge)[data.spec.name]


def decoded_scores_of_tasks(
    setup: EvalSetup,
    datas: list[TaskData],
    prompts: Mapping[str, torch.Tensor | None] | None,
    score: Callable[[TaskData, list[str]], dict],
    judge: Callable[[TaskData, list[str]], list[tuple[bool, dict]]] = exact_matches,
) -> dict[str, TaskScores]:
    """Each task's scores by name: greedy answers to every eval example of every task, decoded together
    (the server's mixed-task steps, `generate_greedy_of_tasks`: each task its own prompt, answer length
    and stop strings), scored per task by `score(data, answers)`, with three samples and each example's
    prediction record (`judge(data, answers)`: each answer's (correct, scores)). `prompts` by task
    (None: zero-shot). An answer is the same text whichever tasks decode beside it."""
    from serving.offline import DecodeTask
    from tuner.evaluate import generate_greedy_of_tasks

    batch = max(1, setup.batch_size // 2)
    tasks = {
        d.spec.name: DecodeTask(
            None if prompts is None else prompts[d.spec.name], d.spec.max_new_tokens, tuple(d.spec.stop)
        )
        for d in datas
    }

    def decode(examples: list) -> list[str]:
        s = setup
        return generate_greedy_of_tasks(s.lm, s.tokenizer, examples, tasks, s.max_len, batch, s.device)

    # Pieces of several batches: the server's loop admits a row as another finishes, so only a piece's
    # last rows decode beside free slots.
    examples = [e for d in datas for e in d.eval]
    hyps = in_pieces(setup, examples, batch, decode, batches=DECODED_PIECE_BATCHES)
    out, at = {}, 0
    for d in datas:
        out[d.spec.name] = _answers_scored(d, hyps[at : at + len(d.eval)], score, judge)
        at += len(d.eval)
    return out


def _answers_scored(data: TaskData, hyps: list[str], score, judge) -> TaskScores:
    """A task's `TaskScores` from its answers (in the order of its eval examples)."""
    m = score(data, hyps)
    refs = [e.target.strip() for e in data.eval_text]
    m["samples"] = [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]
    predictions = [
        prediction(e, data.prefix, e.references or [e.target.strip()], h, correct, scores)
        for e, h, (correct, scores) in zip(data.eval_text, hyps, judge(data, hyps), strict=True)
    ]
    return TaskScores.of(data.spec.metric, m, predictions)


class DecodedKind(TaskKind):
    """A kind scored by decoding greedily (generation, NER): it says how a task's answers score
    (`score`: the task's metrics; `judge`: each answer's (correct, scores)); evaluation decodes the
    examples of all its tasks together (`decoded_scores_of_tasks`)."""

    def score(self, data: TaskData, hyps: list[str]) -> dict:
        """The task's metrics from every eval example's answer."""
        raise NotImplementedError

    def judge(self, data: TaskData, hyps: list[str]) -> list[tuple[bool, dict]]:
        """Each answer's (correct, scores) for its prediction record (default: exact match)."""
        return exact_matches(data, hyps)

    def evaluate(self, setup: EvalSetup, data: TaskData, prompt: torch.Tensor | None) -> TaskScores:
        return decoded_scores(setup, data, prompt, self.score, self.judge)

    def evaluate_many(
        self, setup: EvalSetup, datas: list[TaskData], prompts: Mapping[str, torch.Tensor] | None
    ) -> dict[str, TaskScores]:
        return decoded_scores_of_tasks(setup, datas, prompts, self.score, self.judge)
