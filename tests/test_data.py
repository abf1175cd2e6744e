import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mpsclip.data.annotations import EvalImage, TrainRecord, load_eval, load_train, sub_image_paths
from mpsclip.data.collate import collate
from mpsclip.data.datasets import EvalImageDataset, Sample, TrainDataset
from mpsclip.data.transforms import CLIP_MEAN, CLIP_STD, eval_transform, train_transform
from mpsclip.errors import MPSCLIPError

RSITMD = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsitmd"
SIZE = 32

TRAIN = [
    {
        "caption": "Two Ships, near a pier.",
        "image": "train/harbor_1.png",
        "image_id": 0,
        "label_name": "harbor",
        "label": 1,
        "nouns": ["ships", "pier", "ships"],
    },
    {"caption": "A green field.", "image": "train/farmland_2.png", "image_id": 1},
]
EVAL = [{"image": "test/harbor_3.png", "caption": ["Ships!", "a pier"], "nouns": ["ships", "pier"]}]


def _write(tmp_path: Path, data: object, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _image(path: Path, value: int = 128, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (20, 24), value if mode == "L" else (value, value, value)).save(path)
    return path


# ----------------------------------------------------------------------------------------- loaders


def test_load_train_normalises_and_keeps_fields(tmp_path: Path) -> None:
    records = load_train(_write(tmp_path, TRAIN))
    assert records[0] == TrainRecord(
        caption="two ships near a pier",
        image="train/harbor_1.png",
        image_id=0,
        label_name="harbor",
        label=1,
        nouns=("ships", "pier", "ships"),
    )
    assert records[1] == TrainRecord(caption="a green field", image="train/farmland_2.png", image_id=1)


def test_load_eval(tmp_path: Path) -> None:
    (image,) = load_eval(_write(tmp_path, EVAL))
    assert image == EvalImage(
        image="test/harbor_3.png", captions=("ships", "a pier"), nouns=("ships", "pier")
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"caption": "a"}', r"not valid JSON at line 1, column 18"),
        ('{"caption": "a"}', r"expected a JSON list of records at top level, found dict"),
        ('[{"image": "a.png", "image_id": 1}]', r"record 0 is missing key 'caption'"),
        (
            '[{"caption": "a", "image": "a.png", "image_id": "x"}]',
            r"record 0: 'image_id' is str 'x', expected int",
        ),
        (
            '[{"caption": "a", "image": "a", "image_id": 1}, {"caption": "?!", "image": "b", "image_id": 2}]',
            r"record 1: caption '\?!' is empty after normalisation",
        ),
        (
            '[{"caption": "a", "image": "a.png", "image_id": 1, "nouns": [1]}]',
            r"'nouns' must be a list of strings",
        ),
        ("[3]", r"record 0 is int, expected a JSON object"),
    ],
)
def test_load_train_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(MPSCLIPError, match=rf"bad\.json: .*{message}"):
        load_train(path)


def test_load_errors_for_missing_file_and_bad_eval_captions(tmp_path: Path) -> None:
    with pytest.raises(MPSCLIPError, match=r"nope\.json: annotation file not found"):
        load_train(tmp_path / "nope.json")
    with pytest.raises(MPSCLIPError, match=r"record 0: 'caption' is an empty list"):
        load_eval(_write(tmp_path, [{"image": "a.png", "caption": []}]))
    with pytest.raises(MPSCLIPError, match=r"record 0 caption 1: caption '\.' is empty"):
        load_eval(_write(tmp_path, [{"image": "a.png", "caption": ["ok", "."]}]))
    with pytest.raises(MPSCLIPError, match=r"record 0: 'caption' is str 'x', expected list"):
        load_eval(_write(tmp_path, [{"image": "a.png", "caption": "x"}]))


def test_sub_image_paths_distinct_in_order_and_only_existing(tmp_path: Path) -> None:
    folder = tmp_path / "harbor_1"
    for noun in ("pier", "ships"):
        _image(folder / f"{noun}_blackbg.png")
    found = sub_image_paths(tmp_path, "train/harbor_1.tif", ["ships", "water", "pier", "ships"])
    assert found == [folder / "ships_blackbg.png", folder / "pier_blackbg.png"]


def test_real_rsitmd_annotations_load() -> None:
    if not RSITMD.is_dir():
        pytest.skip(f"{RSITMD} not present")
    train = load_train(RSITMD / "rsitmd_train.json")
    assert len(train) > 10000 and all(r.caption for r in train)
    test = load_eval(RSITMD / "rsitmd_test1.json")
    assert all(len(t.captions) == 5 and t.nouns for t in test)
    assert all(v.label_name for v in load_eval(RSITMD / "rsitmd_val.json"))


# -------------------------------------------------------------------------------------- transforms


def test_eval_transform_resizes_converts_and_normalises() -> None:
    out = eval_transform(SIZE)(Image.new("L", (50, 40), 255))
    assert out.shape == (3, SIZE, SIZE)
    expected = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-4)


def test_train_transform_shape() -> None:
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    assert train_transform(SIZE)(image.convert("RGBA")).shape == (3, SIZE, SIZE)


