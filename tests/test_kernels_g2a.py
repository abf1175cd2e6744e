"""Fused G²A adapter kernel (run by Triton's CPU interpreter) against the PyTorch module in eval mode.

bf16 is checked on the GPU by ``python -m mpsclip.bench.kernels``: Triton 3.8's interpreter computes
bf16 ``tl.dot`` wrongly (a bare load → dot → store of bf16 tiles is off by 1e10), so it is not tested here.
Triton must see ``TRITON_INTERPRET=1`` before its first import, and other test modules import it earlier
(through open_clip), so the kernel tests run in a child pytest process started by the first test here.
"""


import pytest
import torch
from mpsclip.kernels import g2a

from mpsclip.adapters import G2Adapter
from tests.conftest import randomize_adapter
from tests.interpreter import INTERPRETED, interpreted, run_in_interpreter

pytestmark = pytest.mark.triton


@pytest.mark.skipif(INTERPRETED or g2a.triton is None, reason="child process, or no triton")
def test_kernels_under_triton_interpreter():
    run_in_interpreter(__file__)


def random_adapter(width: int, seed: int) -> G2Adapter:
    """An adapter with every weight non-zero (up_proj is zero at init) in eval mode."""
    adapter = G2Adapter(width)
    randomize_adapter(adapter, torch.Generator().manual_seed(seed), scale=0.1, gate=0.4)
    return adapter.eval()


@interpreted
@pytest.mark.parametrize(("tokens", "dtype"), [(50, torch.float16), (77, torch.float16), (9, torch.float32)])
def test_fused_adapter_matches_module(tokens, dtype):
    adapter = random_adapter(64, seed=tokens)
    x = torch.randn(2, tokens, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = adapter(x)
        got = g2a.g2a_adapter_forward(adapter, x.to(dtype))
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.isfinite(got).all()
    err = (got.float() - want).norm() / (want - x).norm()  # relative to the adapter's own contribution
    assert err < 1e-2, err
    again = g2a.g2a_adapter_forward(adapter, x.to(dtype))
    assert torch.equal(got, again)
