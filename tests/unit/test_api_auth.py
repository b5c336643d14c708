"""Multi-tenant auth: hashed keys, 401s, and another tenant's task answered exactly like a missing one."""

from __future__ import annotations

import logging

import pytest
import yaml
from fastapi.testclient import TestClient
from serving_helpers import assert_error, engine_config, server_config, tiny_backbone_dir, write_prompt_store

from serving.api import create_app
from serving.auth import ANONYMOUS, KeyRing, hash_key, load_keyring
from serving.engine import Engine
from serving.types import TenantLimits
from tuner.config import ConfigError

KEYS = {"acme": "pf-test-acme", "globex": "pf-test-globex", "root": "pf-test-root"}


def write_tenants(path, tenants: dict) -> str:
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    return str(path)


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    return write_tenants(
        path,
        {
            "acme": {"key_sha256": [hash_key(KEYS["acme"])], "tasks": ["sst2", "trec"]},
            "globex": {"key_sha256": [hash_key(KEYS["globex"])], "tasks": ["samsum"]},
            "root": {"key_sha256": [hash_key(KEYS["root"])], "tasks": "*", "metrics": True},
        },
    )


@pytest.fixture(scope="module")
def client(tmp_path_factory, tenants_file):
    root = tmp_path_factory.mktemp("api_auth")
    backbone = tiny_backbone_dir(root)
    cfg = server_config(
        engine_config(write_prompt_store(root, backbone), backbone), auth=tenants_file, metrics_public=False
    )
    with TestClient(create_app(Engine(cfg.engine), cfg)) as c:
        yield c


def bearer(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def complete(client, task: str, headers: dict):
    return client.post(
        "/v1/completions", headers=headers, json={"model": task, "prompt": "hello", "max_tokens": 1}
    )


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic " + KEYS["acme"]},
        {"Authorization": KEYS["acme"]},
    ],
)
def test_missing_key_is_401(client, headers):
    for r in (
        complete(client, "sst2", headers),
        client.get("/v1/models", headers=headers),
        client.post("/v1/classify", headers=headers, json={"model": "sst2", "input": "x"}),
    ):
        assert "Missing API key" in assert_error(r, 401, "invalid_api_key", None)["message"]
        assert r.headers["WWW-Authenticate"] == "Bearer"


def test_wrong_key_is_401_even_with_a_bad_body(client):
    bad = {"Authorization": "Bearer pf-test-wrong"}
    assert_error(complete(client, "sst2", bad), 401, "invalid_api_key")
    # auth comes before the body is read: an anonymous caller learns nothing about routes or parsing
    assert_error(client.post("/v1/completions", headers=bad, content=b"{not json"), 401, "invalid_api_key")
    assert_error(client.get("/v1/secret-route"), 401, "invalid_api_key")


def test_key_grants_only_its_tenants_tasks(client):
    assert complete(client, "sst2", bearer("acme")).status_code == 200
    assert complete(client, "samsum", bearer("globex")).status_code == 200
    for task in ("sst2", "trec", "samsum"):
        assert complete(client, task, bearer("root")).status_code == 200


def _shape(resp, name: str) -> tuple:
    err = resp.json()["error"]
    return resp.status_code, err["type"], err["param"], err["code"], err["message"].replace(name, "<task>")


