"""Max-response ("max-sim") top-k search: ``score(q, n) = max over views of <query view, gallery view>``.

Exactly one side carries views:

* text → image: ``queries [Q, D]`` against ``gallery [N, V, D]``; ``valid [N, V]`` marks present views;
* image → text: ``queries [Q, V, D]`` against ``gallery [N, D]``; ``valid [Q, V]`` marks present views.

An item (or query) with no valid view scores ``-inf`` and ranks after every finite score. Results are
sorted by score descending, ties broken by the lower gallery index. When ``k > N`` the last ``k - N``
columns are padding: score ``-inf`` and index ``-1``.

The GPU path never materialises ``Q × N × V`` (nor ``Q × N``): stage 1 is a Triton kernel in which each
program owns a tile of queries and a contiguous chunk of the gallery, computes ``[BQ, BN]`` score tiles
with the view max reduced in registers and keeps a running top-``KC`` per query in registers; stage 2
merges the few candidates per (query, chunk) with two stable sorts. A gallery held in CPU memory is
streamed to the GPU in chunks and the running top-k is merged the same way.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is an optional extra
    triton = None

_NO_INDEX = 2**31 - 1  # index of an empty candidate slot inside the kernel
_CPU_CHUNK_ELEMENTS = 1 << 24  # Q × chunk × V fp32 scores held at once by the reference path
_STREAM_CHUNK_BYTES = 256 << 20  # host → device transfer size for CPU-resident galleries
_MAX_BQ = 128  # queries per program: each program re-reads its gallery chunk once per query tile


def _check(queries: torch.Tensor, gallery: torch.Tensor, k: int, valid: torch.Tensor | None) -> int:
    """Validate shapes and return V (the number of views on the side that carries them)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if queries.shape[-1] != gallery.shape[-1]:
        raise ValueError(f"embedding sizes differ: {queries.shape[-1]} vs {gallery.shape[-1]}")
    if queries.ndim == 2 and gallery.ndim == 3:
        views, expected_valid = gallery.shape[1], gallery.shape[:2]
    elif queries.ndim == 3 and gallery.ndim == 2:
        views, expected_valid = queries.shape[1], queries.shape[:2]
    else:
        raise ValueError(
            "exactly one side carries views: queries [Q, D] with gallery [N, V, D], "
            f"or queries [Q, V, D] with gallery [N, D]; got {tuple(queries.shape)} and {tuple(gallery.shape)}"
        )
    if valid is not None and tuple(valid.shape) != tuple(expected_valid):
        raise ValueError(f"valid must be {tuple(expected_valid)}, got {tuple(valid.shape)}")
    return views


