"""The ``mpsclip`` command line: one verb per module named in :data:`COMMANDS`.

Each command module defines ``HELP`` (one line), ``configure(parser)`` and ``run(args) -> int``; shared options
(``--out``, ``--checkpoint``, ``--device``, ``--quiet``) come from :mod:`mpsclip.commands._args`.
A closed stdout (``mpsclip search ... | head -1``) ends quietly with status 141, as a Unix tool killed by
SIGPIPE does (128 + 13): the output was cut short, so ``set -o pipefail`` scripts still see it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from mpsclip import __version__
from mpsclip.commands._args import Parser
from mpsclip.errors import MPSCLIPError
from mpsclip.trust import trusting_checkpoints

COMMANDS = (
    "mpsclip.commands.synth",
    "mpsclip.commands.train",
    "mpsclip.commands.evaluate",
    "mpsclip.commands.keywords",
    "mpsclip.commands.subimages",
    "mpsclip.commands.embed",
    "mpsclip.commands.index",
    "mpsclip.commands.search",
    "mpsclip.commands.verify",
    "mpsclip.commands.serve",
    "mpsclip.commands.export",
    "mpsclip.commands.bench",
)
"""The verbs, in the order ``mpsclip --help`` lists them: add one line per new command module."""

EXIT_BROKEN_PIPE = 141


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mpsclip", description="MPS-CLIP: text search over satellite and aerial image archives.")
    parser.add_argument("--version", action="version", version=f"mpsclip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(name)
        cmd = sub.add_parser(
            name.rsplit(".", 1)[1].replace("_", "-"),
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.configure(cmd)
        cmd.set_defaults(_run=module.run, _prog=cmd.prog)
    return parser


def run_parser(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command: errors as one line on stderr, a closed stdout quietly."""
    try:
        try:
            return _dispatch(parser, argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail again
        return EXIT_BROKEN_PIPE


def _dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version (0) and usage errors (2): a status, so main() always returns one
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    try:
        with trusting_checkpoints(getattr(args, "trust_checkpoint", False)):
            return int(args._run(args) or 0)
    except MPSCLIPError as err:
        print(f"{args._prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run_parser(build_parser(), argv)
