import json
from pathlib import Path

import torch

from mpsclip.cli import main
from mpsclip.data.synth import generate
from mpsclip.evaluate import EvalEmbeddings, mode_similarity
from tests.test_checkpoints import authors_state


def test_evaluate_cli_on_authors_checkpoint(tiny_model, tmp_path, capsys):
    data = tmp_path / "data"
    generate(data, n_train=1, n_test=4, seed=1, workers=1)
    ckpt = tmp_path / "checkpoint_best.pth"
    torch.save({"model": authors_state(tiny_model), "config": {"is_mps": True}}, ckpt)
    out = tmp_path / "results"
    argv = ["evaluate", "--checkpoint", str(ckpt), "--arch", "MPS-Tiny", "--data", str(data), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for mode in ("fused", "global", "max-response"):
        assert f"| {mode} |" in printed
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["images"] == 4 and set(saved["modes"]) == {"fused", "global", "max-response"}
    assert out.with_suffix(".md").read_text().startswith("| mode |")
    assert main(argv[:-2]) == 0  # no --out: next to the checkpoint, the suffixes appended to its whole name
    assert f"wrote {ckpt}.eval.json and {ckpt}.eval.md" in capsys.readouterr().out
    assert json.loads(Path(f"{ckpt}.eval.json").read_text()) == saved


def test_max_response_is_max_over_global_and_views():
    glob = torch.tensor([[1.0, 0.0]])
    views = torch.tensor([[[0.0, 1.0], [0.6, 0.8]]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    emb = EvalEmbeddings(glob, glob, views, text, [0, 0, 0], [[0, 1, 2]])
    assert torch.allclose(mode_similarity(emb, "max-response"), torch.tensor([[1.0, 1.0, 1.0]]))
    assert torch.allclose(mode_similarity(emb, "global"), torch.tensor([[1.0, 0.0, 0.6]]))
