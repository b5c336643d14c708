"""The typed seams of serving: the engine's config is checked at load, one check of sampling values
serves the API and the engine, and the engine reports its stats and tasks as dataclasses."""

from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient
from serving_helpers import assert_error, engine_config, server_config, tiny_backbone_dir, write_prompt_store
from test_api_config import run_cli
from test_serving_engine import make_engine, save

from serving.api import create_app
from serving.config import EngineConfig, load_server_config
from serving.engine import Engine
from serving.metrics import ENGINE_SERIES, TENANT_SERIES
from serving.types import (
    MAX_SEED,
    EngineStats,
    InvalidRequest,
    SamplingParams,
    TaskInfo,
    TenantStats,
    check_sampling,
)
from tuner.config import ConfigError

BAD_ENGINE_VALUES = [
    ("backbone", " "),
    ("dtype", "bogus"),
    ("device", "tpu"),
    ("max_batch_size", "0"),
    ("max_queue", "0"),
    ("max_prompt_tokens", "-1"),
    ("max_new_tokens_limit", "0"),
    ("prefix_cache_bytes", "-1"),
    ("reload_interval_s", "0"),
    ("request_timeout_s", "-2.5"),
    ("max_step_tokens", "0"),
    ("threads", "-1"),
]


@pytest.mark.parametrize("key, value", BAD_ENGINE_VALUES)
def test_a_bad_engine_value_is_a_one_line_config_error_naming_its_key(key, value):
    with pytest.raises(ConfigError, match=f"engine.{key}") as err:
        load_server_config(None, [f"engine.{key}={value}"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=f"engine.{key}"):  # built in Python too, not only from YAML
        dataclasses.replace(EngineConfig(), **{key: type(getattr(EngineConfig(), key))(value)})


def test_engine_dtype_bogus_stops_serve_at_load(tmp_path, capsys):
    rc, err = run_cli(capsys, "--prompt-store", str(tmp_path), "api.auth=none", "engine.dtype=bogus")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "engine.dtype='bogus'" in lines[0], err


def test_good_engine_values_load():
    cfg = load_server_config(None, ["engine.device=cuda:1", "engine.dtype=bf16", "engine.threads=0"])
    assert (cfg.engine.device, cfg.engine.dtype, cfg.engine.threads) == ("cuda:1", "bf16", 0)


@pytest.mark.parametrize(
    "values, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 17}, "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"seed": MAX_SEED}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_check_sampling_names_the_refused_field(values, param):
    with pytest.raises(InvalidRequest) as err:
        check_sampling(SamplingParams(**values), max_tokens_limit=16)
    assert err.value.param == param


def test_check_sampling_accepts_the_edges_and_names_max_tokens_as_the_request_does():
    for values in ({"max_tokens": 16}, {"seed": MAX_SEED - 1, "temperature": 2.0}, {"top_p": 1.0}):
        check_sampling(SamplingParams(**values), max_tokens_limit=16)
    with pytest.raises(InvalidRequest, match="max_completion_tokens must be between 1 and 16") as err:
        check_sampling(SamplingParams(max_tokens=17), 16, max_tokens_param="max_completion_tokens")
    assert err.value.param == "max_completion_tokens"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_seams")
    cfg = server_config(
        engine_config(write_prompt_store(root, tiny_backbone_dir(root)), tiny_backbone_dir(root))
    )
    with TestClient(create_app(Engine(cfg.engine), cfg), raise_server_exceptions=False) as c:
        yield c, cfg.engine


@pytest.mark.parametrize(
    "body, values",
    [
        ({"max_tokens": 0}, {"max_tokens": 0}),
        ({"max_tokens": 257}, {"max_tokens": 257}),
        ({"seed": MAX_SEED}, {"seed": MAX_SEED}),
        ({"top_p": 1.5}, {"top_p": 1.5}),
        ({"stop": [""]}, {"stop": [""]}),
    ],
)
def test_the_api_refuses_with_the_engines_own_check(client, body, values):
    c, engine_cfg = client
    r = c.post("/v1/completions", json={"model": "sst2", "prompt": "a fine film", **body})
    with pytest.raises(InvalidRequest) as want:
        check_sampling(SamplingParams(**values), engine_cfg.max_new_tokens_limit)
    assert assert_error(r, 400, "invalid_value", want.value.param)["message"] == want.value.message


def test_chat_names_max_completion_tokens_over_max_tokens(client):
    c, _ = client
    chat = {"model": "samsum", "messages": [{"role": "user", "content": "hi"}]}
    r = c.post("/v1/chat/completions", json={**chat, "max_tokens": 1, "max_completion_tokens": 300})
    assert (
        "max_completion_tokens must be"
        in assert_error(r, 400, "invalid_value", "max_completion_tokens")["message"]
    )
    r = c.post("/v1/chat/completions", json={**chat, "max_tokens": 300})
    assert_error(r, 400, "invalid_value", "max_tokens")
    assert c.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 1}).status_code == 200


def test_the_engine_reports_typed_stats_and_task_info(tmp_path):
    engine = make_engine(tmp_path)
    m = engine.runner.model
    save(tmp_path, "gen", m)
    verbaliser = {"pos": " g", "neg": " b"}
    save(
        tmp_path, "cls", m, meta={"kind": "classification", "verbaliser": verbaliser, "stop": ["\n"]}, seed=1
    )
    engine.registry.refresh()
    stats = engine.stats()
    assert isinstance(stats, EngineStats) and stats.tasks == 2 and stats.tenants == {}
    assert stats["queue_depth"] == stats.queue_depth == 0  # read by key as when it was a dict
    with pytest.raises(KeyError):
        stats["no_such_field"]
    cls, gen = engine.task_info("cls"), engine.task_info("gen")
    assert isinstance(cls, TaskInfo) and (cls.kind, cls.labels, cls.stop) == (
        "classification",
        ["pos", "neg"],
        ["\n"],
    )
    assert cls.serves == {"complete", "classify"} and gen.serves == {"complete"}
    assert (gen.kind, gen.labels, gen.num_virtual_tokens, gen.score) == ("generation", [], 4, None)


def test_every_metric_series_reads_a_stats_field():
    assert set(ENGINE_SERIES) <= {f.name for f in dataclasses.fields(EngineStats)}
    assert set(TENANT_SERIES) == {f.name for f in dataclasses.fields(TenantStats)}
