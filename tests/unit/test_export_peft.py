"""A prompt we export loads with `peft.PeftModel.from_pretrained` and gives the same logits as our wrapper."""

import json

import pytest
import torch
from conftest import tiny_llama

from tuner.export import TaskAdapter, load_adapter, save_adapter
from tuner.model.prompt_lm import PromptTunedLM
from tuner.tasks.batching import TokenizedExample, collate


def our_logits(lm, prompt, ids):
    """Logits at every text position from our wrapper (prompt in front, positions from 0)."""
    P = prompt.shape[0]
    batch = collate([TokenizedExample("t", ids, [0])], {"t": 0}, P, max_len=256, pad_id=0)
    hidden = lm.hidden_states(batch, prompt[None])
    return lm.lm_head(hidden[0, P : P + len(ids)])


def peft_logits(backbone, adapter_dir, ids):
    from peft import PeftModel

    model = PeftModel.from_pretrained(backbone, str(adapter_dir))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    P = model.peft_config["default"].num_virtual_tokens
    return out.logits[0, P:]  # PEFT returns logits for the virtual tokens too


def test_exported_prompt_matches_peft(tmp_path):
    backbone = tiny_llama()
    lm = PromptTunedLM(backbone)
    prompt = torch.randn(5, 32)
    d = save_adapter(
        tmp_path, TaskAdapter("task-1", prompt, "tiny", {"kind": "classification"}), backbone.config
    )
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 5
    assert sorted(p.name for p in d.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "promptfleet_task.json",
    ]
    ids = [5, 17, 33, 90, 4, 8, 11]
    with torch.no_grad():
        ours = our_logits(lm, prompt, ids)
    theirs = peft_logits(tiny_llama(), d, ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_adapter_round_trip_and_validation(tmp_path):
    backbone = tiny_llama()
    prompt = torch.randn(3, 32)
    save_adapter(
        tmp_path, TaskAdapter("sst2", prompt, "smollm2-135m", {"verbaliser": {"0": " no"}}), backbone.config
    )
    a = load_adapter(tmp_path / "sst2")
    assert a.name == "sst2" and a.backbone == "smollm2-135m" and a.meta["verbaliser"] == {"0": " no"}
    torch.testing.assert_close(a.prompt, prompt)
    # re-saving replaces atomically and leaves no temp dirs
    save_adapter(tmp_path, TaskAdapter("sst2", prompt * 2, "smollm2-135m"), backbone.config)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".versions", "sst2"]
    assert load_adapter(tmp_path / "sst2").prompt.equal(prompt * 2)
    with pytest.raises(Exception, match="valid name"):
        save_adapter(tmp_path, TaskAdapter("../evil", prompt, "x"), backbone.config)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_adapter(tmp_path / "pickled")
