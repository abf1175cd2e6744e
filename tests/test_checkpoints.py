import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from mpsclip.adapters import sinusoidal_table
from mpsclip.checkpoints import read_checkpoint
from mpsclip.errors import MPSCLIPError
from mpsclip.model import MPSCLIP
from tests.conftest import TINY


def authors_state(model: MPSCLIP) -> dict[str, torch.Tensor]:
    """The model's weights in the authors' layout, PE tables included as they store them."""
    state = {}
    for key, value in model.state_dict().items():
        state["model." + key[5:] if key.startswith("clip.") else key] = value.clone()
    for key in [k for k in state if k.endswith("global_attention.attn.attn_in_norm.weight")]:
        state[key.replace("attn_in_norm.weight", "pos_enc.pe")] = sinusoidal_table(10000, 128).unsqueeze(0)
    return state


def _outputs(model, batch):
    with torch.no_grad():
        out = model.embed_all(batch["images"], batch["regions"], batch["mask"])
        out["text"] = model.encode_text(model.tokenize(["storage tanks by the harbour", "a runway"]))
    return out


def _assert_same(a, b):
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_ours_round_trip(tiny_model, batch, tmp_path):
    path = tiny_model.save(tmp_path / "model")
    assert path.name == "model.safetensors" and (tmp_path / "model.json").exists()
    assert not any("pos_enc" in k for k in load_file(str(path)))
    assert json.loads((tmp_path / "model.json").read_text())["config"]["arch"] == TINY
    loaded = MPSCLIP.from_checkpoint(path).eval()
    _assert_same(_outputs(tiny_model, batch), _outputs(loaded, batch))


def test_authors_layout_loads(tiny_model, batch, tmp_path):
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": authors_state(tiny_model), "config": {"is_mps": True, "temp1": 0.07}}, path)
    loaded = MPSCLIP.from_checkpoint(path, arch=TINY).eval()
    _assert_same(_outputs(tiny_model, batch), _outputs(loaded, batch))


def test_authors_checkpoint_with_numpy_scalars_loads(tiny_model, batch, tmp_path):
    """Their training script stores the epoch and best score as numpy scalars beside the weights."""
    path = tmp_path / "checkpoint_best.pth"
    extras = {"epoch": np.int64(7), "best_rsum": np.float64(412.5), "lr": np.float32(1e-4), "done": np.bool_(True)}
    torch.save({"model": authors_state(tiny_model), "config": {"is_mps": True}, **extras}, path)
    loaded = MPSCLIP.from_checkpoint(path, arch=TINY).eval()
    _assert_same(_outputs(tiny_model, batch), _outputs(loaded, batch))


def test_numpy_object_arrays_stay_refused(tiny_model, tmp_path):
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": authors_state(tiny_model), "extra": np.array([print], dtype=object)}, path)
    with pytest.raises(MPSCLIPError, match="holds the Python object numpy"):
        read_checkpoint(path)


def test_backbone_only_open_clip_state_dict(tmp_path, batch):
    torch.manual_seed(4)
    plain = open_clip.create_model(TINY).eval()
    path = tmp_path / "backbone.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in plain.state_dict().items()}}, path)
    loaded = MPSCLIP.from_checkpoint(path, arch=TINY).eval()
    with torch.no_grad():
        expected = plain.encode_image(batch["images"], normalize=True)
        assert torch.allclose(loaded.encode_image(batch["images"]), expected, atol=1e-6)
    assert all(torch.equal(a.up_proj.weight, torch.zeros_like(a.up_proj.weight)) for a in loaded.adapters())


def test_backbone_only_jit_archive(tmp_path, batch):
    torch.manual_seed(5)
    plain = open_clip.create_model(TINY).eval()
    path = tmp_path / "openai.pt"
    traced = torch.jit.trace(_ClipWrapper(plain), batch["images"][:1], check_trace=False)
    traced.save(str(path))
    with pytest.raises(MPSCLIPError, match="TorchScript archive .* runs code"):
        MPSCLIP.from_checkpoint(path, arch=TINY)
    loaded = MPSCLIP.from_checkpoint(path, arch=TINY, trust_checkpoint=True).eval()
    with torch.no_grad():
        assert torch.allclose(
            loaded.encode_image(batch["images"]), plain.encode_image(batch["images"], normalize=True), atol=1e-6
        )


class _ClipWrapper(torch.nn.Module):
    """Mirrors OpenAI's archives: the CLIP's parameters at the top level of the scripted module."""

    def __init__(self, clip):
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)

    def forward(self, image):
        return self.visual(image)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(MPSCLIPError, match="not a checkpoint"):
        MPSCLIP.from_checkpoint(path, arch=TINY)


def test_missing_file(tmp_path):
    with pytest.raises(MPSCLIPError, match="no such checkpoint"):
        MPSCLIP.from_checkpoint(tmp_path / "nope.pth")


def test_wrong_architecture_lists_keys(tiny_model, tmp_path):
    state = authors_state(tiny_model)
    state["model.visual.conv1.weight"] = torch.zeros(8, 3, 32, 32)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    pattern = r"does not fit architecture .*visual\.conv1\.weight \(file \[8, 3, 32, 32\]"
    with pytest.raises(MPSCLIPError, match=pattern):
        MPSCLIP.from_checkpoint(path, arch=TINY)


def test_missing_adapter_keys(tiny_model, tmp_path):
    state = {k: v for k, v in authors_state(tiny_model).items() if "resblocks.1.g2adapter.up_proj" not in k}
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with pytest.raises(MPSCLIPError, match="adapter/MPR keys are missing, e.g. .*resblocks.1.g2adapter.up_proj"):
        MPSCLIP.from_checkpoint(path, arch=TINY)


def test_unexpected_keys(tiny_model, tmp_path):
    state = authors_state(tiny_model)
    state["model.visual.extra_head.weight"] = torch.zeros(2)
    path = tmp_path / "extra.pth"
    torch.save({"model": state}, path)
    with pytest.raises(MPSCLIPError, match="1 unexpected keys, e.g. clip.visual.extra_head.weight"):
        MPSCLIP.from_checkpoint(path, arch=TINY)


def test_ours_without_config(tiny_model, tmp_path):
    path = tiny_model.save(tmp_path / "m")
    (tmp_path / "m.json").unlink()
    with pytest.raises(MPSCLIPError, match="config m.json is missing"):
        MPSCLIP.from_checkpoint(path)


def test_read_checkpoint_tells_the_three_kinds_apart(tiny_model, tmp_path):
    ours = read_checkpoint(tiny_model.save(tmp_path / "ours"))
    assert (ours.kind, ours.family, ours.config["arch"]) == ("ours", "mpsclip", TINY)
    authors = tmp_path / "checkpoint_best.pth"
    torch.save({"model": authors_state(tiny_model)}, authors)
    read = read_checkpoint(authors)
    assert (read.kind, read.family) == ("authors", None)
    assert set(read.state) == set(tiny_model.state_dict())  # already in our key space, PE tables dropped
    backbone = tmp_path / "backbone.pt"
    plain = open_clip.create_model(TINY).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in plain.items()}}, backbone)
    read = read_checkpoint(backbone)
    assert (read.kind, read.family) == ("backbone", None) and "visual.conv1.weight" in read.state