def maxsim_scores(
    queries: torch.Tensor, gallery: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """Exact fp32 ``[Q, N]`` max-response scores of a gallery (or a chunk of one: the reference's building block);
    an invalid view never wins the max."""
    q = queries.float()
    g = gallery.float()
    if gallery.ndim == 3:  # text → image: views on the gallery
        s = torch.einsum("qd,nvd->qnv", q, g)
        if valid is not None:
            s = s.masked_fill(~valid.bool().unsqueeze(0), float("-inf"))
    else:  # image → text: views on the queries
        s = torch.einsum("qvd,nd->qnv", q, g)
        if valid is not None:
            s = s.masked_fill(~valid.bool().unsqueeze(1), float("-inf"))
    return s.amax(-1)


def merge_topk(
    scores: torch.Tensor, indices: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of candidate rows by (score desc, index asc); index ``-1`` marks padding and ranks last."""
    key = torch.where(indices < 0, torch.iinfo(torch.int64).max, indices)
    by_index = torch.sort(key, dim=1, stable=True).indices
    scores = scores.gather(1, by_index)
    indices = indices.gather(1, by_index)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    scores, indices = scores.gather(1, order), indices.gather(1, order)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
        indices = torch.nn.functional.pad(indices, (0, pad), value=-1)
    return scores, indices


def maxsim_topk_reference(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    valid: torch.Tensor | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact torch version (fp32 scores), chunked over N so that memory stays bounded."""
    views = _check(queries, gallery, k, valid)
    n_items, n_queries = gallery.shape[0], queries.shape[0]
    if chunk is None:
        chunk = max(1, _CPU_CHUNK_ELEMENTS // max(1, n_queries * views))
    device = queries.device
    best_s = torch.full((n_queries, 0), float("-inf"), device=device)
    best_i = torch.full((n_queries, 0), -1, dtype=torch.int64, device=device)
    for start in range(0, n_items, chunk):
        stop = min(start + chunk, n_items)
        g = gallery[start:stop].to(device)
        v = None
        if valid is not None:
            v = valid[start:stop].to(device) if gallery.ndim == 3 else valid.to(device)
        s = maxsim_scores(queries, g, v)
        idx = torch.arange(start, stop, device=device).expand(n_queries, -1)
        best_s, best_i = merge_topk(torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1), k)
    return merge_topk(best_s, best_i, k)


if triton is not None:

    @triton.jit
    def _maxsim_topk_kernel(
        q_ptr, g_ptr, valid_ptr, out_s_ptr, out_i_ptr,
        n_queries, n_items, views, dim, items_per_chunk, n_chunks,
        sq_q, sq_v, sg_n, sg_v, sv_q, sv_n,
        NO_INDEX: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr,
        BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KC: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_q * BQ + tl.arange(0, BQ)
        row_ok = rows < n_queries
        cols = tl.arange(0, BN)
        dims = tl.arange(0, BD)
        slots = tl.arange(0, KC)
        neg_inf = float("-inf")

        run_s = tl.full((BQ, KC), neg_inf, tl.float32)
        run_i = tl.full((BQ, KC), NO_INDEX, tl.int32)

        chunk_start = pid_c * items_per_chunk
        chunk_stop = tl.minimum(chunk_start + items_per_chunk, n_items)
        for n0 in range(chunk_start, chunk_stop, BN):
            items = n0 + cols
            item_ok = items < chunk_stop
            best = tl.full((BQ, BN), neg_inf, tl.float32)
            for v in range(views):
                acc = tl.zeros((BQ, BN), tl.float32)
                for d0 in range(0, dim, BD):
                    d_ok = (d0 + dims) < dim
                    q = tl.load(
                        q_ptr + rows[:, None] * sq_q + v * sq_v + (d0 + dims)[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
                    )
                    g = tl.load(
                        g_ptr + items[:, None].to(tl.int64) * sg_n + v * sg_v + (d0 + dims)[None, :],
                        mask=item_ok[:, None] & d_ok[None, :], other=0.0,
                    )
                    acc = tl.dot(q, tl.trans(g), acc, input_precision=PRECISION)
                if HAS_VALID:
                    ok = tl.load(
                        valid_ptr + rows[:, None] * sv_q + items[None, :].to(tl.int64) * sv_n + v,
                        mask=row_ok[:, None] & item_ok[None, :], other=1,
                    )
                    acc = tl.where(ok != 0, acc, neg_inf)
                best = tl.maximum(best, acc)
            tile_s = tl.where(item_ok[None, :], best, neg_inf)
            tile_i = tl.where(item_ok[None, :], items[None, :], NO_INDEX) + tl.zeros((BQ, BN), tl.int32)

            # Replace-the-worst insertion: each pass moves every row's best tile entry into the row's
            # running set if it beats the worst kept entry; passes stop once no row has such an entry.
            ws = tl.min(run_s, 1)
            wi = tl.max(tl.where(run_s == ws[:, None], run_i, -1), 1)
            ts = tl.max(tile_s, 1)
            ti = tl.min(tl.where(tile_s == ts[:, None], tile_i, NO_INDEX), 1)
            beat = (ts > ws) | ((ts == ws) & (ti < wi))
            while tl.max(beat.to(tl.int32), 0) > 0:
                wpos = tl.min(tl.where((run_s == ws[:, None]) & (run_i == wi[:, None]), slots[None, :], KC), 1)
                put = beat[:, None] & (slots[None, :] == wpos[:, None])
                run_s = tl.where(put, ts[:, None], run_s)
                run_i = tl.where(put, ti[:, None], run_i)
                taken = beat[:, None] & (tile_i == ti[:, None])
                tile_s = tl.where(taken, neg_inf, tile_s)
                tile_i = tl.where(taken, NO_INDEX, tile_i)
                ws = tl.min(run_s, 1)
                wi = tl.max(tl.where(run_s == ws[:, None], run_i, -1), 1)
                ts = tl.max(tile_s, 1)
                ti = tl.min(tl.where(tile_s == ts[:, None], tile_i, NO_INDEX), 1)
                beat = (ts > ws) | ((ts == ws) & (ti < wi))

        out = (rows[:, None].to(tl.int64) * n_chunks + pid_c) * KC + slots[None, :]
        tl.store(out_s_ptr + out, run_s, mask=row_ok[:, None])
        tl.store(out_i_ptr + out, run_i, mask=row_ok[:, None])


def _launch_config(n_queries: int, k: int) -> tuple[int, int]:
    """(BQ, KC): query tile and per-program candidate count, keeping BQ × KC register tiles bounded."""
    kc = max(16, triton.next_power_of_2(k))
    bq = min(_MAX_BQ, max(16, triton.next_power_of_2(n_queries)))
    return min(bq, max(16, 4096 // kc)), kc


def _topk_on_device(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 (Triton) + stage 2 (merge) for a gallery already on the queries' device."""
    n_queries, n_items, dim = queries.shape[0], gallery.shape[0], queries.shape[-1]
    t2i = gallery.ndim == 3
    views = gallery.shape[1] if t2i else queries.shape[1]
    queries, gallery = queries.contiguous(), gallery.contiguous()
    bq, kc = _launch_config(n_queries, k)
    bn, bd = 128, 64
    q_tiles = triton.cdiv(n_queries, bq)
    n_tiles = triton.cdiv(n_items, bn)
    sms = torch.cuda.get_device_properties(queries.device).multi_processor_count if queries.is_cuda else 4
    n_chunks = max(1, min(n_tiles, triton.cdiv(4 * sms, q_tiles)))
    items_per_chunk = triton.cdiv(n_tiles, n_chunks) * bn
    n_chunks = triton.cdiv(n_items, items_per_chunk)
    out_s = torch.empty((n_queries, n_chunks * kc), dtype=torch.float32, device=queries.device)
    out_i = torch.empty((n_queries, n_chunks * kc), dtype=torch.int32, device=queries.device)
    has_valid = valid is not None
    valid_u8 = valid.to(device=queries.device, dtype=torch.uint8).contiguous() if has_valid else out_i
    if t2i:
        sq_q, sq_v, sg_n, sg_v, sv_q, sv_n = dim, 0, views * dim, dim, 0, views
    else:
        sq_q, sq_v, sg_n, sg_v, sv_q, sv_n = views * dim, dim, dim, 0, views, 0
    _maxsim_topk_kernel[(q_tiles, n_chunks)](
        queries, gallery, valid_u8, out_s, out_i,
        n_queries, n_items, views, dim, items_per_chunk, n_chunks,
        sq_q, sq_v, sg_n, sg_v, sv_q, sv_n,
        NO_INDEX=_NO_INDEX, HAS_VALID=has_valid, PRECISION="ieee" if queries.dtype == torch.float32 else "tf32",
        BQ=bq, BN=bn, BD=bd, KC=kc, num_warps=8 if bq >= 64 else 4, num_stages=3,
    )
    indices = out_i.long()
    indices = torch.where(indices == _NO_INDEX, -1, indices)
    return merge_topk(out_s, indices, k)


def _stream_from_host(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gallery in host memory: copy chunks on a side stream (overlapping the previous chunk's search)."""
    item_bytes = gallery[0].numel() * gallery.element_size()
    chunk = max(1, _STREAM_CHUNK_BYTES // item_bytes)
    copy_stream = torch.cuda.Stream(device=queries.device)
    main_stream = torch.cuda.current_stream(queries.device)
    best_s = torch.full((queries.shape[0], 0), float("-inf"), device=queries.device)
    best_i = torch.full((queries.shape[0], 0), -1, dtype=torch.int64, device=queries.device)
    for start in range(0, gallery.shape[0], chunk):
        stop = min(start + chunk, gallery.shape[0])
        with torch.cuda.stream(copy_stream):
            g = gallery[start:stop].to(queries.device, non_blocking=True)
            v = valid[start:stop].to(queries.device, non_blocking=True) if valid is not None else None
        main_stream.wait_stream(copy_stream)
        g.record_stream(main_stream)
        if v is not None:
            v.record_stream(main_stream)
        s, i = _topk_on_device(queries, g, k, v)
        i = torch.where(i < 0, -1, i + start)
        best_s, best_i = merge_topk(torch.cat([best_s, s], 1), torch.cat([best_i, i], 1), k)
    return best_s, best_i


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def maxsim_topk(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery items per query by max-response score: ``(scores [Q, k] fp32, indices [Q, k] int64)``.

    Uses the Triton kernel when the queries are on a CUDA device (a gallery in host memory, ideally
    pinned, is streamed in chunks); otherwise the exact chunked torch reference. If ``k > N`` the
    trailing columns are padding (score ``-inf``, index ``-1``).
    """
    _check(queries, gallery, k, valid)
    if triton is not None and not queries.is_cuda and _interpreting():
        return _topk_on_device(queries, gallery, k, valid)
    if triton is None or not queries.is_cuda:
        return maxsim_topk_reference(queries, gallery, k, valid)
    if gallery.ndim == 2 and valid is not None:
        valid = valid.to(queries.device)
    if not gallery.is_cuda and gallery.ndim == 3:
        return _stream_from_host(queries, gallery, k, valid)
    if not gallery.is_cuda:  # image → text galleries are small: one copy
        gallery = gallery.to(queries.device)
    return _topk_on_device(queries, gallery, k, valid)
