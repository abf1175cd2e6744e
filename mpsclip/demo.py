"""``make demo``: the end-to-end job on a fresh machine with no weights and no data.

Run with ``python -m mpsclip.demo --out demo_out``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mpsclip.data.transforms import eval_transform
from mpsclip.model import MPSCLIP

TEXTS = ["a blue river", "a green field", "white storage tanks"]


def _scene(kind: str) -> Image.Image:
    img = Image.new("RGB", (224, 224), (120, 110, 90))
    draw = ImageDraw.Draw(img)
    if kind == "river":
        draw.rectangle((90, 0, 134, 224), fill=(40, 80, 160))
    elif kind == "field":
        draw.rectangle((20, 20, 204, 204), fill=(60, 150, 60))
    else:
        for x in (50, 110, 170):
            draw.ellipse((x - 20, 92, x + 20, 132), fill=(235, 235, 235))
    return img


def similarity_table(out: Path) -> None:
    """Embed a few drawn scenes and captions with an untrained tiny model and print their similarities."""
    torch.manual_seed(0)
    model = MPSCLIP("MPS-Tiny").eval()
    transform = eval_transform(model.image_size)
    images = torch.stack([transform(_scene(k)) for k in ("river", "field", "tanks")])
    with torch.no_grad():
        sim = model.encode_image(images) @ model.encode_text(model.tokenize(TEXTS)).t()
    print("cosine similarity, untrained tiny model (images x texts):")
    print(" " * 8 + "".join(f"{t[:18]:>20}" for t in TEXTS))
    for name, row in zip(("river", "field", "tanks"), sim.tolist()):
        print(f"{name:<8}" + "".join(f"{v:>20.3f}" for v in row))
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "tiny-untrained")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for everything the demo writes")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    similarity_table(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
