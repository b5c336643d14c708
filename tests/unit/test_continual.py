"""Every prompt method end to end on the tiny backbone: export == the composed training prompt,
checkpoint/resume of shared parts (trained, or fixed as ULPT's projection and SuperPos's vocabulary
sample), continual training (`prompt.init_from`) and transfer init."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_job_yaml, write_tiny_tasks

from cluster.launch import train_local
from tuner import checkpoint as ckpt
from tuner.config import ConfigError, load_job_config
from tuner.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_META
from tuner.prompts.methods import make_layout
from tuner.tasks.batching import TokenizedExample, collate

METHODS = ["independent", "residual", "multitask", "ulpt", "superpos"]
SHAPE = {"prompt.rank": 2, "prompt.bottleneck": 8, "prompt.superpos_tokens": 8}


def _layout(method):
    return make_layout(method, 4, 32, rank=2, bottleneck=8, superpos_tokens=8)


def _job(root, backbone, names, **overrides):
    root.mkdir(parents=True, exist_ok=True)
    tasks = write_tiny_tasks(root, n_train=16, names=names)
    return tiny_job_yaml(root, backbone, tasks, **{**SHAPE, **overrides})


def _cfg(job, *overrides):
    return load_job_config(job, ["cluster.num_workers=1", *overrides])


@pytest.fixture(scope="module")
def source_runs(tmp_path_factory, tiny_backbone_dir):
    """A finished 4-step run of tasks pos_neg + colors per method."""
    runs = {}
    for method in METHODS:
        root = tmp_path_factory.mktemp(f"src-{method}")
        job = _job(
            root, tiny_backbone_dir, ("pos_neg", "colors"), **{"prompt.method": method, "optim.lr": 0.2}
        )
        train_local(_cfg(job), progress=False)
        runs[method] = root / "runs" / "tiny"
    return runs


def _trained_state(run_dir):
    state, tensors = ckpt.read_prompt_state(ckpt.latest_checkpoint(run_dir / "checkpoints"))
    return state, tensors


@pytest.mark.parametrize("method", METHODS)
def test_exported_adapter_gives_the_logits_of_the_composed_prompt(method, source_runs, tiny_backbone_dir):
    """PEFT's loaded adapter == our wrapper fed the prompt composed from the trained rows and shared part."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuner.model.prompt_lm import PromptTunedLM

    run_dir = source_runs[method]
    state, tensors = _trained_state(run_dir)
    assert state["prompt_method"] == method
    layout = _layout(method)
    if method == "residual":  # the shared MLP really moved: its LayerNorm gain starts at 0
        assert layout.unflatten(tensors["shared"])["ln_weight"].abs().max() > 0
    lm = PromptTunedLM(AutoModelForCausalLM.from_pretrained(tiny_backbone_dir).float().eval())
    ids = [510, 1730, 42, 9001, 77]
    for i, task in enumerate(state["task_names"]):
        rows = tensors["bank"][i : i + 1].clone().requires_grad_(True)  # as the step gathers them
        prompt = layout.compose(rows, tensors.get("shared"))
        batch = collate([TokenizedExample(task, ids, [0])], {task: 0}, 4, max_len=64, pad_id=2)
        with torch.no_grad():
            ours = lm.lm_head(lm.hidden_states(batch, prompt)[0, 4 : 4 + len(ids)])
            peft = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny_backbone_dir).float().eval(),
                str(run_dir / "adapters" / task),
            )
            theirs = peft(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)
            )
        torch.testing.assert_close(ours, theirs.logits[0, 4:], rtol=1e-4, atol=1e-5)


def _recipe(job, name, *overrides):
    from tuner.recipe import MultiTaskPromptTuningRecipe

    r = MultiTaskPromptTuningRecipe(
        _cfg(job, f"name={name}", "optim.batch_size=3", *overrides), progress=False
    )
    r.setup()
    return r


def _straight_and_resumed(job):
    """(4 steps straight, 2 steps + checkpoint + a new recipe resuming + 2 more steps) on the same draws."""
    draws = [[("pos_neg", i), ("colors", i + 1), ("pos_neg", i + 2)] for i in range(4)]
    straight = _recipe(job, "straight")
    for d in draws:
        straight.train_step(d)
    first = _recipe(job, "halves")
    for d in draws[:2]:
        first.train_step(d)
    first.save_checkpoint()
    second = _recipe(job, "halves")
    assert second.step == 2
    for d in draws[2:]:
        second.train_step(d)
    return straight, second


