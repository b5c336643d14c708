"""Serving config and `promptfleet serve`: every shipped YAML loads, bad input is a one-line exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main
from serving.auth import KeyRing
from serving.config import ServerConfig, load_server_config
from tuner.config import ConfigError

SERVING_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "serving"


def test_default_yaml_maps_onto_the_dataclass_defaults():
    cfg = load_server_config(SERVING_CONFIGS / "default.yaml")
    assert cfg == ServerConfig()  # the YAML documents the defaults, it does not drift from them


def test_example_tenants_file_loads_and_its_demo_keys_work():
    ring = KeyRing.from_file(SERVING_CONFIGS / "tenants.example.yaml")
    assert ring.authenticate("Bearer pf-demo-acme-key").may_use("sst2")
    assert not ring.authenticate("Bearer pf-demo-acme-key").may_use("samsum")
    assert ring.authenticate("Bearer pf-demo-admin-key").tasks is None


def test_overrides_and_relative_auth_path(tmp_path):
    (tmp_path / "keys").mkdir()
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("api:\n  auth: keys/tenants.yaml\nengine:\n  max_batch_size: 4\n")
    cfg = load_server_config(cfg_file, ["engine.max_queue=7", "ray.max_replicas=3"])
    assert cfg.api.auth == str(tmp_path / "keys" / "tenants.yaml")  # relative to the YAML, not the CWD
    assert (cfg.engine.max_batch_size, cfg.engine.max_queue, cfg.ray.max_replicas) == (4, 7, 3)
    assert load_server_config(cfg_file, ["api.auth=none"]).api.auth_disabled


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["api.bogus=1"], "unknown key"),
        (["api.port=70000"], "api.port"),
        (["api.log_level=loud"], "api.log_level"),
        (["ray.min_replicas=3", "ray.max_replicas=2"], "min_replicas"),
        (["api.default_max_tokens=600"], "max_new_tokens_limit"),
        (["api.metrics_public=maybe"], "true/false"),
    ],
)
def test_bad_values_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_server_config(None, overrides)


def run_cli(capsys, *argv) -> tuple[int, str]:
    try:
        rc = main(["serve", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no prompt store"),
        (["--prompt-store", "/nonexistent/store"], "prompt store not found"),
        (["--prompt-store", "{store}"], "api.auth is not set"),
        (["--prompt-store", "{store}", "api.auth=/nonexistent/tenants.yaml"], "tenants file not found"),
        (["--prompt-store", "{store}", "--config", "/nonexistent.yaml"], "config file not found"),
        (["--prompt-store", "{store}", "engine.bogus=1"], "unknown key"),
    ],
)
def test_serve_config_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
    rc, err = run_cli(capsys, *[a.replace("{store}", str(tmp_path)) for a in argv])
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("promptfleet: error:") and message in lines[0], err


def test_serve_bad_flags_exit_2(capsys):
    rc, err = run_cli(capsys, "--port", "eighty")
    assert rc == 2 and "invalid int value" in err
    rc, err = run_cli(capsys, "--bogus-flag")
    assert rc == 2 and "unrecognized argument" in err


def test_ray_application_carries_the_autoscaling_config():
    from serving.ray_app import build_application

    cfg = load_server_config(None, ["ray.min_replicas=1", "ray.max_replicas=4", "ray.num_cpus=2"])
    deployment = build_application(cfg, KeyRing([]))._bound_deployment
    assert deployment.name == "promptfleet" and deployment.ray_actor_options["num_cpus"] == 2
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 16.0)
