"""Model files from elsewhere: crafted pickles and TorchScript archives run nothing, export manifests stay in their
folder, and the training CLI answers clearly (empty data, evaluate agreeing with train)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from mpsclip.bench.export import time_tower
from mpsclip.export.manifest import write_manifest

from mpsclip.checkpoints import read_checkpoint
from mpsclip.cli import build_parser, main
from mpsclip.data.synth import generate
from mpsclip.engines.manifest import read_export
from mpsclip.errors import MPSCLIPError
from mpsclip.factory import load_model
from tests.conftest import TINY


class _OpensAFile:
    """Unpickling this calls ``open(marker, "w")``: the file appears if the pickle is ever really unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class _SetstateWrites(torch.nn.Module):
    """A TorchScript module whose ``__setstate__``, run by ``torch.jit.load``, creates the file ``marker``."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.weight = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.marker = state[0]
        self.training = state[2]
        written = torch.from_file(self.marker, shared=True, size=1, dtype=torch.uint8)  # creates the file
        self.weight = state[1] + written.float().sum()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training scenes (40 captions: one batch of the tiny config's 32) and 6 test scenes, 64 px."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, n_train=8, n_test=6, seed=3, image_size=64, workers=1)
    return out


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny config trained one epoch on ``data`` (evaluated on its test split)."""
    out = tmp_path_factory.mktemp("run")
    assert main(_train_args(data, out)) == 0
    return out


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", "tiny", "--data", str(data), "--out", str(out), "--epochs", "1",
            "--num-workers", "0", "--device", "cpu", "--quiet", *extra]


