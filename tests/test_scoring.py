"""One way to score: evaluate, 'mpsclip search', 'mpsclip serve' (every CPU backend, and the kernel under Triton's
CPU interpreter) and 'mpsclip bench search' rank the same gallery identically, ties and items without sub-images
included.

The gallery's unit vectors have entries 0, ±1/4 and ±1/2 (exact in fp16, and every dot product exact in fp32 whatever
the order of its sums), so equal scores are exact ties and every path's scores equal the brute-force ones bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from extras import require
from mpsclip.bench.search import memory_search

from mpsclip import scoring
from mpsclip.archive.search import exact_topk
from mpsclip.archive.store import ShardRows, shard_path, write_manifest, write_shard
from mpsclip.archive.store_reader import load_store, open_store
from mpsclip.choices import MODES
from mpsclip.errors import MPSCLIPError
from mpsclip.evaluate import EvalEmbeddings, mode_similarity
from tests.interpreter import INTERPRETED, interpreted, run_in_interpreter

DIM, VIEWS, K = 16, 3, 10  # K: what 'mpsclip bench search' ranks
SHARDS = (9, 0, 7, 8)  # an empty shard in between
N = sum(SHARDS)
WITHOUT_SUB_IMAGES = (0, 4, 9, 13, 20)
COPIES = {5: 2, 17: 2, 22: 11}  # item: the item it copies (exact ties)
parent = pytest.mark.skipif(INTERPRETED, reason="runs in the parent process, not the TRITON_INTERPRET=1 child")


def _dyadic(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit vectors [*shape, DIM]: ``halves`` entries ±1/2 and 16 - 4 x ``halves`` entries ±1/4 (a store checks
    norms), few enough distinct scores for ties."""
    out = np.zeros((int(np.prod(shape)), DIM), dtype=np.float32)
    for vector in out:
        halves = rng.integers(1, 5)
        where = rng.permutation(DIM)[: halves + DIM - 4 * halves]
        vector[where] = np.where(np.arange(len(where)) < halves, 0.5, 0.25) * rng.choice([-1, 1], size=len(where))
    return out.reshape(*shape, DIM)


def _queries() -> torch.Tensor:
    return torch.from_numpy(_dyadic(np.random.default_rng(1), (4,)))


def _gallery() -> dict[str, np.ndarray]:
    """Store columns of N items: items without sub-images carry perspectives that would win the max for the
    queries (they copy them) if they counted."""
    rng = np.random.default_rng(0)
    columns = {"retrieval": _dyadic(rng, (N,)), "global": _dyadic(rng, (N,)),
               "perspectives": _dyadic(rng, (N, VIEWS)), "valid": np.ones((N, VIEWS), dtype=bool)}
    queries = _queries().numpy()
    for j, row in enumerate(WITHOUT_SUB_IMAGES):
        columns["valid"][row] = False
        columns["perspectives"][row] = queries[j % len(queries)]
    for row, original in COPIES.items():
        for name in columns:
            columns[name][row] = columns[name][original]
    return columns


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "gallery"
    columns, start = _gallery(), 0
    for shard, size in enumerate(SHARDS):
        part = {name: values[start : start + size] for name, values in columns.items()}
        rows = ShardRows([f"item{i:02d}" for i in range(start, start + size)], ["{}"] * size, part["retrieval"],
                         part["global"], part["perspectives"], part["valid"])
        write_shard(shard_path(path, shard), rows, DIM, VIEWS)
        start += size
    counts = {"items": N, "embedded": N, "failed": 0, "shards": len(SHARDS)}
    write_manifest(path, {"complete": True, "counts": counts, "dim": DIM, "views": VIEWS, "checkpoint": "synthetic",
                          "checkpoint_sha256": "synthetic", "arch": None})
    return path


