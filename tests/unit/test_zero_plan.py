"""Memory arithmetic, the replicate-or-shard decision (`cluster.zero_stage: auto`) and `promptfleet plan`.

The arithmetic is checked against direct counts on tiny models (parameters, KV cache tensors);
the decision against the real SmolLM2 backbone on this machine's memory.
"""

import pytest
import torch
from conftest import REPO, tiny_llama, write_tiny_tasks

from cluster.cli import main as cli_main
from tuner.config import ConfigError, JobConfig, load_job_config
from tuner.job import PreparedJob, job_workload, load_task_specs, zero_setup
from tuner.model.memory import GB, BackboneShape, Workload, estimate, load_shape
from tuner.model.zero import ZeroSettings, choose_zero, deepspeed_config


def _shape(model) -> BackboneShape:
    return BackboneShape.from_config(model.config.to_dict())


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_matches_the_model(tied):
    model = tiny_llama(layers=3)
    if not tied:
        from transformers import LlamaForCausalLM

        cfg = model.config
        cfg.tie_word_embeddings = False
        model = LlamaForCausalLM(cfg)
    shape = _shape(model)
    assert shape.num_params == sum(p.numel() for p in model.parameters())
    assert shape.layer_params == sum(p.numel() for p in model.model.layers[0].parameters())
    assert shape.embedding_params == model.get_input_embeddings().weight.numel()


def test_kv_cache_per_request_matches_the_cache_a_forward_builds():
    model = tiny_llama(layers=3)
    L = 10
    with torch.no_grad():
        cache = model(torch.randint(3, 100, (1, L)), use_cache=True).past_key_values
    direct = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    mem = estimate(_shape(model), Workload(seq_len=L, micro_batch=1, num_tasks=1, dtype="fp32"), partition=1)
    assert mem.kv_per_request == direct


def test_shard_and_checkpointing_arithmetic():
    shape = load_shape("llama-3-8b")
    assert 8.0e9 < shape.num_params < 8.1e9  # the published 8.03 B
    work = Workload(seq_len=1024, micro_batch=2, num_tasks=10)
    mem = estimate(shape, work, partition=8)
    assert mem.weight_shard * 8 == pytest.approx(mem.weights_replicated, abs=8 * 2)
    # Checkpointing keeps one hidden state per token and layer, plus one layer's activations.
    tokens = 1024 * 2
    per_layer = shape.activation_bytes_per_token_layer(2)
    assert mem.activations == tokens * shape.num_layers * per_layer
    assert mem.activations_checkpointed == tokens * (shape.num_layers * 2 * shape.hidden_size + per_layer)
    assert mem.prompt_bank_and_optimiser == 3 * 4 * 10 * 20 * shape.hidden_size


def _smollm2_job(*overrides):
    return load_job_config(REPO / "configs" / "quickstart.yaml", ["cluster.num_workers=2", *overrides])


def _prepared(cfg) -> PreparedJob:
    return PreparedJob(cfg, load_task_specs(cfg.tasks))


def test_auto_replicates_smollm2_on_this_machine():
    from tuner.model.model_cache import resolve_backbone

    logged = []
    job = _prepared(_smollm2_job())
    setup = zero_setup(job, resolve_backbone("smollm2-135m"), torch.float32, 2, logged.append)
    assert setup.choice.stage == 0 and setup.settings is None
    assert len(logged) == 1 and "replicate" in logged[0]


def test_auto_shards_when_the_budget_is_below_the_model():
    from transformers.integrations import is_deepspeed_zero3_enabled

    from tuner.model.model_cache import resolve_backbone

    logged = []
    # SmolLM2 in fp32 is 0.5 GiB: a 0.3 GiB budget cannot hold it whole.
    cfg = _smollm2_job("cluster.memory_budget_gb=0.3")
    setup = zero_setup(_prepared(cfg), resolve_backbone("smollm2-135m"), torch.float32, 2, logged.append)
    assert setup.choice.stage == 3 and setup.settings.stage == 3
    assert setup.hf_config.is_zero3()
    assert "ZeRO-3" in logged[0] and "0.3 GiB" in logged[0]
    del setup
    assert not is_deepspeed_zero3_enabled()  # nothing left behind for later loads


