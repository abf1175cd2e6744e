"""Export the image and text towers of a checkpoint for serving (ONNX, TensorRT, AOTInductor, Triton repository).

Adapters included, L2-normalised outputs, dynamic batch axis, parity verified against PyTorch. The output
folder appears only if everything succeeded; it holds manifest.json describing inputs, preprocessing and
parity figures. The same command is installed as ``mpsclip-export`` and runs as ``python -m mpsclip.export``.
AOTInductor packages (.pt2, compiled shared libraries) and TensorRT engines (.plan) are code that runs when
loaded: share them as you would share a program, and load only folders you made or trust.

examples:
  # ONNX, both towers, parity-checked against PyTorch on CPU
  mpsclip export --checkpoint runs/rsicd/model.safetensors --format onnx --out exports/rsicd-onnx

  # the authors' checkpoint, fp16 TensorRT engines for batches of 1 to 512 (NVIDIA GPU, pip install 'mpsclip[gpu]')
  mpsclip export --checkpoint checkpoint_best.pth --arch ViT-B-32-quickgelu --format tensorrt --precision fp16 \\
      --min-batch 1 --opt-batch 128 --max-batch 512 --out exports/rsicd-trt

  # AOTInductor packages (.pt2) for the CPU, loadable with torch alone (torch._inductor.aoti_load_package)
  mpsclip export --checkpoint runs/rsicd/model.safetensors --format aoti --device cpu \\
      --opt-batch 16 --max-batch 64 --out exports/rsicd-aoti

  # int8 ONNX towers (static QDQ), calibrated on your images and captions, refused unless the quality gate
  # (cosine to fp32 per tower, top-10 overlap of 100 queries on a 2,000-item store, R@k on --eval-file) passes
  mpsclip export --checkpoint runs/rsicd/model.safetensors --format onnx --precision int8 \
      --calibration data/calib/ --eval-file data/rsicd/test.json --out exports/rsicd-int8

  # a Triton Inference Server repository (then: tritonserver --model-repository exports/triton)
  mpsclip export --checkpoint runs/rsicd/model.safetensors --format triton-repo --backend onnxruntime \\
      --out exports/triton
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mpsclip.choices import EXPORT_FORMATS, PRECISIONS, TRITON_BACKENDS
from mpsclip.commands._args import add_checkpoint, add_device, add_out

HELP = "export the image and text towers for serving (ONNX, TensorRT, AOTInductor, Triton repository)"


def configure(parser: argparse.ArgumentParser) -> None:
    add_checkpoint(parser, "ours (.safetensors + .json), the authors' .pth, or open_clip", required=True)
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="fmt", help="artefact kind")
    add_out(parser, "output folder (must not exist, or be empty)", required=True, metavar="DIR")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="compute precision (fp32)")
    parser.add_argument("--calibration", type=Path, default=None, metavar="DIR|FILE",
                        help="int8: images (folder, with an optional captions.txt), an evaluation .json or a .txt of "
                        "captions to calibrate on (default: packaged synthetic scenes, with a warning)")
    parser.add_argument("--calibration-items", type=int, default=256, metavar="N",
                        help="int8: images and captions to calibrate on, one in five held back (256)")
    parser.add_argument("--gate-items", type=int, default=2000, metavar="N",
                        help="int8: items in the quality gate's store (2000)")
    parser.add_argument("--min-overlap", type=float, default=0.95, metavar="F",
                        help="int8: the least mean top-10 overlap with fp32 over the gate's queries (0.95)")
    parser.add_argument("--eval-file", type=Path, default=None, metavar="JSON",
                        help="int8: evaluation file whose R@1/5/10 may drop at most 1 point against fp32")
    parser.add_argument("--towers", default="image,text", help="comma-separated towers to export (image,text)")
    parser.add_argument("--min-batch", type=int, default=1, help="smallest batch (TensorRT/AOTI profile; 1)")
    parser.add_argument("--opt-batch", type=int, default=256, help="batch to tune for / Triton's preferred (256)")
    parser.add_argument("--max-batch", type=int, default=1024, help="largest batch (1024)")
    parser.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=True, help="check parity with PyTorch (on)"
    )
    parser.add_argument("--arch", default=None, help="architecture for .pth checkpoints (ViT-B-32-quickgelu)")
    parser.add_argument("--backend", default="onnxruntime", choices=TRITON_BACKENDS, help="Triton backend")
    add_device(parser, "what --format aoti compiles for")


def run(args: argparse.Namespace) -> int:
    from mpsclip.devices import resolve_device
    from mpsclip.errors import MPSCLIPError
    from mpsclip.export import GateSettings, export
    from mpsclip.export.manifest import MANIFEST

    int8 = args.precision == "int8"
    if not int8 and (args.calibration is not None or args.eval_file is not None):
        raise MPSCLIPError("--calibration and --eval-file are for --precision int8; add it or drop them")
    if not 0.0 <= args.min_overlap <= 1.0:
        raise MPSCLIPError(f"--min-overlap {args.min_overlap}: give a fraction of the top-10 lists, 0 to 1")

    if args.device != "auto" and args.fmt != "aoti":
        raise MPSCLIPError(f"--device {args.device}: only --format aoti compiles for a device; drop --device")
    device = resolve_device(args.device).type if args.fmt == "aoti" else None
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
        device=device,
        calibration=args.calibration,
        calibration_items=args.calibration_items,
        gate=GateSettings(store_items=args.gate_items, min_overlap=args.min_overlap, eval_file=args.eval_file)
        if int8 else None,
    )
    manifest = json.loads((out / MANIFEST).read_text())
    if int8:
        _print_gate(manifest["quantization"])
    for tower, figures in manifest["verification"].items():
        if figures.get("by") == "quality gate":
            continue
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


def _print_gate(quantization: dict) -> None:
    gate = quantization["gate"]
    for tower, figures in gate["embedding"].items():
        kept = ", ".join(k for k, v in quantization["towers"][tower]["kept_fp32"].items() if v)
        print(f"{tower}: int8, min cosine to fp32 {figures['calibration_min_cosine']:.4f} (calibration), "
              f"{figures['held_back_min_cosine']:.4f} (held back); kept fp32: {kept}")
    retrieval = gate["retrieval"]
    print(f"gate: top-{retrieval['k']} overlap with fp32 {retrieval['top_k_overlap']:.4f} over {retrieval['queries']} "
          f"queries on {retrieval['store_items']} items")
    if "eval" in gate:
        drops = ", ".join(f"{k} {v:+.2f}" for k, v in gate["eval"]["drop"].items())
        print(f"gate: R@k drop against fp32 on {gate['eval']['file']}: {drops}")
