"""What the API's handlers are given (FastAPI dependencies): the served :class:`~mpsclip.serve.catalog.Catalog`,
the query encoder and the scene lists, all held on ``app.state`` by :func:`mpsclip.serve.app.create_app`; and
the helpers every handler shares (a store by name, error text without this machine's paths)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from mpsclip.serve.catalog import Catalog, Store
from mpsclip.serve.encoders import QueryEncoder
from mpsclip.serve.queries import bad
from mpsclip.serve.quicklook import SceneCatalog
from mpsclip.serve.redact import public_message, roots_of


# async: FastAPI runs a plain function dependency in a worker thread, a needless hop for reading app.state.
async def catalog_of(request: Request) -> Catalog:
    return request.app.state.catalog


async def encoder_of(request: Request) -> QueryEncoder:
    return request.app.state.encoder


async def scenes_of(request: Request) -> SceneCatalog:
    return request.app.state.scenes


CatalogDep = Annotated[Catalog, Depends(catalog_of)]
EncoderDep = Annotated[QueryEncoder, Depends(encoder_of)]
ScenesDep = Annotated[SceneCatalog, Depends(scenes_of)]


def store_named(catalog: Catalog, name: str | None) -> Store:
    """The store called ``name`` (None: the default one); 404 naming the served ones."""
    try:
        return catalog.get(name)
    except KeyError as err:
        raise bad(str(err.args[0]), 404) from err


def item_row(store: Store, item_id: str) -> int:
    """``item_id``'s row in ``store``; 404 naming both."""
    row = store.row_of.get(item_id)
    if row is None:
        raise bad(f"item_id: no item {item_id!r} in store {store.name!r}", 404)
    return row


def public(catalog: Catalog, text: str) -> str:
    """``text`` without this machine's absolute paths (each store's files named relative to it)."""
    roots = roots_of(
        pair for s in catalog.stores.values()
        for pair in ((s.info.manifest.get("source_root"), "the store's source folder"),
                     (s.info.path, f"store {s.name!r}"))
    )
    return public_message(text, roots)