def test_the_prompt_bank_is_sized_for_every_task_a_family_registers(tmp_path):
    """A task family is one entry of `cfg.tasks` that registers a task per id: the workload the layout is
    chosen for holds a prompt-bank row (and its Adam moments) per registered task, 3 + 1 here, not 2."""
    rows = ["customer\tsentence\tlabel"] + [f"c{i}\tfine film\t{j}" for i in range(3) for j in (0, 1)]
    for split in ("train", "eval"):
        (tmp_path / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "reviews.yaml").write_text(
        "name: reviews\nkind: classification\nfamily: {id_column: customer}\n"
        "data: {format: tsv, train: train.tsv, eval: eval.tsv}\n"
        'template: "Review: {sentence}\\nSentiment:"\nverbaliser: {"0": " negative", "1": " positive"}\n'
    )
    (plain,) = write_tiny_tasks(tmp_path, n_train=2, n_eval=2, names=("pos_neg",))
    cfg = JobConfig(tasks=[str(tmp_path / "reviews.yaml"), str(plain)])
    cfg.prompt.num_virtual_tokens = 8
    job = _prepared(cfg)
    work = job_workload(job, 2, torch.float32)
    assert len(cfg.tasks) == 2 and work.num_tasks == len(job.task_names) == 4
    shape = _shape(tiny_llama())
    assert estimate(shape, work, partition=1).prompt_bank_and_optimiser == 3 * 4 * 4 * 8 * shape.hidden_size


def test_several_nodes_add_hpz_inside_a_node():
    mem = estimate(load_shape("llama-3-70b"), Workload(2048, 4, 100), partition=32)
    one = choose_zero(mem, 72 * GB, num_nodes=1, ranks_per_node=32)
    four = choose_zero(mem, 72 * GB, num_nodes=4, ranks_per_node=8)
    assert (one.stage, one.hpz_partition_size) == (3, 1)
    assert (four.stage, four.hpz_partition_size) == (3, 8)
    assert four.activation_checkpointing  # 200+ GiB of activations do not fit without it


def test_deepspeed_reads_the_settings_we_write():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    s = ZeroSettings(param_persistence_threshold=123, max_reuse_distance=7, hpz_partition_size=4)
    ds = DeepSpeedZeroConfig(**deepspeed_config(s, torch.float32)["zero_optimization"])
    assert (ds.param_persistence_threshold, ds.max_reuse_distance, ds.zero_hpz_partition_size) == (123, 7, 4)
    assert ds.prefetch_bucket_size == s.prefetch_bucket_size and ds.overlap_comm


@pytest.mark.parametrize("value,expected", [(3, "3"), ("auto", "auto"), (0, "0")])
def test_zero_stage_accepts_auto_and_stages(value, expected):
    assert _smollm2_job(f"cluster.zero_stage={value}").cluster.zero_stage == expected


def test_zero_stage_rejects_others():
    with pytest.raises(ConfigError, match="cluster.zero_stage"):
        _smollm2_job("cluster.zero_stage=4")


def test_plan_cli_prints_memory_and_recommendation(capsys):
    assert cli_main(["plan", "llama-3-70b", "--nodes", "4", "--devices-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "weight shard (ZeRO-3, 1/32)" in out and "cluster.zero_stage=3" in out
    assert "cluster.zero_hpz_partition_size=8" in out


def test_plan_reads_a_config_directory(tmp_path, capsys):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    assert cli_main(["plan", str(tmp_path), "--devices-per-node", "2", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["memory_bytes"]["weights_replicated"] == 2 * sum(p.numel() for p in model.parameters())
    assert out["recommended"]["stage"] == 0


def test_plan_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["plan", "--help"])
    assert e.value.code == 0
    assert "--devices-per-node" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "no-such-model"],
        ["plan", "llama-3-8b", "--nodes", "0"],
        ["plan", "llama-3-8b", "--memory-gb", "-1"],
        ["plan", "llama-3-8b", "--memory-gb", "nan"],  # was a ValueError traceback line from int(nan)
        ["plan", "llama-3-8b", "--memory-gb", "inf"],  # was an OverflowError, exit 1
    ],
)
def test_plan_bad_input_is_one_line_and_exit_2(argv, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("promptfleet: error:") and "\n" not in err
