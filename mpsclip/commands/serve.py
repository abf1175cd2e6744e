"""Serve one or more stores over HTTP: a JSON search API, the search page at /, OpenAPI at /docs.

Text and image queries are encoded with each store's model (the checkpoint its manifest names, or
--checkpoint), batched dynamically (--no-batching: one query at a time); scores come from the stores held in
memory once. The towers run on a Triton Inference Server (PyTriton's bundled binary, --triton, the default
where it can run), also open to any Triton/KServe client on 127.0.0.1 (HTTP and gRPC ports printed at start);
--no-triton runs them in this process. --engine picks what runs them (onnxruntime/tensorrt/aoti: an 'mpsclip
export' folder of the same checkpoint, --engine-dir). Ctrl-C/SIGTERM drains in-flight requests and stops all.
Every --reload-every seconds (and on POST /admin/reload) the stores' files are checked and a changed store is
swapped in once read whole: a store being extended by 'mpsclip embed' serves its finished shards; a failed
reload keeps the last good version (GET /stores reports it). The server binds 127.0.0.1 unless --host says so,
answers only requests naming it in their Host header (--allowed-host adds names) and refuses requests that change
state (POST /admin/reload) sent by a page of another site. It says "serving" (and /readyz answers 200) once the
towers answered a real query.
Scoring is the one of 'mpsclip search': a store with an index ('mpsclip index') answers through it (bbox
queries aside), read once per store version; --exact scores every query exactly. On a GPU (--device cuda) the
stores' views are held there and scored by the max-over-views top-k kernel.

example:
  mpsclip serve archive.store
  mpsclip serve a.store b.store --port 8080
  mpsclip serve archive.store --no-triton --engine onnxruntime --engine-dir exported/onnx
  MPSCLIP_API_KEY=secret mpsclip serve archive.store --host 0.0.0.0 --cors https://maps.example.org
  mpsclip serve /mnt/copy/tiles.store --source-root /mnt/copy/tiles
  mpsclip serve big.store --device cuda --exact       # exhaustive on the GPU although big.store has an index
  curl -s localhost:8000/search -H 'content-type: application/json' -d '{"text": "an airport", "k": 5}'
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from mpsclip.choices import PRECISIONS, SERVE_ENGINES
from mpsclip.commands._args import add_checkpoint, add_device
from mpsclip.triton_config import MAX_BATCH_SIZE, QUEUE_DELAY_US

HELP = "serve stores over HTTP (search API + web page)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stores", type=Path, nargs="+", metavar="STORE", help="store folders made by 'mpsclip embed'")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    add_checkpoint(parser, "model for text/image queries (default: each store's)")
    add_device(parser)
    parser.add_argument("--no-batching", action="store_true", help="encode one query at a time")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH_SIZE,
                        help=f"largest encoder batch (default: {MAX_BATCH_SIZE})")
    parser.add_argument("--max-queue", type=int, default=256, help="queued queries before 503 (default: 256)")
    parser.add_argument("--triton", action=argparse.BooleanOptionalAction, default=None,
                        help="run the towers on Triton Inference Server (default: yes where its binary can run)")
    parser.add_argument("--engine", choices=SERVE_ENGINES, default="torch",
                        help="what runs the towers (default: torch; the fast runtime on a GPU)")
    parser.add_argument("--engine-dir", type=Path, metavar="DIR",
                        help="'mpsclip export' folder for --engine (aoti/tensorrt files are code: trusted ones only)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="the towers' precision (default: the engine's own; int8: an int8 export in --engine-dir)")
    parser.add_argument("--triton-http-port", type=int, metavar="PORT", help="Triton HTTP port (default: --port + 1)")
    parser.add_argument("--triton-grpc-port", type=int, metavar="PORT", help="Triton gRPC port (default: --port + 2)")
    parser.add_argument("--triton-metrics-port", type=int, metavar="PORT",
                        help="Triton Prometheus port (default: --port + 3)")
    parser.add_argument("--triton-queue-delay-us", type=int, metavar="US",
                        help="Triton dynamic batching: longest wait for more requests (default: "
                        f"{QUEUE_DELAY_US}, measured in bench/results/serve-load.md)")
    parser.add_argument("--api-key", default=os.environ.get("MPSCLIP_API_KEY") or None, metavar="KEY",
                        help="require KEY (header 'Authorization: Bearer KEY' or 'X-API-Key'; browser: /?key=KEY) "
                        "everywhere but /healthz and /readyz (default: $MPSCLIP_API_KEY; the variable keeps the "
                        "key out of the process list)")
    parser.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                        help="allow browser pages of ORIGIN (e.g. https://maps.example.org) to call the API; "
                        "repeatable (default: CORS off)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="also answer requests whose Host header is NAME (e.g. the server's DNS name behind a "
                        "proxy); repeatable; '*' answers any (default: 127.0.0.1, localhost, ::1 and --host; with "
                        "--host 0.0.0.0 also any IP address and this machine's names). Other Hosts get 400: a web "
                        "page cannot reach the server by DNS rebinding")
    parser.add_argument("--max-body-mib", type=float, default=12.0, metavar="MIB",
                        help="largest request body; bigger ones get 413 (default: 12)")
    parser.add_argument("--source-root", type=Path, action="append", metavar="DIR",
                        help="where a STORE's embedded source folder is now, when the store or its images moved "
                        "(thumbnails and quicklooks are read from it); once per STORE, in the same order")
    parser.add_argument("--exact", action="store_true",
                        help="score every query exactly, even on stores with an index from 'mpsclip index' "
                        "(as 'mpsclip search --exact'; default: through the index where there is one)")
    parser.add_argument("--reload-every", type=float, default=5.0, metavar="S",
                        help="check the stores' manifests and shards every S seconds and serve what changed "
                        "(0: only on POST /admin/reload; default: 5)")


def run(args: argparse.Namespace) -> int:
    from mpsclip.archive.search import load_search_model
    from mpsclip.devices import resolve_device
    from mpsclip.serve.app import create_app
    from mpsclip.serve.auth import bind_warning
    from mpsclip.serve.catalog import Catalog
    from mpsclip.serve.guard import EVERY_INTERFACE, allowed_hosts
    from mpsclip.serve.server import ServerSettings, serve
    from mpsclip.serve.towers import TowerSet
    from mpsclip.serve.triton import triton_availability

    device = resolve_device(args.device)
    catalog = Catalog(args.stores, lambda info: load_search_model(info.manifest, args.checkpoint, device),
                      source_roots=args.source_root, device=device, exact=args.exact)
    use_triton = args.triton
    if use_triton is None:
        reason = triton_availability()
        use_triton = reason is None
        if reason is not None:
            print(f"running the towers in-process (--no-triton): {reason}", file=sys.stderr)
    settings = ServerSettings(
        host=args.host, port=args.port, triton=use_triton, triton_http_port=args.triton_http_port,
        triton_grpc_port=args.triton_grpc_port, triton_metrics_port=args.triton_metrics_port,
        batching=not args.no_batching, max_batch=args.max_batch, max_queue=args.max_queue,
    )
    if args.triton_queue_delay_us is not None:
        settings = dataclasses.replace(settings, queue_delay_us=args.triton_queue_delay_us)

    hosts = allowed_hosts(args.host, args.allowed_host)

    def make_app(encoder):  # noqa: ANN001, ANN202 - the encoder serve() chose
        return create_app(catalog, batching=not args.no_batching, max_batch=args.max_batch,
                          max_queue=args.max_queue, api_key=args.api_key, cors=args.cors,
                          max_body_bytes=int(args.max_body_mib * 2**20), encoder=encoder,
                          reload_every_s=args.reload_every, allowed_hosts=sorted(hosts),
                          any_ip_host=args.host in EVERY_INTERFACE)

    if (warning := bind_warning(args.host, args.api_key)) is not None:
        print(warning, file=sys.stderr)
    return serve(catalog, TowerSet(args.engine, args.engine_dir, device, args.precision), settings, make_app)
