"""A seed's finished training runs on disk, so `bench.quality --resume` continues a seed stopped part-way.

One seed of the benchmark can outlast a session (CB and RTE at 300 x 16 steps: ~55 minutes per PEFT
learning rate on a 2-core CPU, five such runs a seed), and `--add` keeps only whole seeds. So every
run of a learning-rate grid (PEFT's or ours, `bench.quality_peft.tune`) writes its trained prompts as
soon as it ends:

    bench/results/partial/<out>/seed<S>/setup.json            the benchmark's setup (`setup_of`)
    bench/results/partial/<out>/seed<S>/<name>-lr<lr>.safetensors    task -> trained prompt

A run with `--resume` takes the prompts of the runs found there instead of training them again;
everything else (the draws, the held-out choice, the scores) is recomputed, so a resumed seed records
exactly what an uninterrupted one would. A folder written under another setup is refused, not mixed
in; without `--resume` a seed's folder is emptied when the seed starts. The folder is removed once the
seed is in bench/results/<out>.json. Files are written to a temp name and renamed, so a kill never
leaves half a stage behind. The folder is not git-ignored: commit it to finish the seed on another machine
(a run's prompts are a few tens of KB).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # a stage's name: PEFT or one of our methods


class Stages:
    """The finished runs of one seed, in `folder` (see the module docstring)."""

    def __init__(self, folder: Path, setup: dict, resume: bool):
        self.folder, self.setup = Path(folder), json.loads(json.dumps(setup, default=float))
        kept = self.folder / "setup.json"
        if resume and kept.is_file():
            if json.loads(kept.read_text()) != self.setup:
                raise ValueError(
                    f"--resume: {self.folder} holds runs of another setup; remove it to start this seed afresh"
                )
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(kept, lambda tmp: tmp.write_text(json.dumps(self.setup, indent=1) + "\n"))

    def path(self, name: str, lr: float) -> Path:
        if not NAME.match(name):
            raise ValueError(f"stage name {name!r}: lower-case letters, digits and _ only")
        return self.folder / f"{name}-lr{float(lr)!r}.safetensors"

    def get(self, name: str, lr: float, tasks: list[str]) -> dict[str, torch.Tensor] | None:
        """The prompts of run `name` at `lr` if it finished before, for exactly `tasks`; else None."""
        path = self.path(name, lr)
        if not path.is_file():
            return None
        prompts = load_file(path)
        if sorted(prompts) != sorted(tasks):
            raise ValueError(f"{path}: prompts for {sorted(prompts)}, this run has {sorted(tasks)}")
        return prompts

    def put(self, name: str, lr: float, prompts: dict[str, torch.Tensor]) -> None:
        tensors = {t: p.detach().cpu().contiguous() for t, p in prompts.items()}
        _write_atomic(self.path(name, lr), lambda tmp: save_file(tensors, str(tmp)))

    def done(self) -> None:
        """The seed is recorded: its runs are no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    write(tmp)
    os.replace(tmp, path)
