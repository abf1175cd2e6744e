import math

import torch
import torch.nn.functional as F

from mpsclip.adapters import G2Adapter, attach_adapters, sinusoidal_table
from tests.conftest import randomize_adapters


def _mha(x, in_w, in_b, out_w, out_b, heads):
    b, n, c = x.shape
    q, k, v = F.linear(x, in_w, in_b).chunk(3, dim=-1)
    split = lambda t: t.view(b, n, heads, c // heads).transpose(1, 2)  # noqa: E731
    att = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(c // heads)).softmax(-1)
    return F.linear((att @ split(v)).transpose(1, 2).reshape(b, n, c), out_w, out_b)


def _ln(x, mod):
    return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, mod.eps)


def reference_adapter(a: G2Adapter, x: torch.Tensor) -> torch.Tensor:
    """The adapter's math written out step by step, independent of its module structure."""
    sa, ga = a.self_attention, a.global_attention
    h = F.gelu(F.linear(x, a.down_proj.weight, a.down_proj.bias))
    h = _mha(h, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias, 8)
    h = F.linear(h, a.attention_proj.weight, a.attention_proj.bias)
    t = ga.attn
    y = _ln(h, t.attn_in_norm) + sinusoidal_table(10000, 128)[: h.shape[1]]
    o = _mha(y, t.attn.in_proj_weight, t.attn.in_proj_bias, t.attn.out_proj.weight, t.attn.out_proj.bias, 8)
    h = h + _ln(h + o, t.norm)
    m = ga.mlp
    z = F.conv1d(h.transpose(1, 2), m.fc1.conv.weight)
    z = F.relu(F.conv1d(z, m.dwconv.weight, m.dwconv.bias, padding=2, groups=z.shape[1]))
    h = h + F.conv1d(z, m.fc2.conv.weight).transpose(1, 2)
    return x + F.linear(torch.sigmoid(a.gate) * h, a.up_proj.weight, a.up_proj.bias)


class _Blocks(torch.nn.Module):
    def __init__(self, width: int, batch_first: bool):
        super().__init__()
        self.width, self.batch_first = width, batch_first
        self.resblocks = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])


def test_identity_at_init():
    torch.manual_seed(0)
    adapter = G2Adapter(64).eval()
    x = torch.randn(2, 50, 64)
    assert torch.equal(adapter(x), x)
    assert abs(adapter.gate.item() - 0.6) < 1e-7


def test_positional_table_formula():
    pe = sinusoidal_table(10000, 128)
    assert pe.shape == (10000, 128)
    p, i = 37, 5
    w = math.exp(-2 * i * math.log(10000) / 128)
    assert abs(pe[p, 2 * i].item() - math.sin(p * w)) < 1e-6
    assert abs(pe[p, 2 * i + 1].item() - math.cos(p * w)) < 1e-6


def test_matches_written_out_math():
    torch.manual_seed(0)
    adapter = G2Adapter(64).eval()

    class _Holder:
        def adapters(self):
            return [adapter]

    randomize_adapters(_Holder(), seed=3)
    for tokens in (50, 77):
        x = torch.randn(2, tokens, 64)
        assert torch.allclose(adapter(x), reference_adapter(adapter, x), atol=1e-5)


def test_hook_runs_adapter_in_both_layouts():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 64)
    outs = []
    for batch_first in (True, False):
        torch.manual_seed(1)
        blocks = _Blocks(64, batch_first)
        adapters = attach_adapters(blocks)
        with torch.no_grad():
            for a in adapters:
                a.up_proj.weight.normal_()
        inp = x if batch_first else x.transpose(0, 1)
        for block in blocks.resblocks:
            inp = block(inp)
        outs.append(inp if batch_first else inp.transpose(0, 1))
        assert not torch.equal(outs[-1], x)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert "resblocks.0.g2adapter.up_proj.weight" in blocks.state_dict()
    assert not any("pos_enc" in k for k in blocks.state_dict())
