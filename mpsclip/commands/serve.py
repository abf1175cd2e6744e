"""Serve one or more stores over HTTP: a JSON search API, the search page at /, OpenAPI at /docs.

Text and image queries are encoded with each store's model (the checkpoint its manifest names, or
--checkpoint), batched dynamically (--no-batching: one query at a time); scores come from the stores held in
memory once. POST /admin/reload reads the stores again (a store being extended by 'mpsclip embed' is served
from its last complete manifest). The server binds 127.0.0.1 unless --host says otherwise.

example:
  mpsclip serve archive.store
  mpsclip serve a.store b.store --port 8080
  MPSCLIP_API_KEY=secret mpsclip serve archive.store --host 0.0.0.0 --cors https://maps.example.org
  curl -s localhost:8000/search -H 'content-type: application/json' -d '{"text": "an airport", "k": 5}'
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mpsclip.commands._args import add_checkpoint, add_device

HELP = "serve stores over HTTP (search API + web page)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stores", type=Path, nargs="+", metavar="STORE", help="store folders made by 'mpsclip embed'")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    add_checkpoint(parser, "model for text/image queries (default: each store's)")
    add_device(parser)
    parser.add_argument("--no-batching", action="store_true", help="encode one query at a time")
    parser.add_argument("--max-batch", type=int, default=32, help="largest encoder batch (default: 32)")
    parser.add_argument("--max-queue", type=int, default=256, help="queued queries before 503 (default: 256)")
    parser.add_argument("--api-key", default=os.environ.get("MPSCLIP_API_KEY"), metavar="KEY",
                        help="require KEY (header 'Authorization: Bearer KEY' or 'X-API-Key'; browser: /?key=KEY) "
                        "everywhere but /healthz and /readyz (default: $MPSCLIP_API_KEY; the variable keeps the "
                        "key out of the process list)")
    parser.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                        help="allow browser pages of ORIGIN (e.g. https://maps.example.org) to call the API; "
                        "repeatable (default: CORS off)")
    parser.add_argument("--max-body-mib", type=float, default=12.0, metavar="MIB",
                        help="largest request body; bigger ones get 413 (default: 12)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from mpsclip.archive.search import load_search_model
    from mpsclip.devices import resolve_device
    from mpsclip.serve.app import create_app
    from mpsclip.serve.auth import bind_warning
    from mpsclip.serve.catalog import Catalog

    device = resolve_device(args.device)
    catalog = Catalog(args.stores, lambda info: load_search_model(info.manifest, args.checkpoint, device))
    app = create_app(catalog, batching=not args.no_batching, max_batch=args.max_batch, max_queue=args.max_queue,
                     api_key=args.api_key, cors=args.cors, max_body_bytes=int(args.max_body_mib * 2**20))
    if (warning := bind_warning(args.host, args.api_key)) is not None:
        print(warning, file=sys.stderr)
    print(f"serving {', '.join(catalog.stores)} at http://{args.host}:{args.port}/ (API docs: /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
