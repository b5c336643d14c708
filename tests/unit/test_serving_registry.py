"""Prompt registry: hot reload, incomplete and foreign adapters, names that look like paths."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from serving.engine import render_prompt as format_prompt
from serving.registry import PromptRegistry
from serving.types import InvalidRequest, UnknownTask
from tuner.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_META, TaskAdapter, load_adapter, save_adapter

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


def hand_copied(root, name, prompt=None, meta=None, P=4):
    """A task directory written by hand (no versioned publishing), with any meta or prompt."""
    d = root / name
    d.mkdir()
    save(root / ".src", name, P=P)
    src = (root / ".src" / name).resolve()
    shutil.copy(src / ADAPTER_CONFIG, d / ADAPTER_CONFIG)
    if prompt is None:
        shutil.copy(src / ADAPTER_WEIGHTS, d / ADAPTER_WEIGHTS)
    else:
        save_file({"prompt_embeddings": prompt}, str(d / ADAPTER_WEIGHTS))
    if meta is not None:
        (d / TASK_META).write_text(json.dumps(meta))
    return d


def test_a_fifo_in_the_store_is_refused_without_blocking_the_scan(tmp_path, caplog):
    """A FIFO named like an adapter file used to block the engine thread in open() until a writer
    came: every request of every tenant hung. It is now refused by its file type, like a link."""
    save(tmp_path, "good")
    for fname in (ADAPTER_CONFIG, TASK_META):
        d = hand_copied(tmp_path, f"fifo_{fname.split('.')[0]}")
        if (d / fname).exists():
            (d / fname).unlink()
        os.mkfifo(d / fname)
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (reg.refresh(), done.set()), daemon=True)
    with caplog.at_level(logging.WARNING):
        worker.start()
        assert done.wait(30), "the scan blocked on a FIFO"
    assert reg.names() == ["good"]
    assert sum("not a regular file" in r.getMessage() for r in caplog.records) == 2
    # load_adapter (also what training's init_from reads) checks the open descriptor itself
    with pytest.raises(ValueError, match="not a regular file"):
        load_adapter(tmp_path / f"fifo_{TASK_META.split('.')[0]}")


@pytest.mark.parametrize(
    "meta, reason",
    [
        (
            {"kind": "classification", "prefix": 5, "verbaliser": {"0": " a", "1": " b"}},
            "prefix must be a string",
        ),
        ({"template": None}, "template must be a string"),
        ({"template": "{text:>99999999999}"}, "only plain"),
        ({"template": "{text!r}"}, "only plain"),
        ({"template": "{text.__class__}"}, "only plain"),
        ({"template": "{0}"}, "only plain"),
        ({"template": "{text"}, "template"),
        ({"kind": "classification", "verbaliser": [" a", " b"]}, "verbaliser"),
        ({"kind": "classification", "verbaliser": {"0": 5, "1": 6}}, "verbaliser"),
        ({"kind": 5}, "kind must be a string"),
        ({"kind": "regression"}, "kind must be one of"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"score": "high"}, "score"),
        ({"stop": "\n"}, "stop"),
        # Issue 34: every field is bounded (the prefix and template by the server's longest prompt)
        ({"kind": "classification", "verbaliser": {str(i): " w" for i in range(1001)}}, "more than 1000"),
        ({"kind": "classification", "verbaliser": {"0": " " + "w" * 256}}, "257 characters, more than 256"),
        ({"kind": "classification", "verbaliser": {"x" * 257: " w"}}, "a verbaliser label has 257"),
        ({"stop": ["\n"] * 17}, "stop has 17 strings, more than 16"),
        ({"stop": ["x" * 257]}, "a stop string has 257 characters"),
        ({"description": "d" * 4097}, "description has 4097 characters, more than 4096"),
        ({"metric": "m" * 257}, "metric has 257 characters"),
        ({"max_new_tokens": 1 << 21}, "max_new_tokens must be a positive integer of at most"),
        ({"prefix": "Classify.\ud800\n\n"}, "prefix is not valid unicode"),
        ({"template": "{text}\udfff"}, "template is not valid unicode"),
    ],
)
def test_bad_task_metadata_refuses_the_adapter_at_load(tmp_path, caplog, meta, reason):
    """Each of these used to load, be listed in /v1/models, then answer every request with a 500
    (or allocate gigabytes per request, for the width): now the task is refused once, at load."""
    save(tmp_path, "good")
    hand_copied(tmp_path, "bad", meta=meta)
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN)
    with caplog.at_level(logging.WARNING):
        reg.refresh()
    assert reg.names() == ["good"]
    assert [r.getMessage() for r in caplog.records if reason in r.getMessage()], caplog.text


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_prompt_is_refused(tmp_path, value):
    prompt = torch.randn(4, HIDDEN)
    prompt[1, 3] = value
    hand_copied(tmp_path, "bad", prompt=prompt)
    save(tmp_path, "good")
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN)
    reg.refresh()
    assert reg.names() == ["good"]


def test_a_prompt_that_fills_the_context_is_refused(tmp_path):
    save(tmp_path, "fits", P=7)
    save(tmp_path, "too_long", P=8)
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN, max_virtual_tokens=7)
    reg.refresh()
    assert reg.names() == ["fits"]


def test_multi_field_input_that_json_cannot_hold_as_text_is_a_400():
    """Fields sent as a JSON object are parsed inside the task's renderer: a lone surrogate there, or
    arrays nested past Python's recursion limit, used to escape as a 500."""
    two = {"template": "{premise} / {hypothesis}"}
    with pytest.raises(InvalidRequest, match="not valid unicode"):
        format_prompt(two, '{"premise": "\\ud800", "hypothesis": "b"}')
    deep = '{"premise": ' + "[" * 5000 + "]" * 5000 + ', "hypothesis": "b"}'
    with pytest.raises(InvalidRequest, match="premise, hypothesis"):
        format_prompt(two, deep)
    assert format_prompt(two, '{"premise": "\\u00e9", "hypothesis": "b"}') == "é / b"


