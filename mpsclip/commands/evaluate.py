"""Evaluate a checkpoint on a per-image evaluation file: R@1/5/10 both ways and mR in three modes.

Modes: fused (the authors' retrieval embedding), global (no sub-images), max-response (max over the
global embedding and the 4 MPR perspectives). Prints a table and writes <out>.json and <out>.md.

Examples:
  mpsclip evaluate --checkpoint runs/tiny/best.safetensors --data data/synth
  mpsclip evaluate --checkpoint checkpoint_best.pth --eval-file rsitmd_test.json --image-root RSITMD/images \\
      --sub-root RSITMD/subimages --out results/rsitmd
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpsclip.commands._args import add_checkpoint, add_device, add_out, add_quiet

HELP = "evaluate retrieval (fused, global, max-response) of a checkpoint"


def configure(parser: argparse.ArgumentParser) -> None:
    add_checkpoint(parser, "ours (.safetensors), the authors' .pth, or an open_clip file", required=True)
    parser.add_argument(
        "--arch", help="architecture of a .pth checkpoint (default ViT-B-32-quickgelu; PriorCLIP: ViT-B-32)"
    )
    parser.add_argument("--data", type=Path, help="a folder made by `mpsclip synth` (uses its test split)")
    parser.add_argument("--eval-file", help="per-image evaluation annotations (JSON)")
    parser.add_argument("--image-root", help="folder holding the images")
    parser.add_argument("--sub-root", help="folder of <image stem>/<noun>_blackbg.png sub-images")
    add_out(parser, "results path; .json and .md are appended (default: <checkpoint>.eval)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument(
        "--max-sub-images", type=int, help="cap on sub-images per image (default: what mpsclip train evaluated with)"
    )
    parser.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images, counting them")
    add_device(parser)
    add_quiet(parser)


def run(args: argparse.Namespace) -> int:
    from mpsclip.checkpoints import saved_evaluation
    from mpsclip.data.annotations import load_eval
    from mpsclip.data.synth import dataset_paths
    from mpsclip.devices import resolve_device
    from mpsclip.errors import MPSCLIPError
    from mpsclip.evaluate import embed_eval_set, markdown_table, score_all_modes, write_results
    from mpsclip.factory import load_model
    from mpsclip.metrics import chance_r_mean

    paths = dataset_paths(args.data) if args.data is not None else {}
    eval_file = args.eval_file or paths.get("eval_file")
    image_root = args.image_root or paths.get("image_root")
    sub_root = args.sub_root or paths.get("sub_root")
    if eval_file is None or image_root is None:
        raise MPSCLIPError("give --data, or --eval-file and --image-root")
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, arch=args.arch).to(device)
    images = load_eval(eval_file)
    max_sub_images = args.max_sub_images
    if max_sub_images is None:
        max_sub_images = saved_evaluation(args.checkpoint).get("max_sub_images")
    emb = embed_eval_set(
        model, images, image_root, sub_root, args.batch_size, args.num_workers, max_sub_images, device,
        skip_bad_images=args.skip_bad_images, progress=not args.quiet,
    )
    results = score_all_modes(emb)
    n_images, n_texts = emb.glob.shape[0], emb.text.shape[0]
    print(f"{n_images} images, {n_texts} captions from {eval_file}")
    print(markdown_table(results, chance_r_mean(n_images, max(1, round(n_texts / max(1, n_images))))))
    out = args.out or Path(str(args.checkpoint) + ".eval")
    json_path, md_path = write_results(out, results, n_images, n_texts)
    print(f"wrote {json_path} and {md_path}")
    return 0
