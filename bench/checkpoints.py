"""Random-weight checkpoints for benchmarks: a seeded backbone with non-trivial adapter weights.

    python -m mpsclip.bench.checkpoints --arch MPS-Tiny --arch ViT-B-32-quickgelu --out /tmp/ckpts

writes ``OUT/<arch>.safetensors`` (+ ``.json``) for each ``--arch``; ``mpsclip bench --checkpoint`` takes them.
Timings do not depend on the weights' values, and parity checks need adapters that do something, so the
adapters are randomised instead of left at their identity initialisation (``up_proj`` starts at zero).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mpsclip.model import MPSCLIP


def randomized_model(arch: str, seed: int = 0) -> MPSCLIP:
    """Random backbone and non-trivial adapter weights (``up_proj`` starts at zero, which would hide them)."""
    torch.manual_seed(seed)
    model = MPSCLIP(arch).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in model.adapters():
            for name, param in adapter.named_parameters():
                scale, offset = (0.0, 0.4) if name == "gate" else (0.05, 1.0 if "norm" in name else 0.0)
                param.copy_(offset + scale * torch.randn(param.shape, generator=gen))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpsclip.bench.checkpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", required=True, help="architecture (repeat for several)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the checkpoints")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in args.arch:
        print(randomized_model(arch, args.seed).save(args.out / arch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
