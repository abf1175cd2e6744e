"""The fast inference runtime for an open_clip CLIP with G²A adapters: fused adapters, SDPA attention, CUDA graphs.

This is what ``model.optimize()`` returns; :mod:`mpsclip.engines` serves it as the ``optimized`` engine
(choosing an engine is the engines package's job, not this module's).

``optimize(model)`` returns an :class:`OptimizedCLIP` holding an eval-mode copy of the model in fp16 or bf16
whose backbone attention calls ``F.scaled_dot_product_attention`` on the original weights and whose
adapters are :class:`~mpsclip.kernels.g2a.FusedG2Adapter` modules. ``encode_image`` / ``encode_text``
return L2-normalised embeddings; on a GPU each tower is captured once per batch size in
``GRAPH_BATCH_SIZES`` and replayed, with odd batches padded up to the next captured size. With
``compile`` (the default on a GPU) each encoder is compiled by Inductor for that batch size before capture
(``COMPILE_SCOPE = "blocks"`` compiles the residual blocks alone instead: faster to build, slower at batch 1);
per ``ADAPTER_IMPL`` the fused adapter then stays one opaque Triton launch (the ``mpsclip::g2a_fused``
custom op) or the PyTorch adapter is compiled by Inductor with the backbone. Without a GPU or Triton the same
wrapper runs plain PyTorch (fp32 on the CPU, never compiled) after a one-line warning.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from mpsclip.kernels.g2a import FusedG2Adapter, g2a_forward_packed
from mpsclip.kernels.g2a import triton as _triton
from torch import nn

GRAPH_BATCH_SIZES = (1, 8, 64, 256, 512)
# Adapter implementation per captured batch size when compiling: "fused" (the Triton kernel as an opaque op
# inside the compiled graph) or "inductor" (the PyTorch adapter compiled with the rest); sizes not listed use
# "fused". Chosen from an H100 fp16 sweep (bench/results/NOTES.md): the fused kernel wins for images at 512,
# Inductor's adapter wins at 1 and 64 and for every text batch (77 tokens pad to a 128-row tile in the kernel).
# 8 and 256 were not measured and follow the nearest measured size.
ADAPTER_IMPL: dict[str, dict[int, str]] = {
    "image": {1: "inductor", 8: "inductor", 64: "inductor", 256: "fused", 512: "fused"},
    "text": {1: "inductor", 8: "inductor", 64: "inductor", 256: "inductor", 512: "inductor"},
}
COMPILE_MODE: str | None = None  # torch.compile mode (None: Inductor's default; max-autotune was no faster)
COMPILE_SCOPE = "tower"  # "tower": each whole encoder (static shapes); "blocks": regional, per residual block
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


_PACKED = ("w_down", "b_down", "w_qkv1", "b_qkv1", "w_o1", "b_o1", "w_ap", "b_ap", "ln1_w", "ln1_b", "pe",
           "w_qkv2", "b_qkv2", "w_o2", "b_o2", "ln2_w", "ln2_b", "w_fc1", "w_dw", "b_dw", "w_fc2", "gate",
           "w_up", "b_up")  # FusedG2Adapter's buffers


@torch.library.custom_op("mpsclip::g2a_fused", mutates_args=())
def _g2a_fused_op(x: torch.Tensor, weights: list[torch.Tensor], eps1: float, eps2: float) -> torch.Tensor:
    """The fused adapter as an op Inductor treats as opaque (one Triton launch inside a compiled block)."""
    packed = SimpleNamespace(**dict(zip(_PACKED, weights, strict=True)), width=x.shape[-1], eps=(eps1, eps2))
    return g2a_forward_packed(packed, x.contiguous())


@_g2a_fused_op.register_fake
def _(x: torch.Tensor, weights: list[torch.Tensor], eps1: float, eps2: float) -> torch.Tensor:
    return x.new_empty(x.shape)


class _OpaqueG2Adapter(nn.Module):
    """A :class:`FusedG2Adapter` called through the ``mpsclip::g2a_fused`` custom op."""

    def __init__(self, fused: FusedG2Adapter) -> None:
        super().__init__()
        if set(fused._buffers) != set(_PACKED):
            raise ValueError("FusedG2Adapter's packed weights changed; update runtime._PACKED")
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = [getattr(self.fused, n) for n in _PACKED]
        return _g2a_fused_op(x, weights, float(self.fused.eps[0]), float(self.fused.eps[1]))


class SdpaAttention(nn.Module):
    """Drop-in for a batch-first ``nn.MultiheadAttention`` self-attention using fused SDPA."""

    def __init__(self, mha: nn.MultiheadAttention, causal: bool) -> None:
        super().__init__()
        if not mha.batch_first or mha.in_proj_weight is None:
            raise ValueError("SdpaAttention needs a batch-first MultiheadAttention with packed projections")
        self.heads = mha.num_heads
        self.causal = causal
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        batch, tokens, width = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if self.causal else attn_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width)), None


def _is_causal_mask(mask: torch.Tensor | None) -> bool:
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool((mask[upper] == float("-inf")).all() and (mask[~upper] == 0).all())


def _rewrite_transformer(transformer: nn.Module, causal: bool, fuse: bool) -> None:
    """Swap each block's attention for SDPA and, when ``fuse``, its adapter for the fused kernel; without
    ``fuse`` the adapter's own two attentions become SDPA (same weights, same maths)."""
    for block in transformer.resblocks:
        block.attn = SdpaAttention(block.attn, causal)
        adapter = getattr(block, "g2adapter", None)
        if adapter is None:
            continue
        if fuse:
            block.g2adapter = _OpaqueG2Adapter(FusedG2Adapter(adapter))
        elif isinstance(adapter.self_attention, nn.MultiheadAttention):
            adapter.self_attention = SdpaAttention(adapter.self_attention, causal=False)
            ga = adapter.global_attention.attn
            ga.attn = SdpaAttention(ga.attn, causal=False)


