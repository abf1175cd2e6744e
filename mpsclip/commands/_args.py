"""Arguments every verb spells the same way: ``--out``, ``--checkpoint``, ``--device``, ``--quiet``, ``--bbox``.

One spelling each (the 0.1 aliases are gone); :class:`Parser` reads a negative coordinate list as a value.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from mpsclip.bbox import BBox, parse_bbox
from mpsclip.choices import DEVICES
from mpsclip.errors import MPSCLIPError

NEGATIVE_VALUE = re.compile(r"^-\d*\.?\d+(,-?\d*\.?\d+)*$")
"""Arguments that are values, not options: a negative number or a comma list starting with one (``-78.9,23.5``)."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser that reads ``-78.9,23.5,-77.7,25.5`` as a value, not as an option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_VALUE


def add_out(
    parser: argparse.ArgumentParser,
    help: str,
    *,
    required: bool = False,
    metavar: str = "PATH",
    type: Any = None,
) -> None:
    """``--out``/``-o``."""
    parser.add_argument("--out", "-o", required=required, default=None, type=type or Path, metavar=metavar, help=help)


def add_checkpoint(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    help: str = "model checkpoint (ours .safetensors, the authors' .pth, or an open_clip file)",
    *,
    required: bool = False,
) -> None:
    """``--checkpoint PATH``."""
    parser.add_argument("--checkpoint", required=required, default=None, type=Path, metavar="CHECKPOINT", help=help)
    add_trust_checkpoint(parser)


def add_trust_checkpoint(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--trust-checkpoint``: also load TorchScript checkpoints, which run code of their own when loaded (the CLI
    runs the command inside :func:`mpsclip.trust.trusting_checkpoints`)."""
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="also load a TorchScript checkpoint (OpenAI's or GeoRSCLIP's .pt JIT files): loading one runs code it "
        "carries, so give this only for a file whose source you trust",
    )


def add_device(parser: argparse.ArgumentParser | argparse._ArgumentGroup, what: str = "") -> None:
    """``--device`` (default auto); resolve it with :func:`mpsclip.devices.resolve_device`."""
    parser.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help=f"{what + ': ' if what else ''}{', '.join(DEVICES)} or cuda:N (default: auto, a GPU when present)",
    )


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` (no progress bars)."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def bbox(text: str) -> BBox:
    """``W,S,E,N`` (degrees; west > east crosses the antimeridian) as :func:`mpsclip.bbox.parse_bbox` checks it,
    an argparse type."""
    try:
        return parse_bbox(text)
    except MPSCLIPError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_bbox(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--bbox", type=bbox, default=None, metavar="W,S,E,N", help=help)