# ---------------------------------------------------------------------------------------- datasets


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    _image(tmp_path / "img" / "train" / "harbor_1.png", 100)
    _image(tmp_path / "img" / "train" / "farmland_2.png", 50, mode="L")
    _image(tmp_path / "img" / "test" / "harbor_3.png", 60)
    _image(tmp_path / "sub" / "harbor_1" / "ships_blackbg.png", 10)
    _image(tmp_path / "sub" / "harbor_1" / "pier_blackbg.png", 20)
    _image(tmp_path / "sub" / "harbor_3" / "pier_blackbg.png", 30)
    return tmp_path


def test_train_dataset_items(tmp_path: Path, tree: Path) -> None:
    records = load_train(_write(tmp_path, TRAIN))
    ds = TrainDataset(records, tree / "img", tree / "sub", eval_transform(SIZE))
    first, second = ds[0], ds[1]
    assert first.image.shape == (3, SIZE, SIZE) and first.regions.shape == (2, 3, SIZE, SIZE)
    assert (first.caption, first.image_id) == ("two ships near a pier", 0)
    assert second.regions.shape == (0, 3, SIZE, SIZE)
    assert (
        len(
            TrainDataset(records, tree / "img", tree / "sub", eval_transform(SIZE), max_sub_images=1)[
                0
            ].regions
        )
        == 1
    )
    assert len(TrainDataset(records, tree / "img", None, eval_transform(SIZE))[0].regions) == 0


def test_eval_dataset_items(tmp_path: Path, tree: Path) -> None:
    ds = EvalImageDataset(load_eval(_write(tmp_path, EVAL)), tree / "img", tree / "sub", eval_transform(SIZE))
    item = ds[0]
    assert item.caption is None and item.image_id == 0 and item.regions.shape == (1, 3, SIZE, SIZE)


def test_missing_or_unreadable_image_raises_naming_file(tmp_path: Path, tree: Path) -> None:
    records = [TrainRecord("a", "train/gone.png", 5), TrainRecord("b", "train/broken.png", 6)]
    (tree / "img" / "train" / "broken.png").write_bytes(b"not a png")
    ds = TrainDataset(records, tree / "img", transform=eval_transform(SIZE))
    with pytest.raises(MPSCLIPError, match=r"gone\.png: image not found"):
        ds[0]
    with pytest.raises(MPSCLIPError, match=r"broken\.png: cannot read image"):
        ds[1]


def test_skip_bad_images_filters_and_counts(tmp_path: Path, tree: Path) -> None:
    (tree / "img" / "train" / "broken.png").write_bytes(b"not a png")
    records = [
        TrainRecord("a", "train/gone.png", 5),
        TrainRecord("b", "train/harbor_1.png", 6),
        TrainRecord("c", "train/broken.png", 7),
        TrainRecord("d", "train/gone.png", 5),
    ]
    ds = TrainDataset(records, tree / "img", transform=eval_transform(SIZE), skip_bad_images=True)
    assert len(ds) == 1 and ds[0].image_id == 6 and ds.num_skipped == 3
    assert sorted(p.name for p in ds.bad_images) == ["broken.png", "gone.png"]
    images = [EvalImage("test/gone.png", ("a",)), EvalImage("test/harbor_3.png", ("b",))]
    eval_ds = EvalImageDataset(images, tree / "img", transform=eval_transform(SIZE), skip_bad_images=True)
    assert len(eval_ds) == 1 and eval_ds[0].image_id == 1 and eval_ds.num_skipped == 1


def test_unreadable_sub_image_is_skipped_with_warning(tmp_path: Path, tree: Path) -> None:
    (tree / "sub" / "harbor_1" / "ships_blackbg.png").write_bytes(b"garbage")
    ds = TrainDataset(load_train(_write(tmp_path, TRAIN)), tree / "img", tree / "sub", eval_transform(SIZE))
    with pytest.warns(UserWarning, match=r"ships_blackbg\.png"):
        item = ds[0]
    assert item.regions.shape == (1, 3, SIZE, SIZE)


# ----------------------------------------------------------------------------------------- collate


def _sample(n_regions: int, image_id: int, caption: str | None = "x") -> Sample:
    regions = torch.full((n_regions, 3, 4, 4), float(image_id + 1))
    return Sample(torch.zeros(3, 4, 4), regions, caption, image_id)


def test_collate_pads_and_masks() -> None:
    batch = collate([_sample(2, 0), _sample(0, 1), _sample(3, 2)])
    assert batch.images.shape == (3, 3, 4, 4) and batch.regions.shape == (3, 3, 3, 4, 4)
    assert batch.mask.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert batch.regions[0, 2].abs().sum() == 0 and torch.all(batch.regions[2] == 3.0)
    assert batch.captions == ["x", "x", "x"] and batch.image_ids.tolist() == [0, 1, 2]


def test_collate_cap_and_no_regions() -> None:
    capped = collate([_sample(2, 0), _sample(5, 1)], max_regions=3)
    assert capped.regions.shape == (2, 3, 3, 4, 4) and capped.mask.sum(1).tolist() == [2, 3]
    empty = collate([_sample(0, 0, None), _sample(0, 1, None)])
    assert empty.regions.shape == (2, 0, 3, 4, 4) and empty.mask.shape == (2, 0) and empty.captions is None
    with pytest.raises(ValueError, match="mix"):
        collate([_sample(0, 0), _sample(0, 1, None)])
