import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mpsclip.cli import main
from mpsclip.data.annotations import load_eval, load_train, sub_image_paths
from mpsclip.data.synth import CAPTIONS_PER_IMAGE, CLASSES, generate

N_TRAIN, N_VAL, N_TEST = 8, 2, 8


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    summary = generate(out, n_train=N_TRAIN, n_test=N_TEST, n_val=N_VAL, seed=3, image_size=96, workers=1)
    assert (summary.n_train, summary.n_val, summary.n_test) == (N_TRAIN, N_VAL, N_TEST)
    assert summary.n_train_captions == N_TRAIN * CAPTIONS_PER_IMAGE
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_with_any_worker_count(synth: Path, tmp_path: Path) -> None:
    generate(
        tmp_path / "again", n_train=N_TRAIN, n_test=N_TEST, n_val=N_VAL, seed=3, image_size=96, workers=2
    )
    assert _files(tmp_path / "again") == _files(synth)
    generate(tmp_path / "other", n_train=2, n_test=0, seed=4, image_size=96, workers=1)
    other = (tmp_path / "other" / "images" / "airport_0.png").read_bytes()
    assert other != (synth / "images" / "airport_0.png").read_bytes()


def test_annotation_format(synth: Path) -> None:
    raw = json.loads((synth / "train.json").read_text())
    assert set(raw[0]) == {"caption", "image", "image_id", "label_name", "label", "nouns"}
    train = load_train(synth / "train.json")
    assert len(train) == N_TRAIN * CAPTIONS_PER_IMAGE
    assert {r.label_name for r in train} == set(CLASSES)
    for record in train:
        name = Path(record.image).name
        assert record.image.startswith("images/") and (synth / record.image).is_file()
        assert name.split("_")[0] == record.label_name == CLASSES[record.label]
    ids = {r.image: r.image_id for r in train}
    assert sorted(ids.values()) == list(range(N_TRAIN))
    test = load_eval(synth / "test.json")
    assert len(test) == N_TEST and all(len(t.captions) == CAPTIONS_PER_IMAGE and t.nouns for t in test)
    assert len(load_eval(synth / "val.json")) == N_VAL
    names = [Path(e.image).name for e in test] + [Path(r.image).name for r in train]
    assert len(set(names)) == N_TEST + N_TRAIN
    with Image.open(synth / test[0].image) as img:
        assert img.size == (96, 96) and img.mode == "RGB"


def test_captions_name_their_nouns(synth: Path) -> None:
    for record in json.loads((synth / "train.json").read_text()):
        assert record["nouns"], record
        for noun in record["nouns"]:
            assert re.search(rf"\b{noun}\b", record["caption"].lower())
    captions = [c for r in json.loads((synth / "test.json").read_text()) for c in r["caption"]]
    assert len(set(captions)) > len(captions) // 2


def test_masks_match_sub_images(synth: Path) -> None:
    for entry in load_eval(synth / "test.json"):
        stem = Path(entry.image).stem
        nouns = list(dict.fromkeys(entry.nouns or ()))
        subs = sub_image_paths(synth / "subimages", entry.image, nouns)
        assert [p.name for p in subs] == [f"{n}_blackbg.png" for n in nouns]
        image = np.asarray(Image.open(synth / entry.image))
        for noun, sub_path in zip(nouns, subs, strict=True):
            mask = np.asarray(Image.open(synth / "masks" / stem / f"{noun}.png"))
            assert set(np.unique(mask)) <= {0, 255} and mask.any()
            expected = np.where(mask[..., None] > 0, image, 0)
            assert np.array_equal(np.asarray(Image.open(sub_path)), expected)


def test_cli_writes_dataset_and_rejects_bad_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--train", "3", "--test", "1", "--size", "64", "--workers", "1"]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    assert len(load_train(out / "train.json")) == 3 * CAPTIONS_PER_IMAGE
    assert not (out / "val.json").exists()
    assert main(["synth", "--out", str(out), "--test", "-1"]) == 2
    assert "--test must be 0 or more" in capsys.readouterr().err