def test_a_crafted_state_pt_runs_nothing_on_resume(data, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "marker"
    out.mkdir()
    torch.save({"epoch": 1, "best": 0.0, "trainable": {}, "payload": _OpensAFile(marker)}, out / "state.pt")
    torch.load(out / "state.pt", weights_only=False)  # the file is really hostile: a plain unpickle opens the marker
    assert marker.exists()
    marker.unlink()
    assert main(_train_args(data, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "state.pt: not a training state" in err and "io.open" in err and "never unpickles" in err
    assert "weights_only" not in err and "Traceback" not in err


def test_state_pt_is_plain_data(trained):
    state = torch.load(trained / "state.pt", weights_only=True)  # tensors, numbers, strings only
    assert state["epoch"] == 1 and isinstance(state["rng"]["numpy"]["key"], torch.Tensor)


def test_a_pickle_that_is_not_a_checkpoint_says_what_it_holds(tmp_path):
    path, marker = tmp_path / "model.pth", tmp_path / "marker"
    torch.save({"state_dict": _OpensAFile(marker)}, path)
    with pytest.raises(MPSCLIPError, match="model.pth: not a checkpoint .* the Python object io.open") as err:
        load_model(path, arch=TINY)
    assert "weights_only" not in str(err.value) and not marker.exists()
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint")
    with pytest.raises(MPSCLIPError, match="notes.pth: not a checkpoint mpsclip can read") as err:
        load_model(text, arch=TINY)
    assert "weights_only" not in str(err.value)


@pytest.fixture(scope="module")
def hostile_jit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("jit")
    marker = folder / "marker"
    torch.jit.script(_SetstateWrites(str(marker))).save(str(folder / "RS5M_ViT-B-32_RET-2.pt"))
    return folder / "RS5M_ViT-B-32_RET-2.pt", marker


def test_a_torchscript_checkpoint_runs_nothing_unless_trusted(hostile_jit, data, tmp_path, capsys):
    path, marker = hostile_jit
    with pytest.raises(MPSCLIPError, match="a TorchScript archive .* runs code it carries.*--trust-checkpoint"):
        load_model(path, arch=TINY)
    argv = ["evaluate", "--checkpoint", str(path), "--arch", TINY, "--data", str(data), "--out", str(tmp_path / "e")]
    assert main(argv) == 2
    assert "pass --trust-checkpoint" in capsys.readouterr().err
    assert not marker.exists()
    # trusted, it is loaded, and so runs its code (which is why it needs the flag); its keys are no CLIP's
    with pytest.raises(MPSCLIPError, match="unexpected keys, e.g. clip.weight"):
        load_model(path, arch=TINY, trust_checkpoint=True)
    assert marker.exists()


def test_a_trusted_torchscript_backbone_still_works(data, tmp_path, capsys):
    torch.manual_seed(5)
    clip = open_clip.create_model(TINY).eval()
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.trace(ClipParameters(clip), torch.randn(1, 3, 224, 224), check_trace=False).save(str(path))
    argv = ["evaluate", "--checkpoint", str(path), "--arch", TINY, "--data", str(data), "--out", str(tmp_path / "e"),
            "--num-workers", "0", "--device", "cpu", "--quiet"]
    assert main(argv) == 2 and "TorchScript" in capsys.readouterr().err
    assert main([*argv, "--trust-checkpoint"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["images"] == 6
    assert read_checkpoint(path, trust_checkpoint=True).kind == "backbone"


class ClipParameters(torch.nn.Module):
    """OpenAI's archive layout: the CLIP's modules and parameters at the top level of the traced module."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def test_every_verb_with_a_checkpoint_takes_trust_checkpoint():
    verbs = build_parser()._subparsers._group_actions[0].choices
    with_checkpoint = {name for name, p in verbs.items() if "--checkpoint" in p._option_string_actions}
    assert {"evaluate", "embed", "search", "serve", "export", "bench"} <= with_checkpoint
    for name in with_checkpoint | {"train"}:
        assert "--trust-checkpoint" in verbs[name]._option_string_actions, name


def _export_folder(folder: Path, file: str) -> Path:
    folder.mkdir(exist_ok=True)
    manifest = {"format": "onnx", "checkpoint": {"sha256": "0" * 64}, "towers": {"image": {"file": file}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink"])
def test_an_export_manifest_names_only_files_inside_its_folder(tmp_path, escape):
    outside = tmp_path / "elsewhere" / "image_encoder.onnx"
    outside.parent.mkdir()
    outside.write_bytes(b"not yours")
    folder = tmp_path / "export"
    folder.mkdir()
    name = {"absolute": str(outside), "dotdot": "../elsewhere/image_encoder.onnx", "symlink": "image_encoder.onnx"}
    if escape == "symlink":
        (folder / "image_encoder.onnx").symlink_to(outside)
    _export_folder(folder, name[escape])
    with pytest.raises(MPSCLIPError, match=r"manifest.json: towers.image.file: .* outside the export folder"):
        read_export(folder, "onnxruntime")
    with pytest.raises(MPSCLIPError, match="towers.image.file"):
        write_manifest(folder, json.loads((folder / "manifest.json").read_text()))
    aoti = {"absolute": str(outside.with_suffix(".pt2")), "dotdot": "../elsewhere/image_encoder.pt2"}
    if escape in aoti:  # bench/export.py reads AOTInductor packages itself: the same check
        outside.with_suffix(".pt2").write_bytes(b"not yours")
        _export_folder(folder, aoti[escape])
        with pytest.raises(MPSCLIPError, match=r"manifest.json: towers.image.file: .* outside the export folder"):
            time_tower(folder, "image", "cpu", [1], warmup=0, repeats=1)


def test_an_export_manifest_inside_its_folder_reads(tmp_path):
    folder = _export_folder(tmp_path / "export", "image_encoder.onnx")
    (folder / "image_encoder.onnx").write_bytes(b"graph")
    assert read_export(folder, "onnxruntime").files == {"image": folder / "image_encoder.onnx"}


def test_train_on_too_little_data_says_so(data, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    argv = _train_args(data, tmp_path / "run", "--train-file", str(empty))
    assert main(argv) == 2
    assert "empty.json: 0 training captions, fewer than one batch of 32" in capsys.readouterr().err
    assert main([*argv[:-2], "--train-file", str(data / "train.json"), "--batch-size", "64"]) == 2
    assert "train.json: 40 training captions, fewer than one batch of 64" in capsys.readouterr().err


def test_evaluate_reports_what_train_reported(data, trained, tmp_path):
    reported = json.loads((trained / "log.jsonl").read_text().splitlines()[-1])["eval"]
    out = tmp_path / "eval"
    argv = ["evaluate", "--checkpoint", str(trained / "last.safetensors"), "--data", str(data), "--out", str(out),
            "--num-workers", "0", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    evaluated = json.loads(out.with_suffix(".json").read_text())["modes"]
    assert evaluated.keys() == reported.keys()
    for mode, figures in reported.items():
        assert evaluated[mode] == pytest.approx(figures, abs=1e-6), mode
