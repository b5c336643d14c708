"""On a GPU: FlexAttention (compiled, document + prefix BlockMask) against the dense-mask reference.

Apart from tests/gpu/test_kernels.py because compiling FlexAttention takes tens of seconds:
`bench.gpu_check` runs this file last, so a slow compile cannot starve the other checks.
"""

import pytest
import torch
from test_kernels import _batch, _reference, _rel, _run

from tuner.model import attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("share", [True, False])
def test_flex_fp32_matches_dense_reference_tightly(share):
    batch = _batch(share)
    ref_loss, ref_grad = _reference(batch)
    loss, grad = _run("flex", torch.float32, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-5)


def test_flex_bf16_matches_dense_reference_and_caches_its_block_mask():
    batch = _batch(True)
    ref_loss, ref_grad = _reference(batch)
    attention._BLOCK_MASKS.clear()
    loss, grad = _run("flex", torch.bfloat16, batch)
    assert len(attention._BLOCK_MASKS) == 1  # one layout, one mask, shared by every layer
    assert _rel(loss, ref_loss) < 2e-2 and _rel(grad, ref_grad) < 5e-2