def test_a_version_replaced_twice_while_a_reader_opens_it_is_read_whole(tmp_path, monkeypatch):
    """Issue 34: a reader resolved `a` to version N, two publishes then pruned N before the reader
    opened its files (FileNotFoundError on a loaded machine). The race is injected here: right
    after the reader resolves the link, versions P=3 and P=4 are published."""
    import tuner.export

    save(tmp_path, "a", P=2)
    resolve, published = tuner.export._resolve_version, []

    def resolve_then_publish_twice(task_dir):
        version = resolve(task_dir)
        if not published:
            published.append(version)
            save(tmp_path, "a", P=3)
            save(tmp_path, "a", P=4)  # prunes the version just resolved
            assert not version.exists()
        return version

    monkeypatch.setattr(tuner.export, "_resolve_version", resolve_then_publish_twice)
    adapter = load_adapter(tmp_path / "a")
    assert published and adapter.prompt.shape == (4, HIDDEN)  # config and weights of one version
    assert adapter.meta.kind == "generation"


def test_the_registry_loads_the_newest_version_when_the_scanned_one_is_pruned(tmp_path, monkeypatch, caplog):
    """The registry's side of the same race: it fingerprinted version N, then N was pruned before
    it loaded it. It used to log the task as broken (and not serve a new task) until the next scan."""
    import serving.registry

    save(tmp_path, "a", P=2)
    fingerprint, published = serving.registry._fingerprint, []

    def fingerprint_then_publish_twice(task_dir, allow_symlinks):
        fp = fingerprint(task_dir, allow_symlinks)
        if not published:
            published.append(task_dir)
            save(tmp_path, "a", P=3)
            save(tmp_path, "a", P=4)
        return fp

    monkeypatch.setattr(serving.registry, "_fingerprint", fingerprint_then_publish_twice)
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN)
    with caplog.at_level(logging.WARNING, logger="serving.registry"):
        assert reg.refresh().added == ["a"]
    assert published and reg.get("a").num_virtual_tokens == 4 and not caplog.records
    assert reg.get("a").path == str((tmp_path / "a").resolve())
    assert not reg.refresh()  # its fingerprint is the newest version's: nothing to reload


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_prompt_saved_with_header_metadata_or_half_precision_loads(tmp_path, dtype):
    """PEFT writes {"format": "pt"} into the safetensors header; the header check allows it."""
    prompt = torch.randn(4, HIDDEN).to(dtype)
    d = hand_copied(tmp_path, "peft")
    save_file({"prompt_embeddings": prompt}, str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    reg = PromptRegistry(tmp_path, {"tiny"}, HIDDEN, max_virtual_tokens=4, max_text_chars=10)
    assert reg.refresh().added == ["peft"]
    assert reg.get("peft").prompt.dtype == torch.float32 and reg.get("peft").prompt.equal(prompt.float())
