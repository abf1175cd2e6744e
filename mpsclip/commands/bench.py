"""Latency and throughput of every engine: engine × tower × batch size × precision, next to plain open_clip.

For each checkpoint, each engine is loaded (exported engines from --engine-dir KIND=DIR, or exported now into
a temporary folder, one tower per process) and checked against the torch eager fp32 model before anything is
timed: an engine whose embeddings fall below the cosine gate fails the run. An engine that cannot run here is
listed with the reason. Each cell reports its first call alone (compile, capture, session start-up), then
p50/p90/p99 latency and items/s over --repeats rounds on rotating inputs (CUDA events on a GPU, perf_counter_ns
on a CPU). A round calls every engine of one tower, batch and precision once, plain open_clip of the same
architecture too, so each row's ratio to plain (plain p50 / row p50: above 1 is faster than plain) compares
calls made moments apart. The time the timing will take is printed before it starts. Writes
OUT/results.json, OUT/results.md, OUT/latency.png, OUT/throughput.png and OUT/ratios.png.

examples:
  # random-weight checkpoints to try it on, then every engine this CPU has, both towers, batches 1 and 8
  python -m mpsclip.bench.checkpoints --arch MPS-Tiny --arch ViT-B-32-quickgelu --out ckpts
  mpsclip bench --checkpoint ckpts/MPS-Tiny.safetensors --checkpoint ckpts/ViT-B-32-quickgelu.safetensors \\
      --engines torch,optimized,onnxruntime,aoti --batch-sizes 1,8 --duration 120 --out bench-out

  # a GPU, fp16, at most ~2 minutes of timed rounds
  mpsclip bench --checkpoint a.safetensors --device cuda --precision fp16 --batch-sizes 1,8,64,256 \\
      --duration 120 --out bench-gpu

  # an existing export folder instead of exporting on the fly
  mpsclip bench --checkpoint m.safetensors --engines torch,onnxruntime --engine-dir onnxruntime=exports/onnx --out b

  # two runs side by side
  mpsclip bench --compare before/results.json after/results.json --out compare

  # the archive embedding path and search (see mpsclip bench archive --help, mpsclip bench search --help)
  mpsclip bench archive tiles/ --checkpoint m.safetensors --workers 0,2 --out bench-archive
  mpsclip bench search store/ --nprobe 1,4,16 --out bench-search
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpsclip.choices import ENGINES, MODES, PERSPECTIVES, PRECISIONS, RUNTIMES
from mpsclip.commands._args import add_checkpoint, add_device, add_out, add_quiet, add_trust_checkpoint

HELP = "benchmark engines (latency, throughput, ratio to plain open_clip), archive embedding and search"
REPEATS, REPEATS_WITH_DURATION = 10, 1000

ARCHIVE_HELP = """The archive embedding path next to the image tower alone, on this machine.

For each --perspectives x --decode x --workers setting, SOURCE (anything 'mpsclip embed' reads) is embedded
into a fresh temporary store after one warm-up shard (compilation and worker start-up are not timed), and
its items/s is set next to the image tower's own items/s on a resident batch of --batch. --synthetic N writes
N synthetic JPEG tiles instead of reading a SOURCE. --engine, --engine-dir and --precision choose the image
engine as for 'mpsclip embed'; several --engine-dir folders (an int8 and an fp32 export, say) or several
--precision values for torch are measured in turns, each row set against the first engine's. Writes
OUT/results.json, OUT/results.md and OUT/throughput.png.

examples:
  mpsclip synth --out synth --train 0 --test 64
  mpsclip bench archive synth/images --checkpoint m.safetensors --batch 16 --workers 0,2 --device cpu --out b
  mpsclip bench archive --synthetic 131072 --checkpoint m.safetensors --batch 512 --out bench-gpu-archive
  # int8 against fp32 ONNX Runtime towers on the same tiles (folders from mpsclip export --format onnx)
  mpsclip bench archive synth/images --checkpoint m.safetensors --engine onnxruntime --engine-dir fp32/ \\
      --engine-dir q8/ --precision fp32,int8 --workers 0 --perspectives none --device cpu --out b-int8
"""

SEARCH_HELP = """Search latency and recall@10 on a store: exact streamed, in memory, and FAISS at several nprobe.

Queries are a seeded sample of --queries of the store's own global embeddings (their exact top-10 is the
reference). Exact streamed search reads the shards as 'mpsclip search --exact' does; in memory, the store
is loaded once (as fp32) and scored by one product per query batch; each --faiss index is built in a scratch
copy of the store (links to its shards: STORE itself is not changed), then searched at each --nprobe,
candidates re-ranked exactly. --synthetic ROWS searches a synthetic store of clustered vectors instead. Writes
OUT/results.json, OUT/results.md and OUT/recall_latency.png.

examples:
  mpsclip bench search store/ --out bench-search
  mpsclip bench search store/ --faiss Flat --faiss IVF64,Flat --nprobe 1,4,16 --queries 50 --out b
  mpsclip bench search --synthetic 100000 --out bench-search-100k
