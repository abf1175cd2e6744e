"""Train MPS-CLIP on RSITMD/RSICD-format annotations (single process, or many with torchrun).

Examples:
  mpsclip train --config tiny --data data/synth --out runs/tiny
  mpsclip train --config tiny --data data/synth --out runs/tiny-cpu --device cpu --quiet
  mpsclip train --config rsitmd --train-file rsitmd_train.json --eval-file rsitmd_test.json \\
      --image-root RSITMD/images --sub-root RSITMD/subimages --out runs/rsitmd
  torchrun --nproc-per-node 4 -m mpsclip train --config rsitmd ... --out runs/rsitmd
  mpsclip train --config rsitmd ... --out runs/rsitmd --resume     # after a crash

Writes <out>/last.*, <out>/best.* (by fused r_mean), <out>/state.pt (for --resume) and <out>/log.jsonl.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpsclip.choices import MODEL_FAMILIES
from mpsclip.commands._args import add_device, add_out, add_quiet, add_trust_checkpoint

HELP = "train MPS-CLIP (adapters + MPR; --unfreeze-backbone for full fine-tuning)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="rsitmd", help="YAML file or shipped name: rsitmd, rsicd, tiny")
    add_out(parser, "output folder for checkpoints and logs", required=True, metavar="DIR")
    parser.add_argument("--data", type=Path, help="a folder made by `mpsclip synth` (sets all paths below)")
    parser.add_argument("--train-file", help="per-caption training annotations (JSON)")
    parser.add_argument("--eval-file", help="per-image evaluation annotations (JSON), evaluated each epoch")
    parser.add_argument("--image-root", help="folder holding the images named in the annotations")
    parser.add_argument("--sub-root", help="folder of <image stem>/<noun>_blackbg.png sub-images")
    parser.add_argument(
        "--model-family", choices=MODEL_FAMILIES, help="priorclip trains PriorCLIP with its own objective"
    )
    parser.add_argument("--arch", help="open_clip architecture (PriorCLIP: ViT-B-32)")
    parser.add_argument("--init-checkpoint", help="start from this checkpoint (ours, the authors', open_clip)")
    add_trust_checkpoint(parser)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-sub-images", type=int, help="cap on sub-images per image (default: no cap)")
    parser.add_argument("--unfreeze-backbone", action="store_true", default=None, help="train the backbone too")
    parser.add_argument("--skip-bad-images", action="store_true", default=None, help="skip unreadable images")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/state.pt")
    add_device(parser, "where to train (under torchrun: cuda means each process's cuda:LOCAL_RANK)")
    add_quiet(parser)


def run(args: argparse.Namespace) -> int:
    from mpsclip.data.synth import dataset_paths
    from mpsclip.train import TrainConfig, train

    paths = {k: str(v) for k, v in dataset_paths(args.data).items()} if args.data is not None else {}
    overrides = {
        "train_file": args.train_file or paths.get("train_file"),
        "eval_file": args.eval_file or paths.get("eval_file"),
        "image_root": args.image_root or paths.get("image_root"),
        "sub_root": args.sub_root or paths.get("sub_root"),
        "init_checkpoint": args.init_checkpoint,
        "model_family": args.model_family,
        "arch": args.arch,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "num_workers": args.num_workers,
        "seed": args.seed,
        "max_sub_images": args.max_sub_images,
        "unfreeze_backbone": args.unfreeze_backbone,
        "skip_bad_images": args.skip_bad_images,
    }
    cfg = TrainConfig.from_yaml(args.config, **overrides)
    summary = train(cfg, args.out, resume=args.resume, device=args.device, progress=not args.quiet)
    if summary:
        best = summary["best_r_mean"]
        what = f"best fused r_mean {best:.2f}" if "eval" in summary else f"lowest training loss {-best:.4f}"
        print(f"done: checkpoints in {args.out} ({what})")
    return 0
