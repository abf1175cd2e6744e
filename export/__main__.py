"""``mpsclip-export``: export MPS-CLIP's image and text towers for serving."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mpsclip.export import FORMATS, export
from mpsclip.export.aoti import DEVICES
from mpsclip.export.manifest import MANIFEST
from mpsclip.export.onnx import DTYPES
from mpsclip.export.triton_repo import BACKENDS

from mpsclip.errors import MPSCLIPError

EXAMPLES = """examples:
  # ONNX, both towers, parity-checked against PyTorch on CPU
  mpsclip-export runs/rsicd/model.safetensors --format onnx --out exports/rsicd-onnx

  # the authors' checkpoint, fp16 TensorRT engines for batches of 1 to 512 (NVIDIA GPU, pip install 'mpsclip[gpu]')
  mpsclip-export checkpoint_best.pth --arch ViT-B-32-quickgelu --format tensorrt --precision fp16 \\
      --min-batch 1 --opt-batch 128 --max-batch 512 --out exports/rsicd-trt

  # AOTInductor packages (.pt2) for the CPU, loadable with torch alone (torch._inductor.aoti_load_package)
  mpsclip-export runs/rsicd/model.safetensors --format aoti --device cpu \\
      --opt-batch 16 --max-batch 64 --out exports/rsicd-aoti

  # a Triton Inference Server repository (then: tritonserver --model-repository exports/triton)
  mpsclip-export runs/rsicd/model.safetensors --format triton-repo --backend onnxruntime --out exports/triton
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpsclip-export",
        description="Export the image and text towers of an MPS-CLIP checkpoint (adapters included, L2-normalised "
        "outputs, dynamic batch axis) and verify them against PyTorch. The output folder appears only if "
        "everything succeeded; it holds manifest.json describing inputs, preprocessing and parity figures.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="ours (.safetensors + .json), the authors' .pth, or open_clip")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt", help="artefact kind")
    parser.add_argument("--out", required=True, type=Path, help="output folder (must not exist, or be empty)")
    parser.add_argument("--precision", default="fp32", choices=list(DTYPES), help="compute precision (fp32)")
    parser.add_argument("--towers", default="image,text", help="comma-separated towers to export (image,text)")
    parser.add_argument("--min-batch", type=int, default=1, help="smallest batch (TensorRT/AOTI profile; 1)")
    parser.add_argument("--opt-batch", type=int, default=256, help="batch to tune for / Triton's preferred (256)")
    parser.add_argument("--max-batch", type=int, default=1024, help="largest batch (1024)")
    parser.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=True, help="check parity with PyTorch (on)"
    )
    parser.add_argument("--arch", default=None, help="architecture for .pth checkpoints (ViT-B-32-quickgelu)")
    parser.add_argument("--backend", default="onnxruntime", choices=list(BACKENDS), help="Triton backend")
    parser.add_argument(
        "--device", default=None, choices=list(DEVICES), help="AOTInductor target (cuda if a GPU is visible, else cpu)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export(
            args.checkpoint,
            args.fmt,
            args.out,
            precision=args.precision,
            towers=tuple(t.strip() for t in args.towers.split(",") if t.strip()),
            min_batch=args.min_batch,
            opt_batch=args.opt_batch,
            max_batch=args.max_batch,
            verify=args.verify,
            arch=args.arch,
            backend=args.backend,
            device=args.device,
        )
    except MPSCLIPError as err:
        print(f"mpsclip-export: error: {err}", file=sys.stderr)
        return 2
    for tower, figures in json.loads((out / MANIFEST).read_text())["verification"].items():
        if figures["status"] == "verified":
            print(f"{tower}: max abs error {figures['max_abs']:.3g}, min cosine {figures['min_cosine']:.7f}")
            if "fresh_process" in figures:
                fresh = figures["fresh_process"]
                print(
                    f"{tower} (fresh process, torch only): max abs error {fresh['max_abs']:.3g}, "
                    f"min cosine {fresh['min_cosine']:.7f}"
                )
        else:
            print(f"{tower}: not verified ({figures['reason']})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
