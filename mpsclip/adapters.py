"""Gated Global Attention (G²A) adapter, attached after every residual block of both CLIP towers.

Submodule names mirror the authors' release so that their state-dict keys load unchanged:
``g2adapter.{down_proj, self_attention, attention_proj, global_attention.{attn, mlp}, gate, up_proj}``.
All modules here work on batch-first tensors ``[batch, tokens, channels]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AdapterConfig:
    bottleneck: int = 128
    heads: int = 8
    dropout: float = 0.1
    drop_path: float = 0.1
    ffn_ratio: int = 2
    dw_kernel: int = 5
    gate_init: float = 0.6
    max_tokens: int = 10000


def sinusoidal_table(max_tokens: int, channels: int) -> torch.Tensor:
    """Fixed sinusoidal positional table ``[max_tokens, channels]`` (sin on even, cos on odd channels)."""
    position = torch.arange(max_tokens, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, channels, 2, dtype=torch.float32) * -(math.log(10000.0) / channels))
    table = torch.zeros(max_tokens, channels)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


class DropPath(nn.Module):
    """Stochastic depth per sample; identity in eval mode or when ``p == 0``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * mask


class PositionalTable(nn.Module):
    """Adds the sinusoidal table to ``[B, L, C]``. Not saved in checkpoints: it is recomputed."""

    def __init__(self, channels: int, max_tokens: int) -> None:
        super().__init__()
        self.register_buffer("pe", sinusoidal_table(max_tokens, channels).unsqueeze(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


class TokenAttention(nn.Module):
    """``norm(h + dropout(attn(y, y, y)))`` with ``y = attn_in_norm(h) + PE``."""

    def __init__(self, channels: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.pos_enc = PositionalTable(channels, cfg.max_tokens)
        self.attn_in_norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.pos_enc(self.attn_in_norm(h))
        out, _ = self.attn(y, y, y, need_weights=False)
        return self.norm(h + self.dropout(out))


class PointwiseConv(nn.Module):
    """1×1 Conv1d without bias (kept as ``.conv`` for the authors' key layout)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvFeedForward(nn.Module):
    """1×1 → depthwise k → ReLU → dropout → 1×1 → dropout, over the token axis of ``[B, C, L]``."""

    def __init__(self, channels: int, cfg: AdapterConfig) -> None:
        super().__init__()
        hidden = channels * cfg.ffn_ratio
        self.fc1 = PointwiseConv(channels, hidden)
        self.dwconv = nn.Conv1d(hidden, hidden, cfg.dw_kernel, padding=cfg.dw_kernel // 2, groups=hidden)
        self.act = nn.ReLU()
        self.fc2 = PointwiseConv(hidden, channels)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x))))
        return self.drop(self.fc2(x))


class GlobalAttentionBlock(nn.Module):
    """``h + drop_path(attn(h))`` then ``h + drop_path(ffn(h))`` on ``[B, L, C]``."""

    def __init__(self, channels: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.attn = TokenAttention(channels, cfg)
        self.mlp = ConvFeedForward(channels, cfg)
        self.drop_path = DropPath(cfg.drop_path)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.drop_path(self.attn(h))
        return h + self.drop_path(self.mlp(h.transpose(1, 2)).transpose(1, 2))


class G2Adapter(nn.Module):
    """``x + up_proj(sigmoid(gate) * GA(attention_proj(MHA(gelu(down_proj(x))))))``; identity at init."""

    def __init__(self, width: int, cfg: AdapterConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or AdapterConfig()
        r = cfg.bottleneck
        self.down_proj = nn.Linear(width, r)
        self.self_attention = nn.MultiheadAttention(r, cfg.heads, batch_first=True)
        self.attention_proj = nn.Linear(r, r)
        self.global_attention = GlobalAttentionBlock(r, cfg)
        self.gate = nn.Parameter(torch.tensor(cfg.gate_init))
        self.up_proj = nn.Linear(r, width)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.down_proj(x))
        h, _ = self.self_attention(h, h, h, need_weights=False)
        h = self.global_attention(self.attention_proj(h))
        return x + self.up_proj(torch.sigmoid(self.gate) * h)


def attach_adapters(transformer: nn.Module, cfg: AdapterConfig | None = None) -> list[G2Adapter]:
    """Give every residual block of an open_clip ``Transformer`` a ``g2adapter`` applied to its output.

    The adapter is registered on the block itself (state-dict key ``resblocks.{i}.g2adapter.*``, as in the
    authors' release) and run by a forward hook, so open_clip's own modules stay untouched. The returned
    list is for convenience only; do not register it as a submodule (the keys would appear twice).
    """
    batch_first = getattr(transformer, "batch_first", True)
    adapters = []
    for block in transformer.resblocks:
        adapter = G2Adapter(transformer.width, cfg)
        block.add_module("g2adapter", adapter)
        block.register_forward_hook(_run_adapter if batch_first else _run_adapter_seq_first)
        adapters.append(adapter)
    return adapters


def _run_adapter(block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return block.g2adapter(output)


def _run_adapter_seq_first(block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return block.g2adapter(output.transpose(0, 1)).transpose(0, 1)
