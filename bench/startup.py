"""Start-up time of the command line: ``mpsclip --help``, a verb's ``--help`` and a usage error, next to
``python -c pass`` (the interpreter alone) and ``python -c "import torch"`` (what a parser that imported torch
would pay at least).

Each command runs as a fresh process, in interleaved rounds (one run of each per round, the order rotating),
so that a load drifting on a shared machine weighs on all of them alike; the table gives the median wall time
over rounds and the median over rounds of the ratio to ``python -c pass`` within the round. Writes OUT.json and
OUT.md.

example:
  python -m mpsclip.bench.startup --out bench/results/startup --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mpsclip.bench.report import cpu_model

from mpsclip.io import atomic_write

BASELINE = "python -c pass"


def mpsclip_command() -> list[str]:
    """The installed ``mpsclip`` script next to this interpreter, else ``python -m mpsclip``."""
    script = Path(sys.executable).with_name("mpsclip")
    if script.is_file():
        return [str(script)]
    found = shutil.which("mpsclip")
    return [found] if found else [sys.executable, "-m", "mpsclip"]


def commands() -> dict[str, list[str]]:
    cli = mpsclip_command()
    return {
        BASELINE: [sys.executable, "-c", "pass"],
        "mpsclip --help": [*cli, "--help"],
        "mpsclip embed --help": [*cli, "embed", "--help"],
        "mpsclip search (usage error)": [*cli, "search"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }


def time_once(argv: list[str]) -> float:
    """Wall seconds of one run of ``argv`` (its output discarded; a usage error's status 2 is expected)."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=False)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 2):
        raise SystemExit(f"{' '.join(argv)} exited with status {done.returncode}")
    return seconds


def measure(cmds: dict[str, list[str]], rounds: int) -> dict[str, list[float]]:
    """``rounds`` interleaved rounds: every command once per round, the order rotating by one each round."""
    names = list(cmds)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # one untimed warm-up run each (page cache, .pyc files)
        time_once(cmds[name])
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(time_once(cmds[name]))
    return samples


def summarise(samples: dict[str, list[float]]) -> list[dict[str, float | str]]:
    base = samples[BASELINE]
    return [
        {
            "command": name,
            "median_ms": round(1000 * statistics.median(values), 1),
            "min_ms": round(1000 * min(values), 1),
            "ratio_to_python": round(statistics.median(v / b for v, b in zip(values, base, strict=True)), 2),
        }
        for name, values in samples.items()
    ]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# mpsclip start-up time ({m['cpu']}, {m['cores']} cores, Python {m['python']})",
        "",
        f"{result['rounds']} interleaved rounds of fresh processes (one run of each per round, the order rotating); "
        f"load average {m['load_average_start']} at the start, {m['load_average_end']} at the end "
        "(a shared machine: compare the ratios).",
        "",
        "| command | median ms | min ms | median ratio to `python -c pass` |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| `{r['command']}` | {r['median_ms']} | {r['min_ms']} | {r['ratio_to_python']} |")
    lines += ["", f"made by: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output prefix (writes OUT.json and OUT.md)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (default: 10)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be 1 or more, got {args.rounds}")
    load_start = [round(x, 2) for x in os.getloadavg()]
    samples = measure(commands(), args.rounds)
    result = {
        "command": "python -m mpsclip.bench.startup " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_start": load_start,
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
        "rounds": args.rounds,
        "rows": summarise(samples),
        "samples_s": {name: [round(v, 4) for v in values] for name, values in samples.items()},
    }
    atomic_write(args.out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    atomic_write(args.out.with_suffix(".md"), text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
