"""The model factory: family registry, create_model / load_model, the RetrievalModel protocol."""

import json
import subprocess
import sys

import pytest
import torch

import mpsclip
from mpsclip import factory
from mpsclip.errors import MPSCLIPError
from mpsclip.factory import Family, create_model, families, get_family, load_model
from mpsclip.family import RetrievalModel
from mpsclip.model import MPSCLIP
from mpsclip.priorclip import PriorCLIP
from tests.conftest import TINY
from tests.test_checkpoints import authors_state

PRIOR_TINY = "PriorCLIP-Tiny"


def test_both_families_are_registered_and_fallback_comes_last():
    names = [family.name for family in families()]
    assert set(names) == {"mpsclip", "priorclip"}
    assert names[-1] == "mpsclip"  # it claims any foreign backbone, so it is asked last


def test_create_model_builds_each_family_and_both_follow_the_protocol():
    mps = create_model(TINY)
    prior = create_model(PRIOR_TINY, family="priorclip", res_layers=(1, 1, 1, 1), res_width=8)
    assert isinstance(mps, MPSCLIP) and isinstance(prior, PriorCLIP)
    for model in (mps, prior):
        assert isinstance(model, RetrievalModel)
        tokens = model.tokenize(["a harbour"])
        assert model.encode_text(tokens).shape == (1, model.embed_dim)
    assert mps.supports_perspectives and not prior.supports_perspectives
    with pytest.raises(MPSCLIPError, match="no MPR perspectives"):
        prior.perspectives(torch.zeros(1), torch.zeros(1), torch.zeros(1))


def test_unknown_family_is_a_clear_error():
    with pytest.raises(MPSCLIPError, match="model family 'nope' is unknown; known families"):
        get_family("nope")


def test_one_save_path_records_the_family_and_load_dispatches_on_it(tmp_path):
    torch.manual_seed(0)
    prior = create_model(PRIOR_TINY, family="priorclip", res_layers=(1, 1, 1, 1), res_width=8).eval()
    weights = prior.save(tmp_path / "prior")
    assert json.loads(weights.with_suffix(".json").read_text())["family"] == "priorclip"
    loaded = load_model(weights)
    assert isinstance(loaded, PriorCLIP)
    for key, value in prior.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with pytest.raises(MPSCLIPError, match="saved as a priorclip model, not MPS-CLIP; use mpsclip.load_model"):
        MPSCLIP.from_checkpoint(weights)


def test_saved_family_that_is_unknown_is_refused(ckpt, tmp_path):
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    meta["family"] = "other"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(ckpt.read_bytes())
    bad.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(MPSCLIPError, match="'other' is unknown"):
        load_model(bad)


def test_public_api_exposes_the_factory(ckpt):
    assert isinstance(mpsclip.load_model(ckpt), MPSCLIP)
    assert mpsclip.create_model is create_model


def test_checkpoint_files_module_imports_no_model():
    code = "import sys, mpsclip.checkpoints; print(sorted(m for m in sys.modules if m.startswith('mpsclip')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "mpsclip.model" not in out and "mpsclip.priorclip" not in out and "mpsclip.factory" not in out


def test_load_model_dispatches_on_the_saved_family_to_a_registered_one(ckpt, tmp_path, monkeypatch):
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    meta["family"] = "toy"
    toy = tmp_path / "toy.safetensors"
    toy.write_bytes(ckpt.read_bytes())
    toy.with_suffix(".json").write_text(json.dumps(meta))
    built, sentinel = [], object()

    def build(checkpoint, arch=None):
        built.append((checkpoint.path, checkpoint.kind, arch))
        return sentinel

    monkeypatch.setitem(factory._REGISTRY, "toy", Family("toy", create=MPSCLIP, claims=lambda c: False, build=build))
    assert load_model(toy, arch=TINY) is sentinel
    assert built == [(toy, "ours", TINY)]


def test_foreign_files_load_through_the_factory(tiny_model, tmp_path):
    authors = tmp_path / "checkpoint_best.pth"
    torch.save({"model": authors_state(tiny_model), "config": {"is_mps": True}}, authors)
    loaded = load_model(authors, arch=TINY)
    assert isinstance(loaded, MPSCLIP)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_a_bad_file_names_the_file_and_the_first_keys(tiny_model, tmp_path):
    state = authors_state(tiny_model)
    state["model.visual.extra_head.weight"] = torch.zeros(2)
    path = tmp_path / "extra.pth"
    torch.save({"model": state}, path)
    with pytest.raises(MPSCLIPError, match=r"extra\.pth: .*unexpected keys, e\.g\. clip\.visual\.extra_head\.weight"):
        load_model(path, arch=TINY)