"""


def _list(kind: type, choices: tuple[str, ...] | None = None):  # noqa: ANN202
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(",") if v)
        except ValueError:
            values = ()
        bad = [v for v in values if choices is not None and v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma list of {', '.join(choices or ('numbers',))}")
        return values

    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False  # else `bench archive --engine` reads as an ambiguous --engines/--engine-dir
    sub = parser.add_subparsers(dest="subverb", metavar="[archive|search]", required=False)
    configure_archive(sub.add_parser("archive", help="archive embedding throughput", description=ARCHIVE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    configure_search(sub.add_parser("search", help="search latency and recall", description=SEARCH_HELP,
                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--checkpoint", type=Path, action="append", default=None, metavar="CHECKPOINT",
                        help="checkpoint to benchmark (repeat for several)")
    add_trust_checkpoint(parser)
    parser.add_argument("--engines", type=_list(str, ENGINES), default=("torch", "optimized", "onnxruntime", "aoti"),
                        help=f"comma list of {', '.join(ENGINES)} (default: torch,optimized,onnxruntime,aoti)")
    parser.add_argument("--towers", type=_list(str, ("image", "text")), default=("image", "text"),
                        help="comma list of image,text (default: both)")
    parser.add_argument("--batch-sizes", type=_list(int), default=(1, 8), help="comma list (default: 1,8)")
    parser.add_argument("--precision", type=_list(str, PRECISIONS), default=("fp32",),
                        help=f"comma list of {', '.join(PRECISIONS)} (default: fp32)")
    parser.add_argument("--baseline", choices=("plain", "none"), default="plain",
                        help="plain: time open_clip of the same arch in the same run (default)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed rounds per tower x batch x precision (default: {REPEATS}; with --duration, "
                             f"the most, default {REPEATS_WITH_DURATION})")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed calls per cell after its first, the probe included (default: 2)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds for all timed rounds, warm-up calls aside: each group of cells gets its share "
                             "(at least 3 rounds, at most --repeats)")
    parser.add_argument("--engine-dir", action="append", default=[], metavar="KIND[:PRECISION]=DIR",
                        help="an mpsclip export folder for engine KIND (onnxruntime, aoti, tensorrt), for one "
                        "PRECISION only if given (onnxruntime:int8=q8/ beside onnxruntime:fp32=fp32/)")
    parser.add_argument("--build-workers", type=int, default=None, metavar="N",
                        help="processes exporting towers on the fly (default: one per CPU core)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                        help="render two results.json side by side (OUT/compare.md) instead of measuring")
    parser.add_argument("--note", default=None, help="a line for results.md (e.g. what else ran on the machine)")
    add_out(parser, "output folder", metavar="DIR")
    add_device(parser, "where engines run")
    add_quiet(parser)


def configure_archive(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", default=None, metavar="SOURCE",
                        help="folder, .txt list, .tar shard or brace pattern, as for mpsclip embed")
    parser.add_argument("--synthetic", type=int, default=None, metavar="N", help="N synthetic JPEG tiles instead")
    parser.add_argument("--tile", type=int, default=256, help="--synthetic tile side in px (default: 256)")
    add_checkpoint(parser, required=True)
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--shard-size", type=int, default=1024, help="items per store shard (default: 1024)")
    parser.add_argument("--workers", type=_list(int), default=(0, 2),
                        help="comma list of reading worker counts (default: 0,2)")
    parser.add_argument("--decode", type=_list(str, ("cpu", "device")), default=None,
                        help="comma list of cpu,device (default: cpu, and device on a GPU)")
    parser.add_argument("--perspectives", type=_list(str, tuple(p for p in PERSPECTIVES if p != "from-dir")),
                        default=("none", "zero-shot"), help="comma list of none,zero-shot (default: both)")
    parser.add_argument("--model-repeats", type=int, default=20,
                        help="timed calls of the image tower alone (default: 20)")
    parser.add_argument("--engine", choices=RUNTIMES, default="torch", metavar="KIND", dest="archive_engine",
                        help=f"image-tower engine, as for mpsclip embed: {', '.join(RUNTIMES)} (default: torch)")
    parser.add_argument("--engine-dir", type=Path, action="append", default=None, metavar="DIR",
                        dest="archive_engine_dirs", help="an 'mpsclip export' folder for --engine; repeat it to "
                        "measure several (an int8 and an fp32 export)")
    parser.add_argument("--precision", type=_list(str, PRECISIONS), default=None, dest="archive_precisions",
                        help="comma list of the precisions to measure (default: the engine's own, or each folder's)")
    parser.add_argument("--note", default=None, help="a line for results.md (e.g. how SOURCE was made)")
    add_out(parser, "output folder", metavar="DIR")
    add_device(parser, "where the model runs")
    add_quiet(parser)


def configure_search(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", nargs="?", type=Path, default=None, metavar="STORE",
                        help="a complete store made by mpsclip embed (read only)")
    parser.add_argument("--synthetic", type=int, default=None, metavar="ROWS",
                        help="a synthetic store of ROWS clustered vectors instead (--dim, --views, --shard-size)")
    parser.add_argument("--dim", type=int, default=512, help="--synthetic: embedding width (default: 512)")
    parser.add_argument("--views", type=int, default=2, help="--synthetic: perspectives per item (default: 2)")
    parser.add_argument("--shard-size", type=int, default=1024, help="--synthetic: items per shard (default: 1024)")
    parser.add_argument("--queries", type=int, default=100, help="queries (default: 100)")
    parser.add_argument("--faiss", action="append", default=None, metavar="FACTORY",
                        help="FAISS factory string, repeat for several (default: what mpsclip index picks)")
    parser.add_argument("--nprobe", type=_list(int), default=(1, 4, 16, 64),
                        help="comma list of nprobe for inverted-list indexes (default: 1,4,16,64, up to nlist)")
    parser.add_argument("--modes", type=_list(str, MODES), default=("fused",
                        "max-response"), help="comma list of fused,global,max-response (default: fused,max-response)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--note", default=None, help="a line for results.md (e.g. how STORE was made)")
    add_out(parser, "output folder", metavar="DIR")
    add_quiet(parser)


def _engine_dirs(values: list[str]) -> dict[str, str]:
    from mpsclip.engines import EXPORTED
    from mpsclip.errors import MPSCLIPError

    out = {}
    for value in values:
        key, sep, folder = value.partition("=")
        kind, colon, precision = key.partition(":")
        if not sep or kind not in EXPORTED or (colon and precision not in PRECISIONS):
            raise MPSCLIPError(f"--engine-dir {value!r}: write KIND=DIR or KIND:PRECISION=DIR with KIND one of "
                               f"{', '.join(EXPORTED)} and PRECISION one of {', '.join(PRECISIONS)}")
        out[key] = folder
    return out


def _require_out(args: argparse.Namespace, what: str) -> Path:
    from mpsclip.errors import MPSCLIPError

    if args.out is None:
        raise MPSCLIPError(f"--out DIR is required: the folder for {what}")
    return Path(args.out)


def _one_input(args: argparse.Namespace, name: str) -> None:
    from mpsclip.errors import MPSCLIPError

    given = getattr(args, name)
    if (given is None) == (args.synthetic is None):
        raise MPSCLIPError(f"give {name.upper()} or --synthetic N (one of them): what to benchmark")


def run(args: argparse.Namespace) -> int:
    from mpsclip.errors import MPSCLIPError

    if args.subverb == "archive":
        from mpsclip.bench.archive import ArchiveSettings, bench_archive

        _one_input(args, "source")
        out = _require_out(args, "results.json, results.md and throughput.png")
        settings = ArchiveSettings(
            source=args.source, synthetic=args.synthetic, tile=args.tile, checkpoint=args.checkpoint,
            batch=args.batch, shard_size=args.shard_size, workers=args.workers, decode=args.decode,
            perspectives=args.perspectives, model_repeats=args.model_repeats, device=args.device,
            engine=args.archive_engine, engine_dirs=tuple(args.archive_engine_dirs or ()),
            precisions=args.archive_precisions,
        )
        bench_archive(settings, out, progress=not args.quiet, note=args.note)
        return 0
    if args.subverb == "search":
        from mpsclip.bench.search import SearchSettings, bench_search

        _one_input(args, "store")
        out = _require_out(args, "results.json, results.md and recall_latency.png")
        settings = SearchSettings(
            store=args.store, synthetic=args.synthetic, dim=args.dim, views=args.views, shard_size=args.shard_size,
            queries=args.queries, factories=tuple(args.faiss or (None,)), nprobes=args.nprobe, modes=args.modes,
            seed=args.seed,
        )
        bench_search(settings, out, progress=not args.quiet, note=args.note)
        return 0
    out = _require_out(args, "results.json, results.md and the plots")
    if args.compare:
        from mpsclip.bench.report import compare, read_results
        from mpsclip.io import atomic_write

        text = compare(read_results(args.compare[0]), read_results(args.compare[1]),
                       (args.compare[0].parent.name or "A", args.compare[1].parent.name or "B"))
        atomic_write(out / "compare.md", text)
        print(text, end="")
        return 0
    if not args.checkpoint:
        raise MPSCLIPError("--checkpoint is required (repeat it for several), or use --compare A.json B.json")
    repeats = args.repeats or (REPEATS if args.duration is None else REPEATS_WITH_DURATION)
    if repeats < 2:
        raise MPSCLIPError(f"--repeats {repeats}: time at least 2 rounds")
    if args.duration is not None and args.duration <= 0:
        raise MPSCLIPError(f"--duration {args.duration}: give the seconds the timed rounds may take, above 0")
    from mpsclip.bench.engines import GridSettings
    from mpsclip.bench.run import bench

    settings = GridSettings(
        engines=args.engines, towers=args.towers, batch_sizes=args.batch_sizes, precisions=args.precision,
        device=args.device, baseline=None if args.baseline == "none" else "plain", repeats=repeats,
        warmup=args.warmup, duration=args.duration, engine_dirs=_engine_dirs(args.engine_dir),
        build_workers=args.build_workers,
    )
    bench(args.checkpoint, settings, out, progress=not args.quiet, note=args.note)
    return 0