def brute_force(mode: str, all_valid: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K by (score desc, row asc) of every item scored in float64, one by one (``all_valid``: counting the
    perspectives of items without sub-images, as evaluate did)."""
    columns, scores, rows = _gallery(), [], []
    for q in _queries().double().numpy():
        scored = []
        for row in range(N):
            if mode == "fused":
                score = columns["retrieval"][row] @ q
            elif mode == "global":
                score = columns["global"][row] @ q
            else:
                valid = columns["valid"][row] | all_valid
                views = [columns["global"][row], *columns["perspectives"][row][valid]]
                score = max(view @ q for view in views)
            scored.append((-float(score), row))
        best = sorted(scored)[:K]
        scores.append([-s for s, _ in best])
        rows.append([r for _, r in best])
    return torch.tensor(scores, dtype=torch.float32), torch.tensor(rows)


def evaluate_topk(mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate's text -> image ranking (the stable argsort of :func:`mpsclip.metrics.retrieval_metrics`)."""
    c, queries = _gallery(), _queries()
    emb = EvalEmbeddings(*(torch.from_numpy(c[n]) for n in ("global", "retrieval", "perspectives", "valid")),
                         queries, [0] * len(queries), [[] for _ in range(N)])
    sim = mode_similarity(emb, mode).t()
    rows = torch.from_numpy(np.argsort(-sim.numpy(), axis=1, kind="stable")[:, :K])
    return sim.gather(1, rows), rows


def assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert got[1].tolist() == want[1].tolist()
    assert got[0].tolist() == want[0].tolist()  # exact: dyadic scores


@parent
@pytest.mark.parametrize("mode", MODES)
def test_the_gallery_has_ties_and_items_whose_sub_images_matter(mode: str) -> None:
    scores, rows = brute_force(mode)
    assert (scores[:, 1:] == scores[:, :-1]).any()  # equal scores inside the top K: the row decides
    assert any(int(original) in r and int(copy) in r for r in rows.tolist() for copy, original in COPIES.items())
    if mode == "max-response":
        assert not torch.equal(brute_force(mode, all_valid=True)[1], rows)


@parent
@pytest.mark.parametrize("mode", MODES)
def test_evaluate_search_serve_and_bench_rank_alike(store: Path, mode: str) -> None:
    from mpsclip.serve.catalog import Catalog

    want = brute_force(mode)
    assert_same(evaluate_topk(mode), want)
    assert_same(exact_topk(open_store(store), _queries(), K, mode), want)
    served = Catalog([store]).get(None)
    assert_same(served.topk(_queries(), K, mode), want)
    backends = ["maxsim-reference"] + (["numpy-product"] if mode != "max-response" else [])
    for backend in backends:
        assert_same(served.topk_by(backend, _queries(), K, mode), want)
    assert_same(memory_search(load_store(store), mode)(_queries()), want)


@parent
def test_evaluate_ranked_items_without_sub_images_by_their_invalid_perspectives_before() -> None:
    """The case that failed: evaluate counted the perspectives of items without sub-images (here they copy the
    queries, so they came first); now it ranks as search does."""
    assert not torch.equal(evaluate_topk("max-response")[1], brute_force("max-response", all_valid=True)[1])
    assert torch.equal(evaluate_topk("max-response")[1], brute_force("max-response")[1])


@parent
@pytest.mark.parametrize("mode", MODES)
def test_backends_agree_with_the_full_matrix(mode: str) -> None:
    """:func:`scoring.topk` over a subset of rows (ascending, with gaps), k past the rows, against
    :func:`scoring.similarity` ranked by (score desc, row asc)."""
    views, valid = scoring.mode_views(_gallery(), mode)
    keep = torch.arange(1, N, 2)
    views, valid = views[keep], valid[keep] if valid is not None else None
    sim = scoring.similarity(_queries(), views, valid)
    order = torch.from_numpy(np.argsort(-sim.numpy(), axis=1, kind="stable"))
    k = len(keep) + 3
    want = (torch.cat([sim.gather(1, order), torch.full((len(sim), 3), float("-inf"))], 1),
            torch.cat([keep[order], torch.full((len(sim), 3), -1)], 1))
    for backend in scoring.BACKENDS:
        if backend == "numpy-product" and mode == "max-response":
            with pytest.raises(MPSCLIPError, match="one view per item"):
                scoring.topk(_queries(), views, valid, keep, k, backend)
            continue
        assert_same(scoring.topk(_queries(), views, valid, keep, k, backend), want)
    assert scoring.backend_for(torch.device("cpu"), mode) == ("maxsim-reference" if mode == "max-response"
                                                               else "numpy-product")
    assert scoring.backend_for(torch.device("cuda", 0), mode) == "maxsim-kernel"


@pytest.mark.triton
@pytest.mark.skipif(INTERPRETED, reason="child process")
def test_kernel_under_triton_interpreter() -> None:
    require("triton")
    run_in_interpreter(__file__)


@interpreted
@pytest.mark.parametrize("mode", MODES)
def test_served_kernel_ranks_alike(store: Path, mode: str) -> None:
    """The GPU path of 'mpsclip serve' and 'mpsclip search' (the max-over-views top-k kernel), run by the
    interpreter on CPU tensors."""
    from mpsclip.serve.catalog import Catalog

    assert_same(Catalog([store]).get(None).topk_by("maxsim-kernel", _queries(), K, mode), brute_force(mode))
    views, valid = scoring.mode_views(_gallery(), mode)
    assert_same(scoring.topk(_queries(), views, valid, torch.arange(N), K, "maxsim-kernel"), brute_force(mode))


@pytest.mark.gpu
@parent
@pytest.mark.parametrize("mode", MODES)
def test_search_serve_and_bench_on_cuda_rank_alike(store: Path, mode: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the kernel path is tested under the Triton interpreter above")
    require("triton")
    from mpsclip.serve.catalog import Catalog

    want, queries = brute_force(mode), _queries().cuda()
    assert_same(exact_topk(open_store(store), queries, K, mode), want)
    assert_same(Catalog([store], device="cuda").get(None).topk(queries, K, mode), want)
    assert_same(memory_search(load_store(store), mode)(queries), want)
