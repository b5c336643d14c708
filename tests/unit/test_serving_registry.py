"""Prompt registry: hot reload, incomplete and foreign adapters, names that look like paths."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import LlamaConfig

from serving.prompt_format import format_prompt
from serving.registry import PromptRegistry
from serving.types import UnknownTask
from tuner.export import ADAPTER_WEIGHTS, TaskAdapter, save_adapter

HIDDEN = 32
CFG = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=4, num_hidden_layers=2)


def save(root, name, backbone="tiny", hidden=HIDDEN, P=4, meta=None):
    return save_adapter(
        root, TaskAdapter(name, torch.randn(P, hidden), backbone, meta or {"kind": "generation"}), CFG
    )


def test_refresh_adds_changes_and_removes_tasks(tmp_path):
    reg = PromptRegistry(tmp_path / "store", {"tiny"}, HIDDEN)
    assert reg.refresh().added == [] and reg.names() == []  # the store does not exist yet
    save(tmp_path / "store", "a")
    assert reg.refresh().added == ["a"]
    assert not reg.refresh()  # nothing changed: nothing reloaded
    version = reg.get("a").version
    save(tmp_path / "store", "a", P=6)
    changes = reg.refresh()
    assert (
        changes.changed == ["a"] and reg.get("a").num_virtual_tokens == 6 and reg.get("a").version != version
    )
    shutil.rmtree(tmp_path / "store" / "a")
    assert reg.refresh().removed == ["a"] and reg.names() == []


def test_incomplete_foreign_and_misshapen_adapters_are_not_served(tmp_path):
    save(tmp_path, "good")
    save(tmp_path, "other_backbone", backbone="llama-70b")
    save(tmp_path, "wrong_width", hidden=HIDDEN + 1)
    half = save(tmp_path, "half")
    os.remove(half / ADAPTER_WEIGHTS)  # a copy still in progress
    (tmp_path / ".tmp-partial").mkdir()
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN)
    reg.refresh()
    assert reg.names() == ["good"]
    save(tmp_path, "half")  # completed later: served on the next refresh
    assert reg.refresh().added == ["half"]


@pytest.mark.parametrize("name", ["../good", "good/../good", "a/b", "", "nope", "/etc/passwd"])
def test_path_like_or_unknown_names_are_unknown_tasks(tmp_path, name):
    save(tmp_path, "good")
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN)
    reg.refresh()
    with pytest.raises(UnknownTask):
        reg.get(name)


def test_format_prompt_fills_the_single_template_field_after_the_prefix():
    meta = {"prefix": "Classify.\n\n", "template": "Review: {sentence}\nSentiment:"}
    assert format_prompt(meta, " great movie! ") == "Classify.\n\nReview: great movie!\nSentiment:"
    assert format_prompt(meta, "as is", raw=True) == "as is"
    assert format_prompt({"template": "{premise} / {hypothesis}"}, "x") == "x"  # two fields: text unchanged
    assert format_prompt({}, "plain") == "plain"
