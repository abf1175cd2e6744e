"""How the API is put together: ``POST /search/batch`` hands all its text and image queries to the encoder in
one call (one tower call per kind) and answers exactly as one ``POST /search`` per query; the page offers the
modes the API takes."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from extras import require

require("fastapi", "pip install 'mpsclip[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from mpsclip.serve.app import create_app  # noqa: E402
from mpsclip.serve.catalog import Catalog, Store  # noqa: E402
from mpsclip.serve.encoders import InProcessEncoder, Kind, Query  # noqa: E402
from mpsclip.serve.routes_page import STATIC  # noqa: E402
from mpsclip.serve.towers import TowerSet  # noqa: E402

from mpsclip.archive.search import load_search_model  # noqa: E402
from mpsclip.choices import MODES  # noqa: E402


class CountingEncoder:
    """The in-process encoder (real towers), recording each call the API makes to it and each tower call under it."""

    def __init__(self, catalog: Catalog) -> None:
        self.inner = InProcessEncoder(TowerSet().add(catalog))
        self.calls: list[int] = []  # queries per encoder call
        self.tower_calls: list[tuple[str, int]] = []  # (kind, rows) per tower call
        for tower in self.inner.towers.towers.values():
            for kind in ("text", "image"):
                setattr(tower, f"encode_{kind}", self._counted(kind, getattr(tower, f"encode_{kind}")))

    def _counted(self, kind: str, encode):  # noqa: ANN001, ANN202
        def counted(x: torch.Tensor) -> torch.Tensor:
            self.tower_calls.append((kind, len(x)))
            return encode(x)

        return counted

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    @property
    def depth(self) -> int:
        return self.inner.depth

    async def encode(self, store: Store, kind: Kind, query: Query) -> torch.Tensor:
        self.calls.append(1)
        return await self.inner.encode(store, kind, query)

    async def encode_many(self, queries: Sequence[tuple[Store, Kind, Query]]) -> list[torch.Tensor]:
        self.calls.append(len(queries))
        return await self.inner.encode_many(queries)

    def reset(self) -> None:
        self.calls.clear()
        self.tower_calls.clear()


@pytest.fixture(scope="module")
def counted(synth_store: Path):
    catalog = Catalog([synth_store], lambda info: load_search_model(info.manifest, None))
    encoder = CountingEncoder(catalog)
    with TestClient(create_app(catalog, encoder=encoder)) as client:
        yield client, encoder


def same_answers(batch: list[dict], singles: list[dict]) -> None:
    for got, want in zip(batch, singles, strict=True):
        assert {k: got[k] for k in ("store", "mode", "k")} == {k: want[k] for k in ("store", "mode", "k")}
        assert [h["id"] for h in got["hits"]] == [h["id"] for h in want["hits"]]
        assert [h["score"] for h in got["hits"]] == pytest.approx([h["score"] for h in want["hits"]], abs=1e-5)
        assert [{k: v for k, v in h.items() if k != "score"} for h in got["hits"]] == \
            [{k: v for k, v in h.items() if k != "score"} for h in want["hits"]]
        assert set(got["took_ms"]) == {"encode", "score", "total"}


def test_a_batch_of_texts_is_one_encoder_call_and_answers_as_single_searches(counted) -> None:  # noqa: ANN001
    client, encoder = counted
    texts = ["an airport", "a harbor", "a forest", "a river", "an airport"]
    modes = ["fused", "global", "max-response", "fused", "max-response"]
    queries = [{"text": t, "mode": m, "k": 2 + i % 3} for i, (t, m) in enumerate(zip(texts, modes, strict=True))]
    encoder.reset()
    response = client.post("/search/batch", json={"queries": queries})
    assert response.status_code == 200, response.text
    assert encoder.calls == [5] and encoder.tower_calls == [("text", 5)]
    singles = [client.post("/search", json=q).json() for q in queries]
    assert encoder.calls[1:] == [1] * 5  # each single search: one query per call
    same_answers(response.json()["results"], singles)
    assert [len(r["hits"]) for r in singles] == [2, 3, 4, 2, 3]


def test_mixed_batch_one_encoder_call_one_tower_call_per_kind(counted, synth: Path) -> None:  # noqa: ANN001
    client, encoder = counted
    png = base64.b64encode(sorted((synth / "images").glob("*.png"))[0].read_bytes()).decode()
    first = client.post("/search", json={"text": "a harbor", "k": 1}).json()["hits"][0]["id"]
    dim = client.app.state.catalog.get(None).info.dim
    queries = [{"text": "a harbor", "k": 3}, {"image": png, "k": 2, "mode": "global"}, {"item_id": first, "k": 4},
               {"embedding": [1.0] + [0.0] * (dim - 1), "k": 3, "mode": "max-response"},
               {"text": "an airport", "k": 3}]
    encoder.reset()
    response = client.post("/search/batch", json={"queries": queries})
    assert response.status_code == 200, response.text
    assert encoder.calls == [3]  # the item and the embedding need no encoding
    assert sorted(encoder.tower_calls) == [("image", 1), ("text", 2)]
    same_answers(response.json()["results"], [client.post("/search", json=q).json() for q in queries])


def test_a_batch_fails_with_its_first_bad_query(counted) -> None:  # noqa: ANN001
    client, encoder = counted
    encoder.reset()
    queries = [{"text": "a harbor"}, {"item_id": "nope"}, {"text": "x", "store": "other"}]
    response = client.post("/search/batch", json={"queries": queries})
    assert response.status_code == 404 and response.json()["detail"] == "item_id: no item 'nope' in store 's'"
    assert encoder.calls == []  # refused before anything was encoded


def test_the_page_offers_the_modes_the_api_takes() -> None:
    html = (STATIC / "index.html").read_text()
    select = re.search(r'<select id="mode"[^>]*>(.*?)</select>', html, re.S)
    assert select is not None
    assert tuple(re.findall(r'<option value="([^"]+)"', select.group(1))) == MODES
