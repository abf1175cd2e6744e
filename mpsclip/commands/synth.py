"""Generate a synthetic remote-sensing retrieval dataset in the authors' annotation format.

Eight scene classes with class-typical objects, five captions per image, and exact per-noun masks
and black-background sub-images. The same seed always gives byte-identical files.

Writes OUT/images/<class>_<n>.png, OUT/train.json, OUT/test.json (and OUT/val.json with --val),
OUT/subimages/<stem>/<noun>_blackbg.png and OUT/masks/<stem>/<noun>.png.

example:
  mpsclip synth --out synth_data --train 2000 --test 400 --seed 0
"""

from __future__ import annotations

import argparse

from mpsclip.commands._args import add_out, add_quiet
from mpsclip.errors import MPSCLIPError

HELP = "generate a synthetic remote-sensing dataset (images, captions, masks, sub-images)"


def configure(parser: argparse.ArgumentParser) -> None:
    add_out(parser, "output folder (created if missing)", required=True, metavar="OUT")
    parser.add_argument("--train", type=int, default=2000, help="training images (default: 2000)")
    parser.add_argument("--test", type=int, default=400, help="test images (default: 400)")
    parser.add_argument("--val", type=int, default=0, help="validation images (default: 0, no val.json)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default: 224)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    add_quiet(parser)


def run(args: argparse.Namespace) -> int:
    from mpsclip.data.synth import generate

    for name in ("train", "test", "val"):
        if getattr(args, name) < 0:
            raise MPSCLIPError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if args.size < 32:
        raise MPSCLIPError(f"--size must be at least 32 pixels, got {args.size}")
    if args.workers is not None and args.workers < 1:
        raise MPSCLIPError(f"--workers must be 1 or more, got {args.workers}")
    if args.out.exists() and not args.out.is_dir():
        raise MPSCLIPError(f"{args.out}: exists and is not a folder; choose another OUT")
    summary = generate(
        args.out,
        n_train=args.train,
        n_test=args.test,
        seed=args.seed,
        n_val=args.val,
        image_size=args.size,
        workers=args.workers,
        progress=not args.quiet,
    )
    total = summary.n_train + summary.n_val + summary.n_test
    print(f"wrote {total} images to {summary.out_dir} in {summary.seconds:.1f} s")
    print(f"  train: {summary.n_train} images, {summary.n_train_captions} captions -> train.json")
    if summary.n_val:
        print(f"  val:   {summary.n_val} images -> val.json")
    print(f"  test:  {summary.n_test} images -> test.json")
    print("  per class: " + ", ".join(f"{k} {v}" for k, v in summary.per_class.items()))
    return 0
