"""`promptfleet plan --serve-ranks`: per-rank serving memory, and the 8B tensor-parallel RayService.

The plan's weights are checked against a direct count over a real model's parameters, sharded by the
rules `serving.tensor_parallel` loads with (and, in test_serving_tp.py, against what the ranks hold);
its KV cache against the KV tensor's own shape.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_llama

from cluster.plan_serving import KV_HEADROOM, divisors, resolve, serving_plan
from tuner.config import ConfigError
from tuner.model.memory import GB, BackboneShape, load_shape

REPO = Path(__file__).resolve().parents[2]
SHARDED = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "embed_tokens",
    "lm_head",
)


def _args(backbone: str, **kw) -> argparse.Namespace:
    base = dict(
        backbone=backbone,
        serve_ranks="2",
        serve_batch=8,
        seq_len=256,
        tasks=10,
        virtual_tokens=20,
        dtype="fp32",
        prefix_cache_gb=0.25,
        memory_gb=1.0,
        nodes=1,
        devices_per_node=8,
    )
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("tied", [True, False])
def test_weights_per_rank_are_the_sharded_parameters_counted_directly(tied):
    model = tiny_llama(vocab_size=130, hidden_size=32)  # 130 rows: a vocabulary 4 ranks do not divide
    if not tied:
        model.config.tie_word_embeddings = False
    shape = BackboneShape.from_config(model.config.to_dict())
    for n in (1, 2):
        direct = 0
        # Untied: lm_head.weight counted on its own (here an alias, with the same shape as its own would have).
        for name, p in model.named_parameters(remove_duplicate=tied):
            direct += -(-p.numel() // n) if any(s in name for s in SHARDED) else p.numel()
        plan = serving_plan(shape, n, 1, 1, 1, 1, "fp32", 0, GB)
        assert plan.weights == 4 * direct, (n, tied)


def test_kv_cache_and_prefix_cache_per_rank_follow_the_local_heads():
    shape = load_shape("llama-3-8b")  # 32 layers, 8 KV heads of 128
    plan = serving_plan(shape, 2, 16, 1000, 50, 20, "bf16", 2**30, 80 * GB)
    per_token = 2 * 32 * (8 // 2) * 128 * 2  # k and v, all layers, this rank's 4 KV heads, bf16
    assert plan.kv_cache == 16 * (1000 + KV_HEADROOM) * per_token
    assert plan.prefix_cache_all_tasks == 50 * 20 * per_token
    assert plan.prefix_cache == min(50 * 20 * per_token, 2**30 // 2)
    assert plan.fits and plan.total == plan.weights + plan.kv_cache + plan.prefix_cache + plan.step_transient


def test_ranks_must_divide_the_heads_and_fit_one_node():
    assert divisors(load_shape("smollm2-135m")) == [1, 3]
    with pytest.raises(ConfigError, match="does not divide the backbone's 9 attention heads and 3 KV heads"):
        resolve(_args("smollm2-135m", serve_ranks="2"))
    with pytest.raises(ConfigError, match="share one node, which has 2 devices"):
        resolve(_args("llama-3-8b", serve_ranks="4", devices_per_node=2))
    with pytest.raises(ConfigError, match="a number or auto"):
        resolve(_args("llama-3-8b", serve_ranks="two"))


def test_auto_picks_the_fewest_ranks_that_fit():
    args = _args(
        "llama-3-70b", serve_ranks="auto", dtype="bf16", memory_gb=72.0, serve_batch=32, seq_len=2048
    )
    plan = resolve(args)
    assert plan.ranks == 4 and plan.fits  # 140 GB of weights: 2 ranks hold 70 GB each, no room for KV
    assert not resolve(
        _args("llama-3-70b", serve_ranks="2", dtype="bf16", memory_gb=72.0, serve_batch=32, seq_len=2048)
    ).fits


def test_the_plan_command_prints_the_serving_section_and_refuses_a_bad_n_in_one_line():
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "plan",
        "llama-3-8b",
        "--devices-per-node",
        "2",
        "--memory-gb",
        "22",
    ]
    done = subprocess.run(
        [*cmd, "--serve-ranks", "2", "--seq-len", "4096"], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert (
        "serving, engine.tensor_parallel=2: per rank" in done.stdout and "(fits in 22.0 GiB)" in done.stdout
    )
    bad = subprocess.run([*cmd, "--serve-ranks", "3"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "choose one of [1, 2, 4, 8]" in bad.stderr


def test_the_8b_rayservice_deploys_replicas_of_two_gpu_ranks(tmp_path):
    """The shipped manifest's application, built the way Serve builds it: 2 bundles of 1 GPU, packed."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serving.auth import hash_key
    from serving.ray_app import app as builder

    service = yaml.safe_load((REPO / "k8s" / "rayservice-8b.yaml").read_text())
    (spec,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    (tmp_path / "store").mkdir()
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({"tenants": {"ops": {"key_sha256": [hash_key("k")], "tasks": "*"}}}))
    args = {
        "config": str(REPO / spec["args"]["config"]),
        "prompt_store": str(tmp_path / "store"),
        "overrides": [
            o.replace("/workspace/secrets/tenants.yaml", str(tenants)) for o in spec["args"]["overrides"]
        ],
    }
    deployment = call_user_app_builder_with_args_if_necessary(builder, args)._bound_deployment
    config, _ = deployment.init_args
    assert config.engine.tensor_parallel == 2 and config.engine.device == "cuda"
    assert deployment._replica_config.placement_group_bundles == [{"CPU": 2.0, "GPU": 1.0}] * 2
    assert deployment._replica_config.placement_group_strategy == "STRICT_PACK"
    assert 2 in divisors(load_shape("llama-3-8b"))
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert worker["rayStartParams"]["num-gpus"] == "2"  # one pod holds a whole replica
