import json
import shutil
from pathlib import Path

import torch

from mpsclip.cli import main
from mpsclip.data.annotations import load_eval
from mpsclip.data.synth import dataset_paths, generate
from mpsclip.evaluate import EvalEmbeddings, embed_eval_set, mode_similarity
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
    emb = EvalEmbeddings(glob, glob, views, torch.ones(1, 2, dtype=torch.bool), text, [0, 0, 0], [[0, 1, 2]])
    assert torch.allclose(mode_similarity(emb, "max-response"), torch.tensor([[1.0, 1.0, 1.0]]))
    assert torch.allclose(mode_similarity(emb, "global"), torch.tensor([[1.0, 0.0, 0.6]]))


def test_an_image_without_sub_images_is_ranked_by_its_global_embedding():
    """Image 0 has no sub-images: its perspectives (made from its global embedding) are invalid and must not win
    the max, as in 'mpsclip search'. Counting them ranked image 0 first for the text; image 1's valid perspective
    (0.8) beats image 0's global embedding (0.6)."""
    glob = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    views = torch.tensor([[[1.0, 0.0]], [[0.8, 0.6]]])
    valid = torch.tensor([[False], [True]])
    text = torch.tensor([[1.0, 0.0]])
    emb = EvalEmbeddings(glob, glob, views, valid, text, [0], [[0], []])
    assert torch.allclose(mode_similarity(emb, "max-response"), torch.tensor([[0.6], [0.8]]))
    counted = EvalEmbeddings(glob, glob, views, torch.ones(2, 1, dtype=torch.bool), text, [0], [[0], []])
    assert torch.allclose(mode_similarity(counted, "max-response"), torch.tensor([[1.0], [0.8]]))


def test_eval_embeddings_mark_the_perspectives_of_images_without_sub_images_invalid(tiny_model, tmp_path):
    data = tmp_path / "data"
    generate(data, n_train=1, n_test=3, seed=1, workers=1)
    paths = dataset_paths(data)
    images = load_eval(paths["eval_file"])
    shutil.rmtree(paths["sub_root"] / Path(images[1].image).stem)  # image 1 loses its sub-images
    emb = embed_eval_set(tiny_model, images, paths["image_root"], paths["sub_root"], batch_size=2, progress=False)
    views = emb.perspectives.shape[1]
    assert emb.valid.shape == (3, views) and emb.valid.tolist() == [[True] * views, [False] * views, [True] * views]
