"""``mpsclip-export`` and ``python -m mpsclip.export``: the same command as ``mpsclip export``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mpsclip.cli import run_parser
from mpsclip.commands import export as command
from mpsclip.commands._args import Parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mpsclip-export", description=command.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    command.configure(parser)
    parser.set_defaults(_run=command.run, _prog=parser.prog)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_parser(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
