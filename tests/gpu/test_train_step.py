"""On a GPU: a full training step in bf16 against the fp32 reference, device-resident optimiser
state with no host synchronisation, a 1-process NCCL all-reduce, and the real recipe on CUDA
(checkpoint and export written from CUDA tensors, activation memory reported)."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bench.gpu_models import task_mix
from tuner.model.prompt_lm import PromptTunedLM
from tuner.prompts.bank import PromptBank
from tuner.prompts.optim import SparseRowAdam
from tuner.tasks.batching import collate

pytestmark = pytest.mark.gpu
P, LR = 8, 0.01
TASKS = ["sst2", "ag_news", "trec"]
REPO = Path(__file__).resolve().parents[2]


def _model(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=0.1,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).to("cuda", dtype).eval()
    return model.requires_grad_(False)


def _step(dtype, kernel, sync_check: bool):
    """One step: gather -> forward/backward -> all-reduce -> Adam on the device -> scatter."""
    lm = PromptTunedLM(_model(dtype), kernel=kernel)
    bank = PromptBank(TASKS, P, 256)
    bank.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    bank.to("cuda")
    opt = SparseRowAdam(LR, grad_clip=1.0)
    examples = task_mix(24, seed=2, vocab=2048)
    rows = bank.rows_of(TASKS).cuda()
    prompts = bank.gather(rows)
    batch = collate(examples, {t: i for i, t in enumerate(TASKS)}, P, max_len=256, pad_id=2, row_len=256)
    torch.cuda.reset_peak_memory_stats()
    out = lm(batch.to("cuda"), prompts)
    out.loss.backward()
    dist.all_reduce(prompts.grad)  # 1 rank: the sum is the gradient itself
    before = bank.weight.clone()
    if sync_check:
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in the update raises
    try:
        new = opt.step(TASKS, prompts.detach(), prompts.grad, lr=LR)
        bank.scatter_(rows, new)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    peak = torch.cuda.max_memory_allocated()
    return out.seg_loss, prompts.grad, bank.weight - before, opt, peak


@pytest.fixture(scope="module", autouse=True)
def nccl_group():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_bf16_step_matches_fp32_reference_and_stays_on_the_device():
    assert dist.get_backend() == "nccl"
    ref_loss, ref_grad, ref_update, _, _ = _step(torch.float32, "eager", sync_check=False)
    loss, grad, update, opt, peak = _step(torch.bfloat16, "auto", sync_check=True)
    # The bf16 noise floor, measured here: the same step in bf16 with the textbook kernel (dense mask,
    # eager attention). Ours may not be worse than that floor by more than half again (one GPU run saw a
    # 5.9 % gradient error for ours, so a fixed 5 % bound was a guess, not a property).
    floor_loss, floor_grad, _, _, _ = _step(torch.bfloat16, "eager", sync_check=False)
    assert _rel(loss, ref_loss) <= max(1.5 * _rel(floor_loss, ref_loss), 1e-3)
    assert _rel(grad, ref_grad) <= max(1.5 * _rel(floor_grad, ref_grad), 1e-2)
    assert _rel(grad, ref_grad) < 0.15  # and bf16 is still bf16: a broken kernel is off by O(1)
    # First Adam step: each element moves by ~lr x sign(grad); bf16 may flip the sign of tiny gradients only.
    differs = (update - ref_update).abs() > 1e-5
    assert float(differs.float().mean()) < 0.05
    assert float((update - ref_update).abs().max()) <= 2 * LR + 1e-5
    for state in opt.state.values():
        assert state["exp_avg"].is_cuda and state["exp_avg_sq"].is_cuda
    assert opt.state_dict()["state"]["sst2"]["exp_avg"].device.type == "cpu"  # host copy at save time only
    assert peak > 0


def _tokenizer_dir() -> Path | None:
    for d in (os.environ.get("PROMPTFLEET_GPU_TOKENIZER", ""), REPO / "gpu-carry" / "tokenizer"):
        if d and (Path(d) / "tokenizer.json").is_file():
            return Path(d)
    return None


@pytest.mark.skipif(
    _tokenizer_dir() is None, reason="needs the SmolLM2 tokenizer files in gpu-carry/tokenizer"
)
@pytest.mark.skipif(
    importlib.util.find_spec("datasets") is None, reason="needs datasets (gpu-carry/wheels) to load tasks"
)
def test_recipe_trains_on_cuda_then_checkpoints_and_exports(tmp_path):
    """The real recipe (tiny job) with cluster.use_gpu: bf16 on CUDA, checkpoint + adapters readable on CPU."""
    from safetensors.torch import load_file
    from tiny_job import write_tiny_job
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuner.config import load_job_config
    from tuner.recipe import MultiTaskPromptTuningRecipe

    backbone = tmp_path / "backbone"
    cfg = LlamaConfig(
        vocab_size=49152,  # SmolLM2's vocabulary: the tokenizer's ids must fit
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(backbone)
    AutoTokenizer.from_pretrained(_tokenizer_dir()).save_pretrained(backbone)
    job = write_tiny_job(
        tmp_path,
        backbone,
        model={"dtype": "bf16", "attn_implementation": "auto"},
        cluster={"use_gpu": True},
        log_every=1,
    )
    recipe = MultiTaskPromptTuningRecipe(load_job_config(job, ["cluster.num_workers=1"]), progress=False)
    try:
        recipe.setup()
        assert recipe.device.type == "cuda" and recipe.bank.weight.is_cuda
        assert recipe.lm.kernel_for(recipe.device) == "varlen"
        recipe.train()
        summary = recipe.finish()
    finally:
        recipe.cleanup()
    assert summary["steps"] == 6
    steps = recipe.history.steps
    assert steps and all(m.max_memory_allocated > 0 for m in steps)
    assert all(torch.isfinite(torch.tensor(m.loss)) for m in steps)
    ckpts = sorted((recipe.run_dir / "checkpoints").iterdir())
    tensors = load_file(str(ckpts[-1] / "tensors.safetensors"))
    torch.testing.assert_close(tensors["bank"], recipe.bank.weight.cpu())
    adapter = load_file(str(recipe.run_dir / "adapters" / "tone" / "adapter_model.safetensors"))
    torch.testing.assert_close(adapter["prompt_embeddings"], recipe.bank.prompt("tone").cpu())
