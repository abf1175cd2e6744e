"""Fused inference forward of the G²A adapter (:class:`mpsclip.adapters.G2Adapter`) in one Triton launch.

One program per sequence keeps the whole bottleneck path ``[Lp, 128]`` on chip: down-projection + GELU,
the 8-head bottleneck self-attention, ``attention_proj``, LayerNorm + positional table, the second
attention, LayerNorm + residual, the 1×1 → depthwise-5 → ReLU → 1×1 token FFN (the depthwise taps are
products with 0/1 shift matrices, so neighbouring tokens never leave registers), the sigmoid gate, the
up-projection and the outer residual. ``x`` is read in ``D`` chunks twice (once for the down-projection,
once for the residual; the second read is served by L2) and the output written once.
"""

from __future__ import annotations

import torch
from torch import nn

from mpsclip.adapters import G2Adapter

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is an optional extra
    triton = None

_BOTTLENECK = 128
_HEADS = 8
_HIDDEN = 256
_NUM_WARPS = {64: 4, 128: 8}  # warps per program for 64- and 128-token tiles
_NUM_STAGES = 1  # no software pipelining: the kernel's many dot operands already fill shared memory


class FusedG2Adapter(nn.Module):
    """Inference-only stand-in for a :class:`G2Adapter`: weights packed once, forward is one launch."""

    def __init__(self, adapter: G2Adapter, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        ga = adapter.global_attention
        if adapter.down_proj.out_features != _BOTTLENECK or adapter.self_attention.num_heads != _HEADS:
            raise ValueError("the fused adapter supports the 128-wide, 8-head bottleneck only")
        if ga.mlp.fc1.conv.out_channels != _HIDDEN or ga.mlp.dwconv.kernel_size != (5,):
            raise ValueError("the fused adapter supports a 256-wide FFN with a depthwise-5 conv only")
        dtype = dtype or adapter.down_proj.weight.dtype
        if dtype == torch.float32:
            dtype = torch.float16
        self.width = adapter.down_proj.in_features
        self.compute_dtype = dtype

        def mat(w: torch.Tensor) -> torch.Tensor:  # [out, in] weight → [in, out] operand
            return w.detach().t().contiguous().to(dtype)

        def vec(v: torch.Tensor) -> torch.Tensor:
            return v.detach().float().contiguous()

        mha1, mha2 = adapter.self_attention, ga.attn.attn
        packed = {
            "w_down": mat(adapter.down_proj.weight), "b_down": vec(adapter.down_proj.bias),
            "w_qkv1": mat(mha1.in_proj_weight), "b_qkv1": vec(mha1.in_proj_bias),
            "w_o1": mat(mha1.out_proj.weight), "b_o1": vec(mha1.out_proj.bias),
            "w_ap": mat(adapter.attention_proj.weight), "b_ap": vec(adapter.attention_proj.bias),
            "ln1_w": vec(ga.attn.attn_in_norm.weight), "ln1_b": vec(ga.attn.attn_in_norm.bias),
            "pe": vec(ga.attn.pos_enc.pe[0, :128]),
            "w_qkv2": mat(mha2.in_proj_weight), "b_qkv2": vec(mha2.in_proj_bias),
            "w_o2": mat(mha2.out_proj.weight), "b_o2": vec(mha2.out_proj.bias),
            "ln2_w": vec(ga.attn.norm.weight), "ln2_b": vec(ga.attn.norm.bias),
            "w_fc1": mat(ga.mlp.fc1.conv.weight[:, :, 0]),
            "w_dw": vec(ga.mlp.dwconv.weight[:, 0, :].t()), "b_dw": vec(ga.mlp.dwconv.bias),
            "w_fc2": mat(ga.mlp.fc2.conv.weight[:, :, 0]),
            "gate": vec(torch.sigmoid(adapter.gate.detach().float()).reshape(1)),
            "w_up": mat(adapter.up_proj.weight), "b_up": vec(adapter.up_proj.bias),
        }
        self.eps = (ga.attn.attn_in_norm.eps, ga.attn.norm.eps)
        for name, tensor in packed.items():
            self.register_buffer(name, tensor.to(adapter.down_proj.weight.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return g2a_forward_packed(self, x)


def g2a_forward_packed(p: FusedG2Adapter, x: torch.Tensor) -> torch.Tensor:
    """Run the fused kernel for ``x [B, L, D]`` (L ≤ 128) with packed weights ``p``."""
    batch, tokens, width = x.shape
    if tokens > 128:
        raise ValueError(f"the fused adapter handles at most 128 tokens, got {tokens}")
    if width != p.width or width % 64 != 0:
        raise ValueError(f"expected width {p.width} (a multiple of 64), got {width}")
    x = x.contiguous()
    out = torch.empty_like(x)
    lp = 64 if tokens <= 64 else 128
    _g2a_kernel[(batch,)](
        x, out,
        p.w_down, p.b_down, p.w_qkv1, p.b_qkv1, p.w_o1, p.b_o1, p.w_ap, p.b_ap,
        p.ln1_w, p.ln1_b, p.pe, p.w_qkv2, p.b_qkv2, p.w_o2, p.b_o2, p.ln2_w, p.ln2_b,
        p.w_fc1, p.w_dw, p.b_dw, p.w_fc2, p.gate, p.w_up, p.b_up,
        tokens, width, p.eps[0], p.eps[1],
        LP=lp, R=_BOTTLENECK, HD=_BOTTLENECK // _HEADS, NH=_HEADS, HID=_HIDDEN, BK=64,
        SCALE=(_BOTTLENECK // _HEADS) ** -0.5,
        num_warps=_NUM_WARPS[lp], num_stages=_NUM_STAGES,
    )
    return out


def g2a_adapter_forward(adapter: G2Adapter | FusedG2Adapter, x: torch.Tensor) -> torch.Tensor:
    """``adapter(x)`` in eval mode through the fused kernel; packs (and caches) the weights on first use."""
    if isinstance(adapter, FusedG2Adapter):
        return adapter(x)
    key = (x.dtype if x.dtype != torch.float32 else torch.float16, x.device)
    cache = adapter.__dict__.setdefault("_fused_cache", {})
    if key not in cache:
        cache[key] = FusedG2Adapter(adapter, key[0]).to(x.device)
    fused = cache[key]
    if x.dtype == torch.float32:
        return fused(x.to(fused.compute_dtype)).float()
    return fused(x)


if triton is not None:

    @triton.jit
    def _mm(a, w_ptr, row_stride, col0, K: tl.constexpr, N: tl.constexpr):
        """``a [M, K] @ W[:, col0:col0+N]`` for a row-major ``W`` with ``row_stride`` columns; fp32 out."""
        rk = tl.arange(0, K)
        rn = tl.arange(0, N)
        w = tl.load(w_ptr + rk[:, None] * row_stride + col0 + rn[None, :])
        return tl.dot(a, w)

    @triton.jit
    def _row_vec(ptr, off, N: tl.constexpr):
        return tl.load(ptr + off + tl.arange(0, N))[None, :]

    @triton.jit
    def _layer_norm(h, w_ptr, b_ptr, eps, R: tl.constexpr):
        mean = tl.sum(h, 1) / R
        centred = h - mean[:, None]
        var = tl.sum(centred * centred, 1) / R
        return centred * tl.rsqrt(var + eps)[:, None] * _row_vec(w_ptr, 0, R) + _row_vec(b_ptr, 0, R)

    @triton.jit
    def _mha(h, w_qkv, b_qkv, w_o, b_o, tokens,
             LP: tl.constexpr, R: tl.constexpr, HD: tl.constexpr, NH: tl.constexpr, SCALE: tl.constexpr):
        """nn.MultiheadAttention(h, h, h) without masks on ``[LP, R]`` (fp16/bf16 ``h``); fp32 out."""
        key_ok = (tl.arange(0, LP) < tokens)[None, :]
        out = tl.zeros((LP, R), tl.float32) + _row_vec(b_o, 0, R)
        for head in range(NH):
            q = _mm(h, w_qkv, 3 * R, head * HD, R, HD) + _row_vec(b_qkv, head * HD, HD)
            k = _mm(h, w_qkv, 3 * R, R + head * HD, R, HD) + _row_vec(b_qkv, R + head * HD, HD)
            v = _mm(h, w_qkv, 3 * R, 2 * R + head * HD, R, HD) + _row_vec(b_qkv, 2 * R + head * HD, HD)
            s = tl.dot((q * SCALE).to(h.dtype), tl.trans(k.to(h.dtype)))
            s = tl.where(key_ok, s, float("-inf"))
            p = tl.exp(s - tl.max(s, 1)[:, None])
            p = p / tl.sum(p, 1)[:, None]
            o = tl.dot(p.to(h.dtype), v.to(h.dtype))
            out += _mm(o.to(h.dtype), w_o + head * HD * R, R, 0, HD, R)
        return out

    @triton.jit
    def _g2a_kernel(
        x_ptr, out_ptr,
        w_down, b_down, w_qkv1, b_qkv1, w_o1, b_o1, w_ap, b_ap,
        ln1_w, ln1_b, pe_ptr, w_qkv2, b_qkv2, w_o2, b_o2, ln2_w, ln2_b,
        w_fc1, w_dw, b_dw, w_fc2, gate_ptr, w_up, b_up,
        tokens, width, eps1, eps2,
        LP: tl.constexpr, R: tl.constexpr, HD: tl.constexpr, NH: tl.constexpr, HID: tl.constexpr,
        BK: tl.constexpr, SCALE: tl.constexpr,
    ):
        seq = tl.program_id(0).to(tl.int64)
        rows = tl.arange(0, LP)
        row_ok = rows < tokens
        rk = tl.arange(0, BK)
        rr = tl.arange(0, R)
        base = seq * tokens * width
        dtype = x_ptr.dtype.element_ty

        # down_proj + exact GELU
        acc = tl.zeros((LP, R), tl.float32)
        for k0 in range(0, width, BK):
            xk = tl.load(x_ptr + base + rows[:, None] * width + k0 + rk[None, :], mask=row_ok[:, None], other=0.0)
            wk = tl.load(w_down + (k0 + rk)[:, None] * R + rr[None, :])
            acc = tl.dot(xk, wk, acc)
        h = acc + _row_vec(b_down, 0, R)
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))

        # bottleneck self-attention, attention_proj
        h = _mha(h.to(dtype), w_qkv1, b_qkv1, w_o1, b_o1, tokens, LP, R, HD, NH, SCALE)
        hp = _mm(h.to(dtype), w_ap, R, 0, R, R) + _row_vec(b_ap, 0, R)

        # global attention: norm(hp + MHA(LN(hp) + PE)); h = hp + that
        pe = tl.load(pe_ptr + rows[:, None] * R + rr[None, :])
        y = _layer_norm(hp, ln1_w, ln1_b, eps1, R) + pe
        o = _mha(y.to(dtype), w_qkv2, b_qkv2, w_o2, b_o2, tokens, LP, R, HD, NH, SCALE)
        h = hp + _layer_norm(hp + o, ln2_w, ln2_b, eps2, R)

        # token FFN: 1×1 → depthwise 5 (zero padded at the sequence ends) → ReLU → 1×1, residual
        hh = h.to(dtype)
        src = tl.arange(0, LP)[None, :]
        ffn = tl.zeros((LP, R), tl.float32)
        for c0 in range(0, HID, R):
            f1 = _mm(hh, w_fc1, HID, c0, R, R)
            f1 = tl.where(row_ok[:, None], f1, 0.0).to(dtype)
            conv = tl.zeros((LP, R), tl.float32) + _row_vec(b_dw, c0, R)
            for tap in tl.static_range(5):
                shift = (src == rows[:, None] + (tap - 2)).to(dtype)
                conv += tl.dot(shift, f1) * _row_vec(w_dw, tap * HID + c0, R)
            conv = tl.maximum(conv, 0.0).to(dtype)
            ffn += _mm(conv, w_fc2 + c0 * R, R, 0, R, R)
        h = h + ffn

        # gate, up_proj, outer residual
        g = (h * tl.load(gate_ptr)).to(dtype)
        for n0 in range(0, width, BK):
            up = tl.dot(g, tl.load(w_up + rr[:, None] * width + n0 + rk[None, :]))
            offs = base + rows[:, None] * width + n0 + rk[None, :]
            xk = tl.load(x_ptr + offs, mask=row_ok[:, None], other=0.0)
            res = xk.to(tl.float32) + up + _row_vec(b_up, n0, BK)
            tl.store(out_ptr + offs, res.to(dtype), mask=row_ok[:, None])
