"""The one CLI grammar: verbs, shared flags, one spelling each, negative coordinates, a closed stdout, and
parsers that answer without importing torch."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mpsclip.cli import COMMANDS, EXIT_BROKEN_PIPE, build_parser, main


def build_export_parser() -> argparse.ArgumentParser:
    """``mpsclip-export``'s parser (imported here: importing mpsclip.export loads the exporters)."""
    from mpsclip.export.__main__ import build_parser as build

    return build()


VERBS = [name.rsplit(".", 1)[1] for name in COMMANDS]

# verb -> the shared flags it must have (--out, --checkpoint, --device, --quiet where they apply)
SHARED = {
    "synth": {"--out", "--quiet"},
    "train": {"--out", "--device", "--quiet"},
    "evaluate": {"--out", "--checkpoint", "--device", "--quiet"},
    "keywords": {"--out", "--checkpoint", "--device", "--quiet"},
    "subimages": {"--out", "--checkpoint", "--device", "--quiet"},
    "embed": {"--out", "--checkpoint", "--device", "--quiet"},
    "index": {"--checkpoint", "--device", "--quiet"},
    "search": {"--out", "--checkpoint", "--device", "--quiet"},
    "export": {"--out", "--checkpoint", "--device"},
}


def _verb_parser(verb: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[verb]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if a.help is not argparse.SUPPRESS}


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_an_example(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([verb, "--help"]) == 0
    text = capsys.readouterr().out
    assert f"mpsclip {verb}" in text and "example" in text.lower()


LIGHT_RUNS = """
import json, sys
from mpsclip.cli import main
seen = []
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    seen.append([argv, code, sorted(m for m in ("torch", "numpy", "PIL", "open_clip") if m in sys.modules)])
print(json.dumps(seen))
"""


def test_help_and_usage_errors_do_not_import_torch() -> None:
    """Parsers are built from light modules: ``--help`` and usage errors answer without loading torch."""
    runs = [["--help"], *([verb, "--help"] for verb in VERBS), ["bench", "archive", "--help"], ["search"],
            ["embed", "imgs", "--out", "s", "--checkpoint", "c", "--workers", "x"], ["evaluate", "--bogus"]]
    done = subprocess.run([sys.executable, "-c", LIGHT_RUNS, json.dumps(runs)], capture_output=True, text=True,
                          timeout=120, check=True)
    seen = json.loads(done.stdout.splitlines()[-1])
    assert [code for _, code, _ in seen] == [0] * (len(VERBS) + 2) + [2, 2, 2]
    assert all(heavy == [] for _, _, heavy in seen), seen


def test_shared_flags_table_covers_every_verb() -> None:
    assert set(SHARED) <= set(VERBS)


@pytest.mark.parametrize("verb", sorted(SHARED))
def test_shared_flags_are_spelled_the_same(verb: str) -> None:
    options = _options(_verb_parser(verb))
    assert SHARED[verb] <= set(options)
    for old in ("--output", "--no-progress", "--runtime"):
        assert old not in options, f"{verb} still advertises {old}"
    if "--device" in options:
        assert options["--device"].default == "auto"
    if "--quiet" in options:
        assert options["--quiet"].default is False


def test_export_aliases_share_one_parser_definition() -> None:
    ours, theirs = _options(_verb_parser("export")), _options(build_export_parser())
    assert set(ours) == set(theirs)


REMOVED_SPELLINGS = [
    # the 0.1 spellings, gone in 0.1.0: a usage error each
    ["keywords", "in.json", "--output", "o.json"],
    ["subimages", "a.json", "--output", "s"],
    ["keywords", "in.json", "-o", "o.json", "--no-progress"],
    ["evaluate", "ck.safetensors", "--data", "d"],
    ["synth", "data_dir", "--train", "4"],
    ["embed", "imgs", "--out", "s", "--checkpoint", "c", "--runtime", "onnxruntime"],
]


@pytest.mark.parametrize("argv", REMOVED_SPELLINGS, ids=lambda argv: " ".join(argv[:1] + argv[-2:]))
def test_removed_spellings_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "deprecated" not in err


def test_new_spellings_do_not_warn(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["evaluate", "--checkpoint", "ck", "--data", "d", "--quiet", "--out", "r"])
    assert (args.checkpoint, args.quiet, args.out, args.device) == (Path("ck"), True, Path("r"), "auto")
    assert capsys.readouterr().err == ""


def test_export_alias_takes_the_checkpoint_as_an_option(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_export_parser().parse_args(["--checkpoint", "m.safetensors", "--format", "onnx", "--out", "x"])
    assert args.checkpoint == Path("m.safetensors") and capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        build_export_parser().parse_args(["m.safetensors", "--format", "onnx", "--out", "x"])


def test_required_checkpoint_missing_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["evaluate", "--data", "d"])
    assert done.value.code == 2
    assert "required: --checkpoint" in capsys.readouterr().err


def test_embed_engine_kind_and_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["embed", "imgs", "--out", "s", "--checkpoint", "c"]
    args = build_parser().parse_args([*base, "--engine", "onnxruntime", "--engine-dir", str(tmp_path)])
    assert (args.engine, args.engine_dir) == ("onnxruntime", tmp_path)
    assert capsys.readouterr().err == ""
    for kind in ("onnxrunt1me", str(tmp_path)):  # a folder is no engine kind: it goes to --engine-dir
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, "--engine", kind])
        assert "argument --engine: invalid choice" in capsys.readouterr().err


