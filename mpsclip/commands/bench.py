"""Latency and throughput of every engine: engine × tower × batch size × precision, next to plain open_clip.

For each checkpoint, each engine is loaded (exported engines from --engine-dir KIND=DIR, or exported now into
a temporary folder) and checked against the torch eager fp32 model before anything is timed: an engine whose
embeddings fall below the cosine gate fails the run. An engine that cannot run here is listed with the reason.
Each cell reports the first call alone (compile, capture, session start-up), then p50/p90/p99 latency and
items/s over --repeats calls on rotating inputs (CUDA events on a GPU, perf_counter_ns on a CPU), and its
ratio to plain open_clip of the same architecture timed in the same run (plain p50 / row p50: above 1 is
faster than plain). Writes OUT/results.json, OUT/results.md, OUT/latency.png, OUT/throughput.png and
OUT/ratios.png.

examples:
  # every engine this machine has, both towers, batches 1 and 8
  mpsclip bench --checkpoint runs/tiny/model.safetensors --engines torch,optimized,onnxruntime,aoti \\
      --batch-sizes 1,8 --repeats 10 --out bench-out

  # two checkpoints in one run, a GPU, fp16, at most ~2 minutes of timed calls
  mpsclip bench --checkpoint a.safetensors --checkpoint b.safetensors --device cuda --precision fp16 \\
      --batch-sizes 1,8,64,256 --duration 120 --out bench-gpu

  # an existing export folder instead of exporting on the fly
  mpsclip bench --checkpoint m.safetensors --engines torch,onnxruntime --engine-dir onnxruntime=exports/onnx --out b

  # two runs side by side
  mpsclip bench --compare before/results.json after/results.json --out compare

  # the archive embedding path and search (sub-verbs; see mpsclip bench archive --help)
  mpsclip bench archive --images 256 --batch 32 --device cpu --out bench-archive
  mpsclip bench search --rows 20000 --out bench-search
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from mpsclip.choices import ENGINES, PRECISIONS
from mpsclip.commands._args import add_device, add_out, add_quiet

HELP = "benchmark engines (latency, throughput, ratio to plain open_clip), archive embedding and search"
SUBVERBS = {"archive": "mpsclip.bench.archive", "search": "mpsclip.bench.search"}


def _list(kind: type, choices: tuple[str, ...] | None = None):  # noqa: ANN202
    def parse(text: str) -> tuple:
        values = tuple(kind(v) for v in text.split(",") if v)
        bad = [v for v in values if choices is not None and v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma list of {', '.join(choices or ('numbers',))}")
        return values

    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="subverb", metavar="[archive|search]", required=False)
    for name, module in SUBVERBS.items():  # options after the sub-verb go to the module (imported only then)
        p = sub.add_parser(name, help=f"python -m {module}: see mpsclip bench {name} --help", prefix_chars="+",
                           add_help=False)
        p.add_argument("rest", nargs="*")
    parser.add_argument("--checkpoint", type=Path, action="append", default=None, metavar="CHECKPOINT",
                        help="checkpoint to benchmark (repeat for several)")
    parser.add_argument("--engines", type=_list(str, ENGINES), default=("torch", "optimized", "onnxruntime", "aoti"),
                        help=f"comma list of {', '.join(ENGINES)} (default: torch,optimized,onnxruntime,aoti)")
    parser.add_argument("--towers", type=_list(str, ("image", "text")), default=("image", "text"),
                        help="comma list of image,text (default: both)")
    parser.add_argument("--batch-sizes", type=_list(int), default=(1, 8), help="comma list (default: 1,8)")
    parser.add_argument("--precision", type=_list(str, PRECISIONS), default=("fp32",),
                        help=f"comma list of {', '.join(PRECISIONS)} (default: fp32)")
    parser.add_argument("--baseline", choices=("plain", "none"), default="plain",
                        help="plain: time open_clip of the same arch in the same run (default)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per cell (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per cell after the first (default: 2)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds for all timed calls: each cell's repeats are cut to its share")
    parser.add_argument("--engine-dir", action="append", default=[], metavar="KIND=DIR",
                        help="an mpsclip export folder for engine KIND (onnxruntime, aoti, tensorrt)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                        help="render two results.json side by side (OUT/compare.md) instead of measuring")
    parser.add_argument("--note", default=None, help="a line for results.md (e.g. what else ran on the machine)")
    add_out(parser, "output folder", metavar="DIR")
    add_device(parser, "where engines run")
    add_quiet(parser)


def _engine_dirs(values: list[str]) -> dict[str, str]:
    from mpsclip.engines import EXPORTED
    from mpsclip.errors import MPSCLIPError

    out = {}
    for value in values:
        kind, sep, folder = value.partition("=")
        if not sep or kind not in EXPORTED:
            raise MPSCLIPError(f"--engine-dir {value!r}: write KIND=DIR with KIND one of {', '.join(EXPORTED)}")
        out[kind] = folder
    return out


def run(args: argparse.Namespace) -> int:
    from mpsclip.errors import MPSCLIPError

    if args.subverb:
        try:
            return int(importlib.import_module(SUBVERBS[args.subverb]).main(args.rest) or 0)
        except SystemExit as done:  # the module's own --help and usage errors
            return done.code if isinstance(done.code, int) else int(done.code is not None)
    if args.out is None:
        raise MPSCLIPError("--out DIR is required: the folder for results.json, results.md and the plots")
    if args.compare:
        from mpsclip.bench.report import compare, read_results
        from mpsclip.io import atomic_write

        text = compare(read_results(args.compare[0]), read_results(args.compare[1]),
                       (args.compare[0].parent.name or "A", args.compare[1].parent.name or "B"))
        atomic_write(Path(args.out) / "compare.md", text)
        print(text, end="")
        return 0
    if not args.checkpoint:
        raise MPSCLIPError("--checkpoint is required (repeat it for several), or use --compare A.json B.json")
    if args.repeats < 2:
        raise MPSCLIPError(f"--repeats {args.repeats}: time at least 2 calls per cell")
    from mpsclip.bench.engines import GridSettings
    from mpsclip.bench.run import bench

    settings = GridSettings(
        engines=args.engines, towers=args.towers, batch_sizes=args.batch_sizes, precisions=args.precision,
        device=args.device, baseline=None if args.baseline == "none" else "plain", repeats=args.repeats,
        warmup=args.warmup, duration=args.duration, engine_dirs=_engine_dirs(args.engine_dir),
    )
    bench(args.checkpoint, settings, Path(args.out), progress=not args.quiet, note=args.note)
    return 0
