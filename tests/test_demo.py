"""The demo's evaluation summary: its headline names the mode that scored best, with that mode's own figure."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
from pathlib import Path

import pytest
import torch

from mpsclip.data.annotations import load_eval
from mpsclip.data.synth import dataset_paths
from mpsclip.demo import FUSED_NOTE, QUERIES, best_mode, evaluate_step, headline, query_step
from mpsclip.evaluate import mode_similarity
from mpsclip.model import MPSCLIP

HEADLINE = re.compile(r"^best mode: (\S+) mR (\d+\.\d\d) = (\d+\.\d)x chance \(chance (\d+\.\d\d); (.*)\)$", re.M)


def parse(line: str) -> tuple[str, float, dict[str, float]]:
    """The mode and mR the headline names, and the other modes' figures beside it."""
    found = HEADLINE.search(line)
    assert found is not None, line
    others = dict((m, float(v)) for m, v in (part.rsplit(" ", 1) for part in found.group(5).split(", ")))
    return found.group(1), float(found.group(2)), others


@pytest.mark.parametrize("order", list(itertools.permutations([16.7, 23.9, 20.1])))
def test_headline_names_the_best_mode_with_its_own_figure(order: tuple[float, ...]) -> None:
    results = {mode: {"r_mean": r} for mode, r in zip(("fused", "global", "max-response"), order, strict=True)}
    line = headline(results, chance=1.06)
    mode, r_mean, others = parse(line)
    assert r_mean == max(order) and results[mode]["r_mean"] == r_mean
    assert others == {m: v["r_mean"] for m, v in results.items() if m != mode}
    assert (" ".join(FUSED_NOTE.split()) in " ".join(line.split())) == (mode != "fused")  # why, when fused trails


def test_best_mode_ties_keep_the_first() -> None:
    assert best_mode({"fused": {"r_mean": 5.0}, "global": {"r_mean": 5.0}}) == "fused"


def test_evaluate_step_headline_matches_what_it_writes(
    tiny_model: MPSCLIP, synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = dataset_paths(synth)
    images = load_eval(paths["eval_file"])
    emb, results = evaluate_step(tiny_model, images, paths, 1, 0, tmp_path / "eval")
    mode, r_mean, _ = parse(capsys.readouterr().out)
    written = json.loads((tmp_path / "eval.json").read_text())["modes"]
    assert written == results and len(results) == 3
    assert mode == max(written, key=lambda m: written[m]["r_mean"]) and r_mean == round(written[mode]["r_mean"], 2)

    tops = query_step(tiny_model, emb, images, mode)  # the queries are scored in the headline's mode
    with torch.no_grad():
        queries = tiny_model.encode_text(tiny_model.tokenize(QUERIES))
    scores = mode_similarity(dataclasses.replace(emb, text=queries), mode)
    want = [[Path(images[i].image).name for i in column.topk(3).indices] for column in scores.t()]
    assert tops == want


def test_fused_never_goes_through_the_mpr_head(tiny_model: MPSCLIP, synth: Path, tmp_path: Path) -> None:
    """The premise of bench/results/demo-modes.md: training or re-initialising the head cannot move fused."""
    from mpsclip.bench.demo_modes import score_checkpoint

    paths = dataset_paths(synth)
    row = score_checkpoint(tiny_model.save(tmp_path / "m"), paths, 1)
    assert row["diagnostics"]["fused_recomputed_max_abs_diff"] == 0.0
    assert set(row["modes"]) == {"fused", "global", "max-response"}
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    regions, mask = torch.randn(2, 1, 3, 224, 224), torch.tensor([[True], [True]])
    moved = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for param in moved.mpr_head.parameters():
            param.add_(1.0)
        before, after = tiny_model.embed_all(images, regions, mask), moved.embed_all(images, regions, mask)
    assert torch.equal(before["retrieval"], after["retrieval"])
    assert not torch.allclose(before["perspectives"], after["perspectives"])
