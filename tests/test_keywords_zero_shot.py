import json
from pathlib import Path

import pytest
import torch

from mpsclip.cli import main
from mpsclip.data.synth import generate
from mpsclip.errors import MPSCLIPError
from mpsclip.keywords.zero_shot import ZeroShotKeywords, image_keywords, list_images, load_rs_vocabulary


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_zero_shot")
    generate(out, n_train=2, n_test=2, seed=0, workers=1)
    return out


def test_packaged_vocabulary() -> None:
    vocabulary = load_rs_vocabulary()
    assert 120 <= len(vocabulary) <= 200 and len(set(vocabulary)) == len(vocabulary)
    assert {"airport", "runway", "storage tanks", "parking lot", "bridge"} <= set(vocabulary)


def test_nouns_from_images_are_in_vocabulary(synth: Path, tiny_model) -> None:
    vocabulary = load_rs_vocabulary()
    images = list_images(synth / "images")
    records = image_keywords(tiny_model, images, vocabulary, top_k=3, threshold=0.0)
    assert [r["image"] for r in records] == [image.image for image in images] and len(records) == 4
    for record in records:
        assert len(record["nouns"]) == 3 and set(record["nouns"]) <= set(vocabulary)


def test_threshold_and_top_k(tiny_model) -> None:
    scorer = ZeroShotKeywords(tiny_model, ["a", "b", "c"])
    probabilities = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    assert scorer.keywords(probabilities, top_k=2, threshold=0.25) == [["a", "b"], ["c"]]
    assert scorer.keywords(probabilities, top_k=1, threshold=0.9) == [[], []]


def test_cli_from_image_on_annotation(synth: Path, tmp_path: Path, tiny_model) -> None:
    checkpoint = tiny_model.save(tmp_path / "tiny")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("# mine\nrunway\nships\ntrees\ncars\n")
    out = tmp_path / "nouns.json"
    argv = ["keywords", str(synth / "test.json"), "--from-image", "--checkpoint", str(checkpoint), "--out"]
    code = main([*argv, str(out), "--top-k", "2", "--threshold", "0", "--vocabulary-file", str(vocab), "--evaluate"])
    assert code == 0
    records = json.loads(out.read_text())
    assert [r["image"] for r in records] == [r["image"] for r in json.loads((synth / "test.json").read_text())]
    assert all(len(r["nouns"]) == 2 and set(r["nouns"]) <= {"runway", "ships", "trees", "cars"} for r in records)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(MPSCLIPError, match="no images"):
        list_images(tmp_path)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(MPSCLIPError, match="empty"):
        load_rs_vocabulary(tmp_path / "empty.txt")
