"""The stores a server answers for, each read into memory once: fp16 views per mode, ids, metas, its model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpsclip.archive.search import BBox, footprint, intersects, mode_views, scored_topk
from mpsclip.archive.store import StoreInfo, open_store, read_shard
from mpsclip.errors import MPSCLIPError

COLUMNS = ["id", "meta", "retrieval", "global", "perspectives", "valid"]


@dataclass
class Store:
    """One store held in memory: every shard read once; queries score against these tensors only."""

    name: str
    info: StoreInfo
    ids: list[str]
    metas: list[dict[str, Any]]
    columns: dict[str, np.ndarray]
    row_of: dict[str, int] = field(default_factory=dict)
    model: Any = None
    cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def views(self, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mode's views as fp32, converted once (CPU fp16 matrix products are many times slower)."""
        if mode not in self.cache:
            views, valid = mode_views(self.columns, mode)
            self.cache[mode] = views.float(), valid
        return self.cache[mode]

    def topk(
        self, queries: torch.Tensor, k: int, mode: str, bbox: BBox | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact ``(scores [Q, k], rows [Q, k])``, padding row -1, as :func:`mpsclip.archive.search.exact_topk`."""
        views, valid = self.views(mode)
        rows = torch.arange(len(self.ids))
        if bbox is not None:
            keep = torch.tensor(
                [i for i, m in enumerate(self.metas) if (fp := footprint(m)) is not None and intersects(fp, bbox)],
                dtype=torch.int64,
            )
            views, rows = views[keep], rows[keep]
            valid = valid[keep] if valid is not None else None
        if len(rows) == 0:
            empty = torch.full((queries.shape[0], k), -1, dtype=torch.int64)
            return torch.full((queries.shape[0], k), float("-inf")), empty
        if views.shape[1] == 1 and valid is None:  # fused/global: one matrix product
            scores = queries.float() @ views[:, 0].T
            top_s, top_i = torch.topk(scores, min(k, len(rows)), dim=1)
            return top_s, rows[top_i]
        return scored_topk(queries.float(), views, valid, rows, min(k, len(rows)))


def load_store_memory(name: str, path: Path) -> Store:
    """Read every shard of the store at ``path`` once."""
    info = open_store(path)
    parts = [read_shard(info, s, COLUMNS) for s in range(len(info.shard_rows))]
    columns = {c: np.concatenate([p[c] for p in parts]) for c in COLUMNS if c not in ("id", "meta")}
    ids = [str(i) for p in parts for i in p["id"]]
    metas = [json.loads(m) for p in parts for m in p["meta"]]
    return Store(name, info, ids, metas, columns, {item_id: row for row, item_id in enumerate(ids)})


def store_names(paths: list[Path]) -> list[str]:
    """Folder names, with ``-2``, ``-3``... added to repeated ones."""
    names: list[str] = []
    for path in paths:
        base, name, n = path.resolve().name, path.resolve().name, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


class Catalog:
    """The served stores by name; the first is the default."""

    def __init__(self, paths: list[Path], model_loader: Any = None) -> None:
        if not paths:
            raise MPSCLIPError("no store to serve: give one or more store folders made by 'mpsclip embed'")
        self.paths = paths
        self.model_loader = model_loader
        self.stores: dict[str, Store] = {}
        self.reload()

    def reload(self) -> None:
        """Read every store again (a store mid-'embed' keeps its last complete manifest's shards)."""
        stores = {}
        for name, path in zip(store_names(self.paths), self.paths, strict=True):
            store = load_store_memory(name, path)
            old = self.stores.get(name)
            digest = store.info.manifest["checkpoint_sha256"]
            same = old is not None and old.info.manifest["checkpoint_sha256"] == digest
            store.model = old.model if same else (self.model_loader(store.info) if self.model_loader else None)
            stores[name] = store
        self.stores = stores

    @property
    def default(self) -> str:
        return next(iter(self.stores))

    def get(self, name: str | None) -> Store:
        name = name or self.default
        if name not in self.stores:
            raise KeyError(f"store: unknown store {name!r}; served: {', '.join(self.stores)}")
        return self.stores[name]
