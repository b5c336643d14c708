"""A training step's host work, done ahead: step k+1's micro-batches are built while step k runs.

Before its first kernel a step reads its examples, packs them into rows (`collate`) and builds the
attention plan (spans, `cu_seqlens`, gather indices: `tuner.model.attention.host_layout`). Run in
the step, that host work sits on the critical path: the device waits for it (on a GPU ~0.08 s of a
0.45 s step on the 1.1B config). `StepBatches` does it in one background thread for the steps that
come next, into a bounded queue (`depth` steps ahead), in pinned memory when the device is CUDA; the
step itself then only issues non-blocking host-to-device copies. Plans are built on the host from
host tensors, so nothing in building them reads the device back (a synchronisation).

Nothing computed changes. A prepared step is used only if it was prepared from exactly the
micro-batches the step is handed (else the step builds its own), so batches, their order and every
value are those of building them in the step. The worker draws its steps from a *copy* of the
sampler: the sampler the recipe checkpoints has drawn exactly the steps trained, so a checkpoint
holds the position of the last step trained, never of a batch prepared ahead.

Not here: what a batch holds (`tuner.tasks.batching`), how a step uses it (`tuner.recipe`). A
search (`search.space`) changes its variants between steps, so with one nothing is prepared ahead.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from tuner.tasks.batching import MultiTaskBatch

MicroBatches = list[list[tuple[str, int]]]  # a step's micro-batches of (bank row, example index)
_DONE = object()


def draws_ahead(sampler, steps: int) -> Iterator[list[tuple[str, int]]]:
    """The next `steps` global batches `sampler` will draw, drawn from a copy (`sampler` stays as it is)."""
    twin = copy.deepcopy(sampler)  # now, not when the worker first asks (the sampler has drawn by then)
    return (twin.next_batch() for _ in range(steps))


def split_micro_batches(global_batch: list, grad_accum: int) -> MicroBatches:
    """`global_batch` cut into `grad_accum` equal micro-batches, in order (a remainder is dropped)."""
    micro = len(global_batch) // grad_accum
    return [global_batch[m * micro : (m + 1) * micro] for m in range(grad_accum)]


class StepBatches:
    """A step's micro-batches on the device: prepared ahead by a worker thread, or built on demand.

    Args:
        plan: (a step's global batch) -> its micro-batches (host work only: the worker calls it).
        build: (a step's micro-batches) -> this rank's host batch of each, attention plan attached.
            Called from the worker for steps ahead, and in the step when nothing prepared matches.
        device: where the step runs; on CUDA prepared batches are pinned and copied non-blocking.
    """

    def __init__(
        self,
        plan: Callable[[list], MicroBatches],
        build: Callable[[MicroBatches], list[MultiTaskBatch]],
        device: torch.device | str,
    ):
        self.plan, self.build = plan, build
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.critical_s = 0.0  # seconds the stepping thread spent getting its batches (host, blocking)
        self.steps = 0  # steps served
        self.prefetched = 0  # ... of them from the worker
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, upcoming: Iterable[list], depth: int = 1) -> None:
        """Prepare the global batches `upcoming` (the steps to come, in order) in a worker thread, at
        most `depth` steps ahead of the one being trained (0: nothing ahead)."""
        self.close()
        if depth <= 0:
            return
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(
            target=self._work, args=(iter(upcoming), self._queue, self._stop), name="prefetch", daemon=True
        )
        self._thread.start()

    def _work(self, upcoming: Iterator[list], out: queue.Queue, stop: threading.Event) -> None:
        try:
            for global_batch in upcoming:
                if stop.is_set():
                    return
                micro = self.plan(global_batch)
                batches = self.build(micro)
                if self.pin:
                    batches = [b.pin_memory() for b in batches]
                if not self._put(out, (micro, batches), stop):
                    return
        except Exception:  # the step builds its own batches and raises the same error where it belongs
            pass
        self._put(out, _DONE, stop)

    @staticmethod
    def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, micro_batches: MicroBatches) -> list[MultiTaskBatch]:
        """This rank's batch of each of a step's `micro_batches`, on the device."""
        t0 = time.perf_counter()
        batches = self._take(micro_batches)
        if batches is None:
            batches = self.build(micro_batches)
        else:
            self.prefetched += 1
        out = [b.to(self.device, non_blocking=self.pin) for b in batches]
        self.critical_s += time.perf_counter() - t0
        self.steps += 1
        return out

    def _take(self, micro_batches: MicroBatches) -> list[MultiTaskBatch] | None:
        """The next prepared step if it is `micro_batches`; otherwise None, and nothing ahead any more."""
        if self._queue is None:
            return None
        item = self._queue.get()
        if item is not _DONE and item[0] == micro_batches:
            return item[1]
        self.close()  # done, or the steps went another way than drawn ahead: build them in the step
        return None

    def close(self) -> None:
        """Stop the worker (it ends within ~0.1 s) and drop what it prepared."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._thread, self._queue = None, None


def recipe_step_batches(recipe) -> StepBatches:
    """The `StepBatches` of a set-up `tuner.recipe` recipe: its micro-batch split, and this rank's shard
    of each micro-batch collated as its `data.*` settings say, with its attention kernel's plan."""
    from tuner.model import attention
    from tuner.tasks.batching import collate

    cfg, lm, device = recipe.cfg, recipe.lm, recipe.device
    kernel = lm.kernel_for(device)
    if kernel in ("varlen", "flash_attention_2"):
        attention.aligns_bottom_right(kernel, device)  # probed (and cached) here, not in the worker
    share = cfg.data.share_prompts and lm.supports_shared_prompts

    def build(micro_batches: MicroBatches) -> list[MultiTaskBatch]:
        names = sorted({t for mb in micro_batches for t, _ in mb})  # the step's bank rows, as the recipe's
        pos = {n: i for i, n in enumerate(names)}
        out = []
        for mb in micro_batches:
            examples = [recipe._train_example(t, i) for t, i in mb[recipe.rank :: recipe.world_size]]
            batch = collate(
                examples,
                pos,
                recipe.layout.P,
                max_len=cfg.model.max_seq_len,
                pad_id=recipe.tokenizer.pad_token_id,
                packing=cfg.data.packing,
                share_prompts=share,
                row_len=cfg.data.row_len,
            )
            out.append(attention.host_layout(kernel, batch, device))
        return out

    return StepBatches(
        lambda global_batch: split_micro_batches(global_batch, cfg.optim.grad_accum), build, device
    )