def _set_recompile_limit(limit: int) -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < limit:
            setattr(config, name, limit)


def _compile_blocks(model: nn.Module) -> None:
    """Regional compilation: each residual block (adapter hook included) through Inductor, static shapes."""
    _set_recompile_limit(64)  # one entry per (tower width, batch size, adapter kind)
    for transformer in (model.visual.transformer, model.transformer):
        for block in transformer.resblocks:
            block.compile(dynamic=False, mode=COMPILE_MODE)


class _GraphedEncoder:
    """One CUDA graph per batch size in ``GRAPH_BATCH_SIZES`` around ``fn``, captured on first use."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], pool: tuple,
                 choose: Callable[[int], Callable[[torch.Tensor], torch.Tensor]] | None = None) -> None:
        self.fn = fn
        self.choose = choose or (lambda size: fn)
        self.pool = pool
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _capture(self, example: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        fn = self.choose(example.shape[0])
        static_in = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up outside the graph (compilation, autotuning, cuBLAS handles)
                fn(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = fn(static_in)
        return graph, static_in, static_out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        largest = GRAPH_BATCH_SIZES[-1]
        for chunk in x.split(largest):
            size = next(s for s in GRAPH_BATCH_SIZES if s >= chunk.shape[0])
            if chunk.shape[0] < size:
                pad = chunk[:1].expand(size - chunk.shape[0], *chunk.shape[1:])
                chunk_padded = torch.cat([chunk, pad])
            else:
                chunk_padded = chunk
            if size not in self.graphs:
                self.graphs[size] = self._capture(chunk_padded)
            graph, static_in, static_out = self.graphs[size]
            static_in.copy_(chunk_padded)
            graph.replay()
            outputs.append(static_out[: chunk.shape[0]].clone())
        return torch.cat(outputs)


class OptimizedCLIP:
    """Inference-only CLIP towers; ``encode_image`` / ``encode_text`` return L2-normalised fp32 embeddings."""

    def __init__(self, model: nn.Module, precision: str = "fp16", kernels: bool = True,
                 cuda_graphs: bool = True, compile: bool | None = None) -> None:
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        device = next(model.parameters()).device
        on_gpu = device.type == "cuda"
        if not on_gpu or (kernels and _triton is None):
            why = "no CUDA device" if not on_gpu else "Triton is not installed"
            warnings.warn(f"mpsclip.kernels.optimize: {why}; running plain PyTorch", stacklevel=3)
        self.dtype = _DTYPES[precision] if on_gpu else torch.float32
        self.device = device
        self.model = copy.deepcopy(model).eval().requires_grad_(False).to(self.dtype)
        fuse = kernels and on_gpu and _triton is not None
        text_causal = _is_causal_mask(getattr(self.model, "attn_mask", None))
        _rewrite_transformer(self.model.visual.transformer, causal=False, fuse=fuse)
        _rewrite_transformer(self.model.transformer, causal=text_causal, fuse=fuse)
        self.compiled = bool(on_gpu and (compile is None or compile) and hasattr(torch, "compile"))
        self.adapter_impl = {tower: dict(ADAPTER_IMPL[tower]) for tower in ("image", "text")}
        self._inductor_model: nn.Module | None = None
        self._encoders: dict[tuple[str, str], Callable[[torch.Tensor], torch.Tensor]] = {}
        if self.compiled:
            if fuse and any(v == "inductor" for m in self.adapter_impl.values() for v in m.values()):
                self._inductor_model = copy.deepcopy(model).eval().requires_grad_(False).to(self.dtype)
                _rewrite_transformer(self._inductor_model.visual.transformer, causal=False, fuse=False)
                _rewrite_transformer(self._inductor_model.transformer, causal=text_causal, fuse=False)
            for m in (self.model, self._inductor_model):
                if m is not None and COMPILE_SCOPE == "blocks":
                    _compile_blocks(m)
        self._image = self._encoder("image", "fused")
        self._text = self._encoder("text", "fused")
        if cuda_graphs and on_gpu:
            pool = torch.cuda.graph_pool_handle()
            self._image = _GraphedEncoder(self._image, pool, lambda size: self._for_size("image", size))
            self._text = _GraphedEncoder(self._text, pool, lambda size: self._for_size("text", size))
        self.kernels = fuse
        self.cuda_graphs = cuda_graphs and on_gpu

    def _encoder(self, tower: str, impl: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The (possibly compiled) encoder of ``tower`` whose adapters run as ``impl``."""
        key = (tower, impl if self._inductor_model is not None else "fused")
        if key not in self._encoders:
            model = self._inductor_model if key[1] == "inductor" else self.model

            def encode(x: torch.Tensor, model: nn.Module = model, tower: str = tower) -> torch.Tensor:
                return F.normalize(getattr(model, f"encode_{tower}")(x).float(), dim=-1)

            if self.compiled and COMPILE_SCOPE == "tower":
                _set_recompile_limit(64)
                encode = torch.compile(encode, dynamic=False, mode=COMPILE_MODE)
            self._encoders[key] = encode
        return self._encoders[key]

    def _for_size(self, tower: str, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return self._encoder(tower, self.adapter_impl[tower].get(size, "fused"))

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._image(images.to(self.device, self.dtype))

    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._text(tokens.to(self.device))


def optimize(model: nn.Module, precision: str = "fp16", kernels: bool = True, cuda_graphs: bool = True,
             compile: bool | None = None) -> OptimizedCLIP:
    """Inference wrapper around an open_clip CLIP (with or without attached adapters); see module doc.

    ``compile=None`` compiles with Inductor on a GPU (never on the CPU; the first call per batch size then
    takes ~10-25 s on an H100); ``False`` keeps eager PyTorch with the fused adapters (still CUDA-graphed)."""
    return OptimizedCLIP(model, precision=precision, kernels=kernels, cuda_graphs=cuda_graphs, compile=compile)
