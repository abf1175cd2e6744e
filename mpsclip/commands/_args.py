"""Arguments every verb spells the same way: ``--out``, ``--checkpoint``, ``--device``, ``--quiet``, ``--bbox``.

Old spellings keep working for one release: they store into the new option and print one line on stderr,
``mpsclip VERB: warning: --output is deprecated, use --out (it will be removed in 0.3)``.
Options that are required but also reachable through an old positional are checked after parsing
(:class:`Parser`), so that either spelling satisfies them.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any

from mpsclip.choices import DEVICES

REMOVED_IN = "0.3"

NEGATIVE_VALUE = re.compile(r"^-\d*\.?\d+(,-?\d*\.?\d+)*$")
"""Arguments that are values, not options: a negative number or a comma list starting with one (``-78.9,23.5``)."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser that reads ``-78.9,23.5,-77.7,25.5`` as a value and checks late-required options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_VALUE
        self.required_late: list[tuple[str, str]] = []
        self.positional_aliases: list[tuple[str, str, str]] = []

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        for old, dest, flag in self.positional_aliases:
            value = namespace.__dict__.pop(old, None)
            if value is not None and getattr(namespace, dest, None) is not None:
                self.error(f"{flag} given twice: drop the positional {old.removeprefix('_old_').upper()}")
            if value is not None:
                setattr(namespace, dest, value)
        for dest, flag in self.required_late:
            if getattr(namespace, dest, None) is None:
                self.error(f"the following arguments are required: {flag}")
        return namespace, extras


def warn_deprecated(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    print(f"{parser.prog}: warning: {old} is deprecated, use {new} (it will be removed in {REMOVED_IN})",
          file=sys.stderr)


class DeprecatedOption(argparse.Action):
    """An old option spelling: stores into the new option's dest and warns once per use."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        warn_deprecated(parser, option_string or self.option_strings[0], self.new)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


class DeprecatedPositional(argparse.Action):
    """An old positional spelling of an option (``mpsclip evaluate CKPT``): warns; :class:`Parser` moves it."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", default=None, **kwargs)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if values is not None:  # None: not given (argparse calls an optional positional's action with its default)
            warn_deprecated(parser, f"the positional {self.metavar}", f"{self.new} {self.metavar}")
        setattr(namespace, self.dest, values)


def _add_late_required(
    parser: argparse.ArgumentParser,
    flags: tuple[str, ...],
    *,
    required: bool,
    positional: bool,
    aliased: bool = False,
    **kwargs: Any,
) -> None:
    """``flags`` (the first names the dest), optionally also reachable through a deprecated positional or
    (``aliased``) deprecated option spellings; argparse cannot see those satisfy ``required``, so :class:`Parser`
    checks it after parsing."""
    dest = flags[0].lstrip("-").replace("-", "_")
    if (positional or aliased) and not isinstance(parser, Parser):
        raise TypeError(f"{flags[0]}: an option with old spellings needs an mpsclip Parser")
    if positional:
        parser.positional_aliases.append((f"_old_{dest}", dest, flags[0]))
        parser.add_argument(
            f"_old_{dest}",
            action=DeprecatedPositional,
            new=flags[0],
            metavar=kwargs.get("metavar") or dest.upper(),
            type=kwargs.get("type"),
            help=argparse.SUPPRESS,
        )
    if required and (positional or aliased):
        parser.required_late.append((dest, flags[0]))
        kwargs["help"] = kwargs.get("help", "") + " (required)"
        required = False
    parser.add_argument(*flags, dest=dest, required=required, default=None, **kwargs)


def add_out(
    parser: argparse.ArgumentParser,
    help: str,
    *,
    required: bool = False,
    metavar: str = "PATH",
    type: Any = None,
    old_flags: tuple[str, ...] = (),
    positional: bool = False,
) -> None:
    """``--out``/``-o``; ``old_flags`` (``--output``) and an old positional OUT are deprecated spellings."""
    from pathlib import Path

    _add_late_required(
        parser,
        ("--out", "-o"),
        required=required,
        positional=positional,
        aliased=bool(old_flags),
        type=type or Path,
        metavar=metavar,
        help=help,
    )
    for flag in old_flags:
        parser.add_argument(flag, dest="out", action=DeprecatedOption, new="--out", type=type or Path)


def add_checkpoint(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    help: str = "model checkpoint (ours .safetensors, the authors' .pth, or an open_clip file)",
    *,
    required: bool = False,
    positional: bool = False,
) -> None:
    """``--checkpoint PATH``; with ``positional`` the old ``VERB CHECKPOINT`` form is accepted and deprecated."""
    from pathlib import Path

    _add_late_required(
        parser, ("--checkpoint",), required=required, positional=positional, type=Path, metavar="CHECKPOINT", help=help
    )
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
    """``--quiet`` (no progress bars); ``--no-progress`` is its deprecated spelling."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-progress", dest="quiet", action=DeprecatedOption, new="--quiet", nargs=0, const=True)


def bbox(text: str) -> tuple[float, float, float, float]:
    """``W,S,E,N`` (``minx,miny,maxx,maxy``, degrees) as a tuple; an argparse type (negative values welcome)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: expected four numbers W,S,E,N (minx,miny,maxx,maxy)") from err
    if len(values) != 4 or values[0] > values[2] or values[1] > values[3]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected W,S,E,N with W <= E and S <= N")
    return values[0], values[1], values[2], values[3]


def add_bbox(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--bbox", type=bbox, default=None, metavar="W,S,E,N", help=help)