@pytest.mark.parametrize("method", ["residual", "multitask"])
def test_resume_restores_rows_shared_part_and_their_adam(method, tmp_path, tiny_backbone_dir):
    """4 steps straight == 2 steps, checkpoint, a new recipe resuming, 2 more steps."""
    job = _job(tmp_path, tiny_backbone_dir, ("pos_neg", "colors"), **{"prompt.method": method})
    straight, second = _straight_and_resumed(job)
    torch.testing.assert_close(second.bank.weight, straight.bank.weight, rtol=0, atol=0)
    torch.testing.assert_close(second.shared.values, straight.shared.values, rtol=0, atol=0)
    assert second.shared.optimizer.state["shared"]["step"] == 4


@pytest.mark.parametrize("method", ["ulpt", "superpos"])
def test_resume_is_bit_identical_and_the_fixed_part_is_the_runs_own(method, tmp_path, tiny_backbone_dir):
    """4 steps straight == 2 steps, checkpoint, resume, 2 more: rows and Adam moments bit for bit. The
    fixed part (never trained, no Adam state) is what the seed draws: ULPT's R regenerated here."""
    job = _job(tmp_path, tiny_backbone_dir, ("pos_neg", "colors"), **{"prompt.method": method})
    fixed = _recipe(job, "fresh").shared.values.clone()
    straight, second = _straight_and_resumed(job)
    torch.testing.assert_close(second.bank.weight, straight.bank.weight, rtol=0, atol=0)
    for task in ("pos_neg", "colors"):
        for m in ("exp_avg", "exp_avg_sq"):
            a, b = second.optimizer.state[task][m], straight.optimizer.state[task][m]
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(second.shared.values, fixed) and torch.equal(straight.shared.values, fixed)
    assert second.shared.frozen and not second.shared.optimizer.state
    if method == "ulpt":  # R ~ N(0, 1/r) from data.seed (the job's default 0)
        R = torch.randn(2 * 32, generator=torch.Generator().manual_seed(straight.cfg.data.seed)) / 2**0.5
        assert torch.equal(fixed, R)
    other = _recipe(job, "other-seed", "data.seed=5")  # another run's seed draws another fixed part
    assert not torch.equal(other.shared.values, fixed)


@pytest.mark.parametrize("method", METHODS)
def test_continual_training_keeps_old_adapters_byte_identical(
    method, source_runs, tmp_path, tiny_backbone_dir
):
    src = source_runs[method]
    job = _job(
        tmp_path,
        tiny_backbone_dir,
        ("sizes",),
        **{"prompt.method": method, "prompt.init_from": str(src), "name": "more"},
    )
    summary = train_local(_cfg(job), progress=False)
    out = tmp_path / "runs" / "more"
    assert summary["carried_tasks"] == ["colors", "pos_neg"] and list(summary["tasks"]) == ["sizes"]
    published = sorted(p.name for p in (out / "adapters").iterdir() if not p.name.startswith("."))
    assert published == ["colors", "pos_neg", "sizes"]
    for task in ("colors", "pos_neg"):
        for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_META):
            assert (out / "adapters" / task / f).read_bytes() == (src / "adapters" / task / f).read_bytes()
    # the new run's checkpoint still holds the old rows and the (frozen) shared part: it can be an init_from too
    old_state, old = _trained_state(src)
    new_state, new = _trained_state(out)
    for task in ("colors", "pos_neg"):
        i, j = old_state["task_names"].index(task), new_state["task_names"].index(task)
        assert torch.equal(new["bank"][j], old["bank"][i])
    if method != "independent":
        assert torch.equal(new["shared"], old["shared"]) and not new_state["shared_adam_steps"]


def test_init_from_mistakes_are_one_line_errors_that_leave_no_run_behind(
    source_runs, tmp_path, tiny_backbone_dir
):
    """Checked before the run directory is claimed: fixing the job and running again just works."""
    job = _job(
        tmp_path, tiny_backbone_dir, ("colors",), **{"prompt.init_from": str(source_runs["independent"])}
    )
    with pytest.raises(ConfigError, match="colors is already trained in prompt.init_from"):
        train_local(_cfg(job), progress=False)
    with pytest.raises(ConfigError, match="prompt.method=residual, not independent"):
        train_local(_cfg(job, f"prompt.init_from={source_runs['residual']}"), progress=False)
    with pytest.raises(ConfigError, match="not a finished run directory"):
        train_local(_cfg(job, f"prompt.init_from={tmp_path}"), progress=False)
    assert not (tmp_path / "runs").exists()
    res = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", str(job), "--no-ray", "cluster.num_workers=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "already trained" in lines[0], res.stderr


