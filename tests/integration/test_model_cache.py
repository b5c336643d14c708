"""The embedded backbone's model cache cannot be poisoned: concurrent resolvers convert it once and all
load identical weights; a directory left incomplete (no completion marker) is rebuilt, never trusted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from tuner.model.model_cache import COMPLETE

pytestmark = pytest.mark.integration

RESOLVE = """
import hashlib, sys
from tuner.model.backbone import load_backbone
from tuner.model.model_cache import resolve_backbone
path = resolve_backbone("smollm2-135m")
model = load_backbone(path)  # the weights load through the normal from_pretrained path
h = hashlib.sha256()
for name, p in sorted(model.state_dict().items()):
    h.update(name.encode()); h.update(p.detach().numpy().tobytes())
print(path, h.hexdigest())
"""


def _resolvers(cache: Path, n: int) -> list[subprocess.Popen]:
    env = {**os.environ, "PROMPTFLEET_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return [
        subprocess.Popen(
            [sys.executable, "-c", RESOLVE],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]


def test_concurrent_resolvers_convert_once_and_load_identical_weights(tmp_path):
    procs = _resolvers(tmp_path, 3)
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    resolved = {tuple(out.split()[-2:]) for out, _ in results}  # (directory, weights digest)
    assert len(resolved) == 1  # one directory, one set of weights
    assert sum("converting backbone" in err for _, err in results) == 1  # the others waited for it
    target = tmp_path / "models" / "smollm2-135m"
    assert (target / COMPLETE).is_file()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".smollm2-135m-")]  # no temp left


def test_an_incomplete_cache_directory_is_rebuilt(tmp_path, monkeypatch):
    from tuner.model.model_cache import resolve_backbone

    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "tokenizer.json").write_text("{}")  # what the old race left: tokenizer files, no weights
    (target / "config.json").write_text("{}")
    monkeypatch.setenv("PROMPTFLEET_CACHE", str(tmp_path))
    assert Path(resolve_backbone("smollm2-135m")) == target
    assert (target / COMPLETE).is_file()
    assert (target / "model.safetensors").stat().st_size > 100_000_000
    assert (target / "tokenizer.json").stat().st_size > 1_000_000  # rebuilt, not the stub left behind