def test_another_tenants_task_is_indistinguishable_from_a_missing_one(client):
    for route, body in (
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
        ("/v1/classify", {"input": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ):
        forbidden = client.post(route, headers=bearer("acme"), json={"model": "samsum", **body})
        missing = client.post(route, headers=bearer("acme"), json={"model": "nosuchtask", **body})
        assert_error(forbidden, 404, "model_not_found", "model")
        assert _shape(forbidden, "samsum") == _shape(missing, "nosuchtask")
        assert forbidden.headers.keys() - {"content-length", "date"} == missing.headers.keys() - {
            "content-length",
            "date",
        }
    forbidden = client.get("/v1/models/samsum", headers=bearer("acme"))
    missing = client.get("/v1/models/nosuchtask", headers=bearer("acme"))
    assert _shape(forbidden, "samsum") == _shape(missing, "nosuchtask")


def test_models_lists_only_the_callers_tasks(client):
    def ids(tenant):
        r = client.get("/v1/models", headers=bearer(tenant))
        assert r.status_code == 200 and r.json()["object"] == "list"
        assert all(m["object"] == "model" for m in r.json()["data"])
        return [m["id"] for m in r.json()["data"]]

    assert ids("acme") == ["sst2", "trec"]
    assert ids("globex") == ["samsum"]
    assert ids("root") == ["samsum", "sst2", "trec"]


def test_health_is_public_and_metrics_needs_an_operator_key(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert_error(client.get("/metrics"), 401, "invalid_api_key")
    assert_error(client.get("/metrics", headers=bearer("globex")), 404)  # a tenant key is not enough
    assert client.get("/metrics", headers=bearer("root")).status_code == 200


def test_keyring_checks_every_digest(tmp_path):
    ring = KeyRing.from_file(
        write_tenants(
            tmp_path / "t.yaml",
            {
                "a": {"key_sha256": [hash_key("k1"), hash_key("k2")], "tasks": ["x"]},
                "b": {"key_sha256": [hash_key("k3").upper()], "tasks": "*"},
            },
        )
    )
    assert ring.authenticate("Bearer k1").name == "a" and ring.authenticate("Bearer k2").name == "a"
    assert ring.authenticate("bearer  k3 ").name == "b" and ring.authenticate("Bearer k3").tasks is None
    assert ring.authenticate("Bearer k4") is None and ring.authenticate(None) is None


@pytest.mark.parametrize(
    "tenants, match",
    [
        ({"a": {"key_sha256": ["not-a-digest"], "tasks": "*"}}, "SHA-256"),
        (
            {
                "a": {"key_sha256": [hash_key("k")], "tasks": "*"},
                "b": {"key_sha256": [hash_key("k")], "tasks": "*"},
            },
            "twice",
        ),
        ({"a": {"key_sha256": [hash_key("k")], "tasks": ["../etc"]}}, "not a valid name"),
        ({"a": {"key_sha256": [hash_key("k")]}}, "needs the keys"),
        ({"a": {"key_sha256": [hash_key("k")], "tasks": "*", "quota": 3}}, "may have"),
        ({"a": {"key_sha256": [hash_key("k")], "tasks": "*", "max_concurrent": -1}}, "max_concurrent"),
        ({"a": {"key_sha256": [hash_key("k")], "tasks": "*", "tokens_per_minute": 1.5}}, "tokens_per"),
        ({"a": {"key_sha256": [hash_key("k")], "tasks": "*", "weight": 0}}, "weight"),
        ({"a": {"key_sha256": [hash_key("k")], "tasks": "*", "metrics": "yes"}}, "metrics"),
        ({"a": {"key_sha256": [], "tasks": "*"}}, "non-empty"),
        ({"../a": {"key_sha256": [hash_key("k")], "tasks": "*"}}, "not a valid name"),
        ({}, "tenants"),
    ],
)
def test_bad_tenants_files_are_config_errors(tmp_path, tenants, match):
    with pytest.raises(ConfigError, match=match):
        KeyRing.from_file(write_tenants(tmp_path / "t.yaml", tenants))


def test_auth_is_only_disabled_explicitly(tmp_path, caplog):
    with pytest.raises(ConfigError, match="api.auth is not set"):
        load_keyring("")
    with pytest.raises(ConfigError, match="not found"):
        load_keyring(str(tmp_path / "missing.yaml"))
    with caplog.at_level(logging.WARNING):
        ring = load_keyring("none")
    assert "DISABLED" in caplog.text
    assert ring.authenticate(None) is ANONYMOUS


def test_tenant_limits_are_read_from_the_tenants_file(tmp_path):
    ring = KeyRing.from_file(
        write_tenants(
            tmp_path / "t.yaml",
            {
                "a": {
                    "key_sha256": [hash_key("k1")],
                    "tasks": "*",
                    "max_concurrent": 4,
                    "tokens_per_minute": 1000,
                    "weight": 2,
                },
                "b": {"key_sha256": [hash_key("k2")], "tasks": ["x"]},
            },
        )
    )
    assert ring.tenant_limits() == {"a": TenantLimits(4, 1000, 2.0), "b": TenantLimits()}


def test_the_example_tenants_file_loads_with_limits():
    ring = KeyRing.from_file("configs/serving/tenants.example.yaml")
    limits = ring.tenant_limits()
    assert set(limits) == {"acme", "globex", "admin"} and limits["acme"].max_concurrent > 0
    assert ring.authenticate("Bearer pf-demo-admin-key").metrics
    assert not ring.authenticate("Bearer pf-demo-acme-key").metrics
