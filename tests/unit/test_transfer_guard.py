"""The transfer guard (tuner/prompts/transfer_guard.py): a transferred start that trains worse than the
task's own start on its held-out slice falls back to its own; one that trains better is kept."""

import pytest
import torch
from conftest import tiny_job_yaml, tiny_llama, write_tiny_tasks
from safetensors.torch import load_file, save_file

from cluster.launch import train_local
from tuner import checkpoint as ckpt
from tuner.config import load_job_config
from tuner.model.prompt_lm import PromptTunedLM
from tuner.prompts.bank import PromptBank
from tuner.prompts.methods import make_layout
from tuner.prompts.transfer_guard import TransferCheck, check_transfer, probe, split_heldout
from tuner.tasks.batching import TokenizedExample

P, H = 4, 32
CHECK = TransferCheck(steps=6, heldout=8, lr=0.1, warmup_steps=0, max_steps=100, schedule="constant")


def _task(n=40):
    """Inputs of random tokens, every target token 7: a prompt that learns to say 7 scores better."""
    g = torch.Generator().manual_seed(0)
    return [TokenizedExample("t", torch.randint(3, 128, (6,), generator=g).tolist(), [7]) for _ in range(n)]


def _start(layout, seed, scale=1.0):
    """One row initialised as the method does from a small random prompt (scaled by `scale`)."""
    bank = PromptBank(["t"], *layout.row_shape)
    prompt = torch.randn(P, H, generator=torch.Generator().manual_seed(seed)) * 0.1 * scale

    def fill(b):
        b.set_prompt("t", prompt)

    emb = torch.nn.Embedding(128, H)
    shared = layout.initialise(bank, fill, torch.Generator().manual_seed(0), embed=emb)
    return bank.weight[0].clone(), shared


@pytest.mark.parametrize("method", ["independent", "ulpt"])
def test_a_bad_transferred_start_falls_back_and_a_good_one_is_kept(method, one_thread):
    lm = PromptTunedLM(tiny_llama())
    layout = make_layout(method, P, H, rank=2)
    own, shared = _start(layout, 1)
    kw = {"max_len": 32, "pad_id": 0, "device": torch.device("cpu")}
    train = {"t": _task()}
    fit, held = split_heldout(train["t"], CHECK.heldout)
    assert len(held) == 8 and fit + held == train["t"]
    # good: the task's own start already trained on the task for a while; bad: a start blown up 40x
    good = probe(lm, layout, shared, own, fit, TransferCheck(**{**CHECK.__dict__, "steps": 30}), **kw)
    bad = own * 40
    results = check_transfer(lm, layout, shared, {"t": (bad, own)}, train, CHECK, **kw) | {
        "good": check_transfer(lm, layout, shared, {"t": (good, own)}, train, CHECK, **kw)["t"]
    }
    assert results["t"].heldout == 8
    assert results["t"].transferred_loss > results["t"].own_loss and not results["t"].kept
    assert results["good"].transferred_loss < results["good"].own_loss and results["good"].kept


def test_too_few_examples_for_a_heldout_slice_keep_the_transferred_start():
    lm = PromptTunedLM(tiny_llama())
    layout = make_layout("independent", P, H)
    own, _ = _start(layout, 1)
    out = check_transfer(
        lm, layout, None, {"t": (own * 40, own)}, {"t": _task(3)}, CHECK, max_len=32, pad_id=0, device="cpu"
    )
    assert out == {}


def _job(root, backbone, names, **overrides):
    root.mkdir(parents=True, exist_ok=True)
    tasks = write_tiny_tasks(root, n_train=32, names=names)
    return tiny_job_yaml(root, backbone, tasks, **overrides)


def test_the_recipe_falls_back_from_a_deliberately_bad_transfer_to_the_tasks_own_start(
    tmp_path, tiny_backbone_dir
):
    """A finished source run whose prompts are then blown up 40x: a new task transferred from it falls back
    to exactly the start it has without transfer (its class-label init); with the check off it keeps
    the bad start."""
    from tuner.recipe import MultiTaskPromptTuningRecipe, RecipeHooks

    src_job = _job(tmp_path / "src", tiny_backbone_dir, ("pos_neg", "colors"), **{"optim.lr": 0.2})
    train_local(load_job_config(src_job, ["cluster.num_workers=1"]), progress=False)
    src = tmp_path / "src" / "runs" / "tiny"
    last = ckpt.latest_checkpoint(src / "checkpoints")
    tensors = load_file(str(last / "tensors.safetensors"))
    tensors["bank"] = tensors["bank"] * 40
    save_file(tensors, str(last / "tensors.safetensors"))

    def recipe(*overrides):
        job = _job(tmp_path / "new", tiny_backbone_dir, ("sizes",))
        lines = []
        r = MultiTaskPromptTuningRecipe(
            load_job_config(job, ["cluster.num_workers=1", *overrides]),
            RecipeHooks(on_message=lines.append),
            progress=False,
        )
        r.setup()
        return r, lines

    plain, _ = recipe("prompt.init=class_labels")
    transfer = ["prompt.init=transfer", f"prompt.init_from={src}", "prompt.transfer_check_steps=4"]
    guarded, lines = recipe(*transfer, "prompt.transfer_heldout=8")
    assert any("transfer check: sizes falls back to its own start" in line for line in lines), lines
    assert torch.equal(guarded.bank.prompt("sizes"), plain.bank.prompt("sizes"))
    unguarded, lines = recipe(*transfer[:2], "prompt.transfer_check_steps=0")
    assert not any("transfer check" in line for line in lines)
    src_rows = {n: tensors["bank"][i] for i, n in enumerate(ckpt.read_state(last).task_names)}
    assert any(torch.equal(unguarded.bank.prompt("sizes"), row) for row in src_rows.values())