@pytest.mark.parametrize("method", METHODS)
def test_transfer_init_starts_from_the_source_with_the_lowest_loss(
    method, source_runs, tmp_path, tiny_backbone_dir
):
    from tuner.recipe import MultiTaskPromptTuningRecipe, RecipeHooks

    src = source_runs[method]
    job = _job(
        tmp_path,
        tiny_backbone_dir,
        ("sizes",),
        **{
            "prompt.method": method,
            "prompt.init": "transfer",
            "prompt.init_from": str(src),
            "prompt.transfer_examples": 4,
            "prompt.transfer_check_steps": 0,  # the choice itself (its check: test_transfer_guard.py)
        },
    )
    lines = []
    recipe = MultiTaskPromptTuningRecipe(_cfg(job), RecipeHooks(on_message=lines.append), progress=False)
    recipe.setup()
    state, tensors = _trained_state(src)
    layout = _layout(method)
    # direct computation: each source's composed prompt, one example at a time, mean target NLL
    losses = {}
    for i, name in enumerate(state["task_names"]):
        prompt = layout.compose(tensors["bank"][i : i + 1], tensors.get("shared"))
        per = []
        for ex in recipe.tasks["sizes"].train[:4]:
            batch = collate(
                [TokenizedExample(name, ex.input_ids, ex.target_ids)], {name: 0}, 4, max_len=64, pad_id=2
            )
            with torch.no_grad():
                per.append(float(recipe.lm(batch, prompt).seg_loss[0]))
        losses[name] = sum(per) / len(per)
    assert len(set(losses.values())) == 2  # the choice is not a tie
    best = min(losses, key=losses.get)
    # the new task starts with the chosen task's parameters, so (shared part frozen) with its very prompt
    assert torch.equal(recipe.bank.prompt("sizes"), tensors["bank"][state["task_names"].index(best)])
    torch.testing.assert_close(
        recipe.prompt("sizes"),
        layout.compose(tensors["bank"][[state["task_names"].index(best)]], tensors.get("shared"))[0],
    )
    assert any(f"sizes starts from {best}" in line for line in lines), lines


@pytest.mark.parametrize("method", ["ulpt", "superpos"])
def test_search_variants_of_a_fixed_basis_method_step_as_their_configuration_alone(
    method, tmp_path, tiny_backbone_dir
):
    """The in-batch search works for ulpt and superpos as for independent: every variant row starts where a
    plain job with its settings starts (same row, same fixed part) and, in one batch with the other
    variants, takes that job's step."""
    from tuner.recipe import MultiTaskPromptTuningRecipe

    job = _job(tmp_path, tiny_backbone_dir, ("pos_neg", "colors"), **{"prompt.method": method})

    def recipe(*more):
        r = MultiTaskPromptTuningRecipe(_cfg(job, "optim.batch_size=6", *more), progress=False)
        r.setup()
        return r

    search = recipe("search.space={optim.lr: [0.01, 0.3]}", "search.heldout_examples=4")
    draw = [("colors", 0), ("pos_neg", 1), ("colors", 2), ("pos_neg", 3), ("pos_neg", 4), ("colors", 5)]
    before = {r: search.bank.prompt(r).clone() for r in search.bank.task_names}
    search.train_step(draw)
    for k in range(2):
        lr = search.search.variant(f"pos_neg~{k}").settings.optim.lr
        plain = recipe(f"optim.lr={lr}")
        assert torch.equal(plain.shared.values, search.shared.values)
        torch.testing.assert_close(before[f"pos_neg~{k}"], plain.bank.prompt("pos_neg"), rtol=0, atol=0)
        plain.train_step(draw)
        got = search.bank.prompt(f"pos_neg~{k}")
        assert not torch.equal(got, before[f"pos_neg~{k}"])
        torch.testing.assert_close(got, plain.bank.prompt("pos_neg"), rtol=1e-4, atol=1e-6)
