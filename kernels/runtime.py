"""Inference runtime for an open_clip CLIP with G²A adapters: fused adapters, SDPA attention, CUDA graphs.

``optimize(model)`` returns an :class:`OptimizedCLIP` holding an eval-mode copy of the model in fp16 or bf16
whose backbone attention calls ``F.scaled_dot_product_attention`` on the original weights and whose
adapters are :class:`~mpsclip.kernels.g2a.FusedG2Adapter` modules. ``encode_image`` / ``encode_text``
return L2-normalised embeddings; on a GPU each tower is captured once per batch size in
``GRAPH_BATCH_SIZES`` and replayed, with odd batches padded up to the next captured size. Without a GPU
or Triton the same wrapper runs plain PyTorch (fp32 on the CPU) after a one-line warning.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from mpsclip.kernels.g2a import FusedG2Adapter
from mpsclip.kernels.g2a import triton as _triton
from torch import nn

GRAPH_BATCH_SIZES = (1, 8, 64, 256, 512)
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


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
    """Swap each block's attention for SDPA and, when ``fuse``, its adapter for the fused kernel."""
    for block in transformer.resblocks:
        block.attn = SdpaAttention(block.attn, causal)
        if fuse and hasattr(block, "g2adapter"):
            block.g2adapter = FusedG2Adapter(block.g2adapter)


class _GraphedEncoder:
    """One CUDA graph per batch size in ``GRAPH_BATCH_SIZES`` around ``fn``, captured on first use."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], pool: tuple) -> None:
        self.fn = fn
        self.pool = pool
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _capture(self, example: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (kernel compilation, cuBLAS handles)
                self.fn(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.fn(static_in)
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
                 cuda_graphs: bool = True) -> None:  # fmt: skip
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
        self._image = self._encode_image_eager
        self._text = self._encode_text_eager
        if cuda_graphs and on_gpu:
            pool = torch.cuda.graph_pool_handle()
            self._image = _GraphedEncoder(self._encode_image_eager, pool)
            self._text = _GraphedEncoder(self._encode_text_eager, pool)
        self.kernels = fuse
        self.cuda_graphs = cuda_graphs and on_gpu

    def _encode_image_eager(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(images).float(), dim=-1)

    def _encode_text_eager(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._image(images.to(self.device, self.dtype))

    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._text(tokens.to(self.device))


def optimize(model: nn.Module, precision: str = "fp16", kernels: bool = True,
             cuda_graphs: bool = True) -> OptimizedCLIP:  # fmt: skip
    """Inference wrapper around an open_clip CLIP (with or without attached adapters); see module doc."""
    return OptimizedCLIP(model, precision=precision, kernels=kernels, cuda_graphs=cuda_graphs)
