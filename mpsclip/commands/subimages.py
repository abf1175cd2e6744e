"""Cut keyword sub-images: for every image and noun of ANNOTATION, write OUT/<image stem>/<noun>_blackbg.png,
the image with the noun's region kept and every other pixel black (same size as the image).

ANNOTATION is the authors' format: records with 'image' and 'nouns' (per-caption training files are grouped
per image; nouns from `mpsclip keywords`, or `mpsclip keywords --from-image` for archives without captions).

backends:
  oracle         the exact masks shipped with a synthetic set (--mask-root SYNTH/masks)
  clip-saliency  no extra weights: patch-token/text similarity of the model (--checkpoint), z-scored per image,
                 upsampled bilinearly, kept where z > --saliency-k, cleaned by opening + closing
  langsam        segment-geospatial's LangSAM (GroundingDINO + SAM) as in the paper; pip install 'mpsclip[sam]'
                 and a SAM checkpoint (--sam-checkpoint PATH or the torch hub cache)

Existing outputs are skipped (resume by running again); empty masks are counted and write no file (a re-run
computes them again). Shard over machines or GPUs with --rank/--world-size (image i goes to rank i % world).
Failed images are listed and the run goes on; the exit status is then 1.

example:
  mpsclip subimages synth/test.json --image-root synth --out subs --backend oracle --mask-root synth/masks
  mpsclip subimages test.json --image-root data --out subs --backend clip-saliency --checkpoint model.safetensors \\
      --score-against synth/masks
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpsclip.choices import (
    LANGSAM_BOX_THRESHOLD,
    LANGSAM_TEXT_THRESHOLD,
    PROMPT_TEMPLATE,
    SALIENCY_K,
    SAM_MODEL_TYPES,
    SUBIMAGE_BACKENDS,
)
from mpsclip.commands._args import add_checkpoint, add_device, add_out, add_quiet
from mpsclip.errors import MPSCLIPError

HELP = "cut black-background keyword sub-images (oracle masks, CLIP saliency or LangSAM)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("annotation", type=Path, metavar="ANNOTATION", help="annotation .json with image + nouns")
    parser.add_argument(
        "--image-root", type=Path, help="folder the 'image' paths are relative to (default: the annotation's folder)"
    )
    add_out(parser, "output folder of <stem>/<noun>_blackbg.png", required=True, metavar="DIR")
    parser.add_argument("--backend", choices=SUBIMAGE_BACKENDS, default="clip-saliency")
    parser.add_argument("--rank", type=int, default=0, help="this shard (default: 0)")
    parser.add_argument("--world-size", type=int, default=1, help="number of shards (default: 1)")
    parser.add_argument(
        "--score-against",
        type=Path,
        metavar="MASK_ROOT",
        help="print the mean IoU of this shard's sub-images against MASK_ROOT/<stem>/<noun>.png",
    )
    add_quiet(parser)
    oracle = parser.add_argument_group("oracle")
    oracle.add_argument("--mask-root", type=Path, help="SYNTH/masks of the synthetic set")
    saliency = parser.add_argument_group("clip-saliency")
    add_checkpoint(saliency, "model weights (any file mpsclip can load)")
    saliency.add_argument("--arch", help="open_clip architecture for backbone-only checkpoints")
    add_device(saliency)
    saliency.add_argument("--batch-size", type=int, default=16, help="images per model call (default: 16)")
    saliency.add_argument(
        "--prompt-template",
        default=PROMPT_TEMPLATE,
        help=f"text prompt, {{noun}} is replaced (default: {PROMPT_TEMPLATE!r})",
    )
    saliency.add_argument(
        "--saliency-k",
        type=float,
        default=SALIENCY_K,
        help=f"keep pixels above mean + k * std of the map (default: {SALIENCY_K})",
    )
    saliency.add_argument(
        "--clean-kernel",
        type=int,
        default=None,
        help="opening/closing kernel in pixels (default: ~1/32 of the shorter side; 0: off)",
    )
    langsam = parser.add_argument_group("langsam")
    langsam.add_argument("--sam-checkpoint", type=Path, help="SAM weights (default: found in the torch hub cache)")
    langsam.add_argument("--sam-model-type", default="vit_h", choices=SAM_MODEL_TYPES)
    langsam.add_argument("--box-threshold", type=float, default=LANGSAM_BOX_THRESHOLD)
    langsam.add_argument("--text-threshold", type=float, default=LANGSAM_TEXT_THRESHOLD)


def build_backend(args: argparse.Namespace):  # -> mpsclip.subimages.writer.Backend
    if args.backend == "oracle":
        from mpsclip.subimages.oracle import OracleBackend

        if args.mask_root is None:
            raise MPSCLIPError("--backend oracle needs --mask-root SYNTH/masks")
        return OracleBackend(args.mask_root)
    if args.backend == "langsam":
        from mpsclip.subimages.langsam import LangSamBackend

        return LangSamBackend(args.sam_checkpoint, args.sam_model_type, args.box_threshold, args.text_threshold)
    from mpsclip.devices import resolve_device
    from mpsclip.factory import load_model
    from mpsclip.subimages.saliency import SaliencyBackend

    if args.checkpoint is None:
        raise MPSCLIPError("--backend clip-saliency needs --checkpoint (the model whose patch tokens are used)")
    if args.batch_size < 1:
        raise MPSCLIPError(f"--batch-size must be at least 1, got {args.batch_size}")
    if "{noun}" not in args.prompt_template:
        raise MPSCLIPError(f"--prompt-template {args.prompt_template!r} needs a {{noun}} placeholder")
    model = load_model(args.checkpoint, arch=args.arch)
    return SaliencyBackend(
        model,
        device=str(resolve_device(args.device)),
        template=args.prompt_template,
        k=args.saliency_k,
        kernel=args.clean_kernel,
        batch_size=args.batch_size,
    )


def run(args: argparse.Namespace) -> int:
    from mpsclip.subimages.writer import load_items, mask_iou, shard, write_subimages

    image_root = args.image_root if args.image_root is not None else args.annotation.parent
    items = shard(load_items(args.annotation, image_root), args.rank, args.world_size)
    backend = build_backend(args)
    summary = write_subimages(items, backend, args.out, progress=not args.quiet)
    print(f"{args.out} (rank {args.rank}/{args.world_size}): {summary.format()}")
    if args.score_against is not None:
        pairs = [
            (item.stem, noun)
            for item in items
            for noun in item.nouns
            if (args.score_against / item.stem / f"{noun}.png").is_file()
        ]
        print(
            f"mean IoU vs {args.score_against}: {mask_iou(args.out, args.score_against, pairs):.4f} "
            f"over {len(pairs)} (image, noun) pairs"
        )
    return 0 if summary.failures == 0 else 1
