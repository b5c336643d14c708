"""What a run shows while it works: the training bar's postfix and eval lines, and a bar per evaluation pass.

An evaluation pass (zero-shot, every `eval_every` steps, the final one; `promptfleet eval`) can take
longer than many training steps. `EvalPass` draws a bar of its own over the pass's examples (with
examples/s) and reports its progress to a hook (the Ray driver draws the same bar from those
records, `EvalBarFromRecords`). When it ends it takes its time out of the training bar
(`exclude_time`), so the training bar's rate and ETA are the training steps' alone, and the elapsed
time it shows is training time.

The caller decides who draws: rank 0 with progress on; other ranks and `progress=False` draw nothing.
Nothing here evaluates or trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tuner.metrics import EvalPoint, EvalProgress, StepMetrics

REPORT_EVERY_S = 0.5  # an evaluation pass's records to `on_progress`: its first, its last, and one per this


def _now() -> float:
    """The clock evaluation passes are timed with."""
    return time.perf_counter()


def step_postfix(m: StepMetrics) -> dict[str, str]:
    """What the progress bar shows after a step (the recipe's own bar and the Ray driver's)."""
    return {"loss": f"{m.loss:.3f}", "tok_s": f"{m.tokens_per_s:.0f}", "lr": f"{m.lr:.3g}"}


def describe_eval(point: EvalPoint) -> str:
    """One line for the console: which evaluation, and every task's score."""
    what = "zero-shot" if point.zero_shot else f"eval @ step {point.step}"
    return f"{what}: " + ", ".join(f"{t} {v:.3f}" for t, v in point.scores.items())


def exclude_time(bar, seconds: float) -> None:
    """Leave `seconds` (an evaluation) out of tqdm `bar`'s elapsed time, rate and ETA, as if the bar had
    been paused for them (tqdm's `unpause`, for a span measured by the caller). None: nothing to do."""
    if bar is None or getattr(bar, "disable", False):
        return
    bar.start_t += seconds
    # the span began after the bar's last print: its next update's interval leaves the span out too
    bar.last_print_t = min(bar.last_print_t + seconds, bar._time())


class EvalPass:
    """One evaluation pass over `total` examples, as a context manager: `advance(n)` as each piece is
    scored. Draws a bar when `show`, sends `EvalProgress` records to `on_progress` (at the start, at
    the end, and at most every `REPORT_EVERY_S` between: a fleet's thousands of small tasks do not
    make thousands of messages), and on exit takes the pass's time out of `training_bar`."""

    def __init__(
        self,
        what: str,
        total: int,
        *,
        show: bool,
        on_progress: Callable[[EvalProgress], None] | None = None,
        training_bar=None,
    ):
        self.what, self.total, self.done = what, total, 0
        self.show, self.on_progress, self.training_bar = show, on_progress, training_bar
        self.bar = None
        self._t0 = self._reported = 0.0

    def __enter__(self) -> EvalPass:
        self._t0 = _now()
        if self.show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.what, unit="ex", dynamic_ncols=True, leave=False)
        self._report()
        return self

    def advance(self, n: int) -> None:
        """`n` more examples scored."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        self._report()

    def _report(self) -> None:
        if self.on_progress is None:
            return
        now = _now()
        if self.done in (0, self.total) or now - self._reported >= REPORT_EVERY_S:
            self._reported = now
            self.on_progress(EvalProgress(self.what, self.done, self.total))

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        exclude_time(self.training_bar, _now() - self._t0)


class EvalBarFromRecords:
    """The bar of the evaluation pass that `EvalProgress` records describe (the Ray driver's, fed with
    rank 0's records): a pass's first record opens it, its last closes it and takes the pass's time
    out of `training_bar` (None: no bar is drawn, no time is taken out)."""

    def __init__(self, training_bar=None, show: bool = True):
        self.training_bar, self.show = training_bar, show
        self._pass: EvalPass | None = None

    def update(self, record: EvalProgress) -> None:
        current = self._pass
        if current is not None and (record.what != current.what or record.done < current.done):
            self.close()  # a new pass began (the last one's closing record was lost)
        if self._pass is None:
            self._pass = EvalPass(record.what, record.total, show=self.show, training_bar=self.training_bar)
            self._pass.__enter__()
        self._pass.advance(record.done - self._pass.done)
        if record.done >= record.total:
            self.close()

    def close(self) -> None:
        if self._pass is not None:
            self._pass.__exit__(None, None, None)
            self._pass = None
