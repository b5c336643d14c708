"""Prompt registry: hot reload, incomplete and foreign adapters, names that look like paths."""

from __future__ import annotations

import logging
import os
import shutil
import threading

import pytest
import torch
from transformers import LlamaConfig

from serving.prompt_format import format_prompt
from serving.registry import PromptRegistry
from serving.types import InvalidRequest, UnknownTask
from tuner.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TaskAdapter, load_adapter, save_adapter

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
    (tmp_path / "store" / "a").unlink()  # the published pointer
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
    two = {"template": "{premise} / {hypothesis}", "prefix": "P: "}
    assert format_prompt(two, '{"hypothesis": " b ", "premise": "a"}') == "P: a / b"  # fields as JSON
    with pytest.raises(InvalidRequest, match="premise, hypothesis"):
        format_prompt(two, "just text")  # was silently sent unformatted: a train/serve skew
    assert format_prompt({}, "plain") == "plain"


def test_broken_entries_never_stop_the_rest_of_the_store(tmp_path, caplog):
    """Row 4: one self-referencing symlink (or an unreadable file) used to stop every reload."""
    save(tmp_path, "a")
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN)
    reg.refresh()
    os.symlink("loop", tmp_path / "loop")  # points at itself
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    unreadable = save(tmp_path, "unreadable")
    weights = unreadable.resolve() / ADAPTER_WEIGHTS
    weights.unlink()
    weights.mkdir()  # reading it fails with an OSError (root can read any file, not a directory)
    with caplog.at_level(logging.WARNING):
        save(tmp_path, "b")
        shutil.rmtree(tmp_path / ".versions" / "a")
        (tmp_path / "a").unlink()
        changes = reg.refresh()
        assert changes.added == ["b"] and changes.removed == ["a"] and reg.names() == ["b"]
        for _ in range(5):  # rescanned every few seconds: logged once, not every time
            assert not reg.refresh()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 3, warnings
    assert {w.split()[3] for w in warnings} == {"loop", "dangling", "unreadable"}
    assert not [r for r in caplog.records if r.exc_info]


def test_symlinks_out_of_the_store_are_refused_unless_allowed(tmp_path):
    outside = save(tmp_path / "elsewhere", "x").resolve()
    store = tmp_path / "store"
    store.mkdir()
    os.symlink(outside, store / "x")
    save(store, "inside")
    os.symlink(store / "inside" / ADAPTER_CONFIG, tmp_path / "cfg-link")
    assert PromptRegistry(store, {"tiny"}, HIDDEN).refresh().added == ["inside"]
    assert PromptRegistry(store, {"tiny"}, HIDDEN, allow_symlinks=True).refresh().added in (
        ["inside", "x"],
        ["x", "inside"],
    )
    # an adapter file that is a link (e.g. to a file the server should never read) is refused too
    linked = store / "linked"
    linked.mkdir()
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        os.symlink((store / "inside").resolve() / f, linked / f)
    assert "linked" not in PromptRegistry(store, {"tiny"}, HIDDEN).names()
    reg = PromptRegistry(store, {"tiny"}, HIDDEN)
    reg.refresh()
    assert reg.names() == ["inside"]


def test_a_failed_reload_keeps_the_last_good_version_serving(tmp_path):
    """Row 9: overwriting a served task in place used to make it 404 until the files were consistent."""
    save(tmp_path, "a", P=4)
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN)
    reg.refresh()
    live = (tmp_path / "a").resolve()
    (live / ADAPTER_CONFIG).write_text("{ half written")
    assert not reg.refresh() and reg.get("a").num_virtual_tokens == 4  # still the good version
    (live / ADAPTER_WEIGHTS).unlink()
    assert not reg.refresh() and reg.get("a").num_virtual_tokens == 4
    save(tmp_path, "a", P=6)  # a good version published: served on the next refresh
    assert reg.refresh().changed == ["a"] and reg.get("a").num_virtual_tokens == 6


def test_publishing_is_atomic_for_a_reader_scanning_all_the_time(tmp_path):
    """Row 9: the task is never missing while new versions are published, and nothing is left
    behind that breaks a later export (the old scheme's `.name.old`)."""
    save(tmp_path, "a", P=2)
    (tmp_path / ".a.old").mkdir()  # a leftover of the old two-rename publish
    seen, stop = [], threading.Event()

    def read_all_the_time():
        while not stop.is_set():
            try:
                seen.append(load_adapter(tmp_path / "a").prompt.shape[0])
            except Exception as e:  # noqa: BLE001 - any failure is what this test looks for
                seen.append(repr(e))

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        for P in range(3, 23):
            save(tmp_path, "a", P=P)
    finally:
        stop.set()
        reader.join()
    assert seen and all(isinstance(x, int) for x in seen), [x for x in seen if not isinstance(x, int)][:3]
    assert sorted(set(seen)) == sorted(set(seen) & set(range(2, 23)))
    assert load_adapter(tmp_path / "a").prompt.shape[0] == 22
    assert len(list((tmp_path / ".versions" / "a").iterdir())) <= 2  # the live one and the one before


def test_a_store_written_before_versioning_is_migrated(tmp_path):
    legacy = tmp_path / "a"
    save(tmp_path / "tmp", "a", P=3)
    shutil.copytree((tmp_path / "tmp" / "a").resolve(), legacy)  # a plain directory, as before
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN)
    assert reg.refresh().added == ["a"]
    save(tmp_path, "a", P=5)
    assert (tmp_path / "a").is_symlink() and reg.refresh().changed == ["a"]
    assert reg.get("a").num_virtual_tokens == 5
