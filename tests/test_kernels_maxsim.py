"""Max-response top-k: the Triton kernel (run by Triton's CPU interpreter) against the torch reference.

Triton must see ``TRITON_INTERPRET=1`` before its first import, and other test modules import it earlier
(through open_clip), so the kernel tests run in a child pytest process started by the first test here.
"""


import pytest
import torch
from mpsclip.kernels import maxsim

from tests.interpreter import INTERPRETED, interpreted, run_in_interpreter

pytestmark = pytest.mark.triton


@pytest.mark.skipif(INTERPRETED or maxsim.triton is None, reason="child process, or no triton")
def test_kernels_under_triton_interpreter():
    run_in_interpreter(__file__)


def _brute_force(queries, gallery, k, valid=None):
    """Full [Q, N] scores sorted by (score desc, index asc), padded to k."""
    s = maxsim.maxsim_scores(queries, gallery, valid)
    idx = torch.arange(s.shape[1]).expand_as(s)
    return maxsim.merge_topk(s, idx, k)


def _assert_same(got, want, atol):
    (gs, gi), (ws, wi) = got, want
    assert gs.dtype == torch.float32 and gi.dtype == torch.int64
    assert gs.shape == ws.shape and gi.shape == wi.shape
    assert not torch.isnan(gs).any()
    finite = torch.isfinite(ws)
    assert torch.equal(torch.isfinite(gs), finite)
    torch.testing.assert_close(gs[finite], ws[finite], atol=atol, rtol=0)
    assert torch.equal(gi[~finite], wi[~finite])


@interpreted
@pytest.mark.parametrize(
    ("n_queries", "n_items", "views", "dim", "k"),
    [(3, 301, 5, 32, 10), (20, 133, 3, 64, 7), (1, 37, 2, 32, 50)],
)
def test_text_to_image_matches_reference(n_queries, n_items, views, dim, k):
    gen = torch.Generator().manual_seed(n_items)
    q = torch.randn(n_queries, dim, generator=gen).half()
    g = torch.randn(n_items, views, dim, generator=gen).half()
    valid = torch.rand(n_items, views, generator=gen) > 0.3
    valid[: n_items // 10] = False  # items with no valid view rank last with -inf
    got = maxsim.maxsim_topk(q, g, k, valid)
    want = maxsim.maxsim_topk_reference(q, g, k, valid, chunk=64)
    _assert_same(got, want, atol=1e-3)
    assert torch.equal(want[1], _brute_force(q, g, k, valid)[1])
    top = maxsim.maxsim_scores(q, g, valid).gather(1, got[1].clamp(min=0))
    torch.testing.assert_close(top[got[1] >= 0], got[0][got[1] >= 0], atol=1e-3, rtol=0)
    if k > n_items:
        assert (got[1][:, n_items:] == -1).all() and torch.isinf(got[0][:, n_items:]).all()
        assert torch.equal(got[1][:, :n_items].sort(1).values, torch.arange(n_items).expand(n_queries, -1))


@interpreted
def test_image_to_text_and_ties():
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(17, 4, 32, generator=gen).half()
    g = torch.randn(90, 32, generator=gen).half()
    g[50:60] = g[10]  # exact duplicates: ties resolve to the lower index
    valid = torch.rand(17, 4, generator=gen) > 0.2
    valid[:, 0] = True
    got = maxsim.maxsim_topk(q, g, 12, valid)
    want = _brute_force(q, g, 12, valid)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=0)


@interpreted
def test_deterministic_and_fp32():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(5, 32, generator=gen)
    g = torch.randn(200, 3, 32, generator=gen)
    a = maxsim.maxsim_topk(q, g, 9)
    b = maxsim.maxsim_topk(q, g, 9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    want = _brute_force(q, g, 9)
    assert torch.equal(a[1], want[1])
    torch.testing.assert_close(a[0], want[0], atol=1e-4, rtol=0)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        maxsim.maxsim_topk(torch.zeros(2, 8), torch.zeros(3, 8), 1)
    with pytest.raises(ValueError):
        maxsim.maxsim_topk(torch.zeros(2, 8), torch.zeros(3, 2, 8), 1, torch.ones(3, 3, dtype=torch.bool))
