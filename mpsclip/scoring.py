"""How items are scored for queries, and their top-k: the one rule ``evaluate``, ``search``, ``serve`` and ``bench``
all follow.

A scoring mode picks each item's views from its embeddings (:func:`mode_views`; store columns :data:`MODE_COLUMNS`):

* ``fused``: the retrieval embedding ``normalize(0.5 * (global + regions))``, one view;
* ``global``: the global image embedding, one view;
* ``max-response``: the global embedding and the MPR perspectives. A perspective is valid only when its item had
  sub-images (:func:`perspective_validity`: without them the model makes it from the global embedding, and it
  must not win the max); the global view is always valid.

An item's score for a query is the largest ``view · query`` over its valid views. :func:`topk` ranks items by
(score desc, row asc), padding with row ``-1`` and score ``-inf``, along one of three backends
(:func:`backend_for` chooses): ``numpy-product`` (one view, CPU: an fp32 matrix product), ``maxsim-reference``
(any mode: the exact chunked torch reference of :mod:`mpsclip.kernels.maxsim`) and ``maxsim-kernel`` (the
max-over-views top-k Triton kernel: on a GPU, or on the CPU under ``TRITON_INTERPRET=1``). :func:`similarity` is
the whole ``[queries, items]`` matrix by the same rule, for evaluation metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

import numpy as np
import torch

from mpsclip.choices import MODES
from mpsclip.errors import MPSCLIPError
from mpsclip.kernels.maxsim import maxsim_scores, maxsim_topk, maxsim_topk_reference, merge_topk

MODE_COLUMNS = {"fused": ["retrieval"], "global": ["global"], "max-response": ["global", "perspectives", "valid"]}
"""The store columns each mode's views are made from."""
Backend = Literal["numpy-product", "maxsim-reference", "maxsim-kernel"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
TopK = tuple[torch.Tensor, torch.Tensor]
"""``(scores [Q, k] fp32, rows [Q, k] int64)``, best first; padding row ``-1``, score ``-inf``."""
TIE_MARGIN = 8  # extra columns torch.topk proposes, so that ties at the k-th score rarely need a full scan


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise MPSCLIPError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


def perspective_validity(mask: torch.Tensor, views: int) -> torch.Tensor:
    """``[B, views]`` validity of the MPR perspectives of images whose sub-images are ``mask [B, R]``: all of an
    image's perspectives are valid when it has a sub-image, none when it has none."""
    return mask.any(dim=1, keepdim=True).expand(-1, views)


def mode_views(
    columns: Mapping[str, np.ndarray | torch.Tensor], mode: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[n, V, D]`` views scored for ``mode`` (from the columns of :data:`MODE_COLUMNS`, numpy or torch, dtype
    kept) and their ``[n, V]`` validity (None: all valid)."""
    check_mode(mode)
    if mode == "fused":
        return torch.as_tensor(columns["retrieval"]).unsqueeze(1), None
    glob = torch.as_tensor(columns["global"]).unsqueeze(1)
    if mode == "global":
        return glob, None
    views = torch.cat([glob, torch.as_tensor(columns["perspectives"]).to(glob.dtype)], dim=1)
    valid = torch.as_tensor(columns["valid"]).bool()
    return views, torch.cat([torch.ones(len(valid), 1, dtype=torch.bool, device=valid.device), valid], dim=1)


def backend_for(device: torch.device, mode: str) -> Backend:
    """The backend for queries on ``device``: the kernel on a CUDA device; on the CPU a numpy matrix product for
    the one-view modes (fused, global) and the chunked exact reference for max-response."""
    check_mode(mode)
    if device.type == "cuda":
        return "maxsim-kernel"
    return "numpy-product" if mode in ("fused", "global") else "maxsim-reference"


def padding(n_queries: int, k: int, device: torch.device | str = "cpu") -> TopK:
    """A top-``k`` with no item: scores ``-inf``, rows ``-1``."""
    scores = torch.full((n_queries, k), float("-inf"), device=device)
    return scores, torch.full((n_queries, k), -1, dtype=torch.int64, device=device)


def merge(best: TopK, more: TopK, k: int) -> TopK:
    """The top-``k`` of two top-k's over disjoint rows (as a streamed search keeps a running one)."""
    return merge_topk(torch.cat([best[0], more[0]], 1), torch.cat([best[1], more[1]], 1), k)


def topk(
    queries: torch.Tensor, views: torch.Tensor, valid: torch.Tensor | None, rows: torch.Tensor, k: int,
    backend: Backend,
) -> TopK:
    """Exact top-``k`` of the items ``views [n, V, D]`` (validity ``valid [n, V]``, None: all valid; store rows
    ``rows [n]``, ascending) for ``queries [Q, D]``, scored in fp32 along ``backend``, on the queries' device:
    ``(scores [Q, k], rows [Q, k])`` by (score desc, row asc), equal scores included; padding row ``-1``."""
    if k < 1:
        raise MPSCLIPError(f"-k must be 1 or more, got {k}")
    if backend not in BACKENDS:
        raise MPSCLIPError(f"unknown scoring backend {backend!r}; choose from {', '.join(BACKENDS)}")
    queries = queries.float()
    device = queries.device
    if len(rows) == 0:
        return padding(len(queries), k, device)
    if backend == "numpy-product":
        if valid is not None or views.shape[1] != 1:
            raise MPSCLIPError("the numpy-product backend scores one view per item (fused, global); "
                               "score max-response with maxsim-reference or maxsim-kernel")
        best = _ordered_topk(product(queries, views[:, 0]), rows.cpu(), k)
        return best[0].to(device), best[1].to(device)
    if backend == "maxsim-reference":
        scores, found = maxsim_topk_reference(queries, views, k, valid)
    else:  # scored in fp32 on the device, as on the CPU
        valid = valid.to(device) if valid is not None else None
        scores, found = maxsim_topk(queries, views.to(device).float(), k, valid)
    rows = rows.to(device)
    return scores, torch.where(found < 0, -1, rows[found.clamp(min=0)])


def similarity(queries: torch.Tensor, views: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Every item's fp32 score for every query, ``[Q, n]`` (on the CPU), by the rule of :func:`topk`: the one-view
    modes by the matrix product of ``numpy-product``, several views by the reference's masked max."""
    if views.shape[1] == 1 and valid is None:
        return product(queries, views[:, 0])
    return maxsim_scores(queries.cpu(), views.cpu(), valid.cpu() if valid is not None else None)


def product(queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``queries [Q, D] @ items [n, D].T`` in fp32 through numpy, on the CPU: for the one query of a request,
    numpy's BLAS (OpenBLAS) ran this about 2x faster than torch's (MKL, whose sgemv is slow on AMD CPUs) on the
    2-core EPYC of bench/results/serve-score.md."""
    q = queries.detach().float().cpu().numpy()
    return torch.from_numpy(q @ items.detach().float().cpu().numpy().T)


def _ordered_topk(scores: torch.Tensor, rows: torch.Tensor, k: int) -> TopK:
    """Top-``k`` of ``scores [Q, n]`` (columns are the store rows ``rows``, ascending) by (score desc, row asc).
    ``torch.topk`` proposes ``k + TIE_MARGIN`` columns, which hold every column scoring above the window's last
    score; only a query whose k-th score is still tied there gathers all the columns reaching it."""
    n = scores.shape[1]
    width = min(n, k + TIE_MARGIN)
    top_s, top_i = torch.topk(scores, width, dim=1)
    best_s, best_r = merge_topk(top_s, rows[top_i], k)
    if width < n:
        for q in torch.nonzero(top_s[:, -1] == top_s[:, k - 1]).flatten().tolist():
            candidates = torch.from_numpy(np.flatnonzero(scores[q].numpy() >= top_s[q, k - 1].item()))
            s, r = merge_topk(scores[q, candidates][None], rows[candidates][None], k)
            best_s[q], best_r[q] = s[0], r[0]
    return best_s, best_r