def test_embed_workers_default_follows_the_machine() -> None:
    from mpsclip.commands.embed import available_cores, default_workers

    assert build_parser().parse_args(["embed", "i", "--out", "s", "--checkpoint", "c"]).workers is None
    assert [default_workers(cores) for cores in (1, 2, 3, 4, 16, 64)] == [0, 0, 1, 2, 8, 8]
    assert 1 <= available_cores() <= (os.cpu_count() or 1)


def test_embed_settings_errors_name_the_flags_as_spelled_now() -> None:
    from mpsclip.archive.embedder import EmbedSettings
    from mpsclip.errors import MPSCLIPError

    for field, flag in (("engine", "--engine"), ("perspectives", "--perspectives"), ("decode", "--decode")):
        with pytest.raises(MPSCLIPError, match=f"^{flag} must be one of .*, got 'bogus'$"):
            EmbedSettings(**{field: "bogus"}).check()


@pytest.mark.parametrize("form", ["split", "equals"])
def test_bbox_in_the_western_and_southern_hemispheres(form: str) -> None:
    box = "-78.9,-23.5,-77.7,25.5"
    flag = ["--bbox", box] if form == "split" else [f"--bbox={box}"]
    args = build_parser().parse_args(["search", "tiles.store", "a marina", *flag, "-k", "3"])
    assert args.bbox == (-78.9, -23.5, -77.7, 25.5)
    assert args.queries == ["a marina"] and args.k == 3


def test_bbox_west_of_east_crosses_the_antimeridian() -> None:
    args = build_parser().parse_args(["search", "s", "q", "--bbox", "170,-20,-170,-10"])
    assert args.bbox == (170.0, -20.0, -170.0, -10.0)


@pytest.mark.parametrize(
    ("box", "said"),
    [
        ("-200,23.5,-78.9,25.5", "west -200 is not a longitude in [-180, 180]"),
        ("10,-91,20,0", "south -91 is not a latitude in [-90, 90]"),
        ("10,0,20,nan", "north nan is not a latitude"),
        ("10,5,20,4", "south 5 is above north 4"),
        ("10,5,20", "expected four numbers W,S,E,N"),
        ("a,b,c,d", "expected four numbers W,S,E,N"),
    ],
)
def test_bad_bbox_is_a_usage_error(box: str, said: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["search", "s", "q", f"--bbox={box}"])
    assert done.value.code == 2
    assert said in capsys.readouterr().err


def test_the_api_checks_boxes_as_the_cli_does() -> None:
    """POST /search's bbox goes through the same validator (mpsclip.bbox) as --bbox: out-of-range degrees are a
    422 naming the number, and west > east is a box across the antimeridian."""
    from extras import require

    require("fastapi", "pip install 'mpsclip[serve]'")
    from mpsclip.serve.queries import SearchRequest
    from pydantic import ValidationError

    assert SearchRequest(text="a port", bbox=[170, -20, -170, -10]).bbox == [170, -20, -170, -10]
    for bad, said in (([181, 0, 182, 1], "west 181 is not a longitude"), ([0, 0, 1, 95], "north 95 is not a latitude")):
        with pytest.raises(ValidationError, match=said):
            SearchRequest(text="a port", bbox=bad)


PRINTING_VERB = """
import sys
from mpsclip.cli import run_parser
from mpsclip.commands._args import Parser
parser = Parser(prog="mpsclip lines")
parser.set_defaults(_run=lambda args: [print(f"line {i}") for i in range(100_000)] and 0, _prog="mpsclip lines")
sys.exit(run_parser(parser, []))
"""


@pytest.mark.parametrize(
    "argv",
    [["-m", "mpsclip", "search", "--help"], ["-u", "-c", PRINTING_VERB], ["-c", PRINTING_VERB]],
    ids=["help", "print-unbuffered", "print-buffered"],
)
def test_closed_stdout_ends_quietly(argv: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # argparse swallows unbuffered --help errors
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before mpsclip writes a byte, as with `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE, err
    assert err == ""


def _readme_commands() -> list[list[str]]:
    """The ``mpsclip ...`` lines of README.md's bash blocks (continuations joined, comments and redirects cut)."""
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if words[:1] != ["mpsclip"] or "..." in words:
            continue
        commands.append(words[1 : words.index(">")] if ">" in words else words[1:])
    return commands


@pytest.mark.parametrize("argv", _readme_commands(), ids=lambda argv: " ".join(argv)[:60])
def test_readme_commands_parse_without_warnings(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    build_parser().parse_args(argv)
    assert capsys.readouterr().err == ""
