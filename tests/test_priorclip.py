import json
import math

import pytest
import torch
import torch.nn.functional as F

from mpsclip.errors import MPSCLIPError
from mpsclip.factory import load_model
from mpsclip.priorclip import (
    PriorCLIP,
    affiliation_loss,
    class_labels_from_filenames,
    is_priorclip_state,
)

TINY = "PriorCLIP-Tiny"


def _randomize_batchnorm(model: PriorCLIP, seed: int) -> None:
    """Non-trivial BN statistics and affine weights (random init zeroes bn3 and leaves stats at 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.res_visual.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                module.weight.copy_(1 + 0.2 * torch.randn(n, generator=gen))
                module.bias.copy_(0.1 * torch.randn(n, generator=gen))
                module.num_batches_tracked.fill_(7)


def _tiny(belief_weighting: str = "rank", seed: int = 0) -> PriorCLIP:
    torch.manual_seed(seed)
    model = PriorCLIP(TINY, belief_weighting, res_layers=(1, 1, 1, 1), res_width=8)
    _randomize_batchnorm(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> PriorCLIP:
    return _tiny()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def reference_encode_image(model: PriorCLIP, images: torch.Tensor, mode: str) -> torch.Tensor:
    """The five steps written out from the raw weights (open_clip's ResNet and ViT blocks reused as is)."""
    sd = {k: v for k, v in model.state_dict().items()}
    visual = model.clip.visual
    # 1. prior token
    prior = F.linear(model.res_visual(images), sd["vision_proj_res.weight"], sd["vision_proj_res.bias"])
    prior = prior.reshape(images.shape[0], 1, -1)
    # 2. ViT stem
    patches = F.conv2d(images, sd["clip.visual.conv1.weight"], stride=32)  # [B, W, 7, 7]
    patches = patches.flatten(2).transpose(1, 2)  # [B, 49, W]
    cls = sd["clip.visual.class_embedding"].expand(images.shape[0], 1, -1)
    x = torch.cat([cls, patches], dim=1) + sd["clip.visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["clip.visual.ln_pre.weight"], sd["clip.visual.ln_pre.bias"])
    # 3. belief and rank weights, one image at a time
    out = torch.empty_like(x)
    for b in range(images.shape[0]):
        scores = torch.stack([torch.dot(x[b, n], prior[b, 0]) for n in range(x.shape[1])])
        beta = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
        order = sorted(range(len(beta)), key=lambda n: -float(beta[n]))  # the permutation, not the ranks
        w = torch.tensor([1.0 / math.sqrt(order[n] + 1) for n in range(len(beta))])
        y = x[b] * beta[:, None] + (x[b] * w[:, None] if mode == "rank" else 0)
        # 4. each channel normalised over the tokens
        out[b] = y / y.norm(dim=0, keepdim=True).clamp(min=1e-12)
    # 5. prior token first, blocks, ln_post, prior token out, projection
    h = visual.transformer(torch.cat([prior, out], dim=1))
    h = F.layer_norm(h, h.shape[-1:], sd["clip.visual.ln_post.weight"], sd["clip.visual.ln_post.bias"])
    emb = h[:, 0] @ sd["clip.visual.proj"]
    return emb / emb.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("n", [1, 3])
def test_encode_image_matches_reference(model, images, n):
    rank = _tiny("rank")
    belief_only = _tiny("belief-only")
    with torch.no_grad():
        got_rank = rank.encode_image(images[:n])
        got_belief = belief_only.encode_image(images[:n])
        assert got_rank.shape == (n, 64)
        assert torch.allclose(got_rank, reference_encode_image(rank, images[:n], "rank"), atol=1e-5)
        assert torch.allclose(got_belief, reference_encode_image(belief_only, images[:n], "belief-only"), atol=1e-5)
    assert (got_rank - got_belief).abs().max() > 1e-3


def _authors_checkpoint(model: PriorCLIP, path) -> None:
    state = {"module." + (k[5:] if k.startswith("clip.") else k): v.clone() for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "name": "x", "state_dict": state}, path)


def test_authors_checkpoint_round_trip(model, images, tmp_path):
    path = tmp_path / "epoch_1.pt"
    _authors_checkpoint(model, path)
    loaded = PriorCLIP.from_checkpoint(path, arch=TINY)
    assert loaded.config.res_layers == (1, 1, 1, 1) and loaded.config.res_width == 8
    tokens = model.tokenize(["a harbour with boats", "a runway"])
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-6)
        assert torch.allclose(loaded.encode_text(tokens), model.encode_text(tokens), atol=1e-6)


def test_ours_round_trip_keeps_belief_mode(images, tmp_path):
    original = _tiny("belief-only", seed=2)
    path = original.save(tmp_path / "prior")
    meta = json.loads((tmp_path / "prior.json").read_text())
    assert path.name == "prior.safetensors" and meta["family"] == "priorclip"
    loaded = PriorCLIP.from_checkpoint(path)
    assert loaded.config == original.config
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), original.encode_image(images), atol=1e-6)
    assert isinstance(load_model(tmp_path / "prior.json"), PriorCLIP)


def _save_bad(model: PriorCLIP, path, edit) -> None:
    _authors_checkpoint(model, path)
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt["state_dict"])
    torch.save(ckpt, path)


def test_missing_prior_key(model, tmp_path):
    path = tmp_path / "missing.pt"
    _save_bad(model, path, lambda s: s.pop("module.res_visual.layer2.0.bn1.running_var"))
    with pytest.raises(MPSCLIPError, match=r"1 keys are missing, e\.g\. res_visual\.layer2\.0\.bn1\.running_var"):
        PriorCLIP.from_checkpoint(path, arch=TINY)


def test_unexpected_key(model, tmp_path):
    path = tmp_path / "extra.pt"
    _save_bad(model, path, lambda s: s.update({"module.res_visual.extra.weight": torch.zeros(2)}))
    with pytest.raises(MPSCLIPError, match=r"1 unexpected keys, e\.g\. res_visual\.extra\.weight"):
        PriorCLIP.from_checkpoint(path, arch=TINY)


def test_shape_mismatch(model, tmp_path):
    path = tmp_path / "shape.pt"
    _save_bad(model, path, lambda s: s.update({"module.vision_proj_res.weight": torch.zeros(32, 64)}))
    with pytest.raises(MPSCLIPError, match=r"does not fit .*vision_proj_res\.weight \(file \[32, 64\] vs model \[64"):
        PriorCLIP.from_checkpoint(path, arch=TINY)


def test_not_priorclip_and_bad_mode(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(MPSCLIPError, match="not a PriorCLIP checkpoint"):
        PriorCLIP.from_checkpoint(path)
    with pytest.raises(MPSCLIPError, match="belief_weighting 'soft'"):
        PriorCLIP(TINY, "soft")


def test_is_priorclip_state():
    assert is_priorclip_state(["module.visual.conv1.weight", "module.res_visual.conv1.weight"])
    assert is_priorclip_state(["vision_proj_res.bias"])
    assert not is_priorclip_state(["visual.conv1.weight", "clip.visual.transformer.resblocks.0.g2adapter.gate"])


def test_loss_is_finite_and_sums(model, images):
    tokens = model.tokenize(["airport", "beach", "airport again"])
    labels = class_labels_from_filenames(["airport_1.tif", "beach_2.tif", "airport_7.tif"])
    out = model.loss(images, tokens, labels)
    assert set(out) == {"contrastive", "affiliation", "total"}
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.allclose(out["total"], out["contrastive"] + out["affiliation"])


def test_affiliation_loss_by_hand():
    image = F.normalize(torch.tensor([[1.0, 0, 0], [0.8, 0.6, 0], [0, 1.0, 0], [0, 0.6, 0.8]]), dim=1)
    text = F.normalize(torch.tensor([[1.0, 1, 0], [1.0, 0, 0], [0, 0, 1.0], [0, 1, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    scale = 10.0

    def centre(rows: list[list[float]], i: int) -> list[float]:
        same = [rows[j] for j in range(4) if labels[j] == labels[i]]
        return [sum(r[d] for r in same) / len(same) for d in range(3)]

    def ce(queries: list[list[float]], keys: list[list[float]]) -> float:
        total = 0.0
        for i, q in enumerate(queries):
            logits = [scale * sum(a * b for a, b in zip(q, centre(keys, j), strict=True)) for j in range(4)]
            total += math.log(sum(math.exp(v) for v in logits)) - logits[i]
        return total / 4

    img, txt = image.tolist(), text.tolist()
    expected = 0.5 * (ce(img, txt) + ce(txt, img))
    got = affiliation_loss(image, text, labels, torch.tensor(scale))
    assert math.isclose(float(got), expected, rel_tol=1e-5)


def test_class_labels_from_filenames():
    names = ["airport_1.tif", "beach_2.jpg", "airport_33.tif", "dir/beach_1.png", "00001.jpg"]
    assert class_labels_from_filenames(names).tolist() == [0, 1, 0, 1, 2]
    assert class_labels_from_filenames(names).dtype == torch.long


def test_embed_all_fits_evaluation(model, images):
    from mpsclip.evaluate import EvalEmbeddings, score_all_modes

    with torch.no_grad():
        out = model.embed_all(images, torch.zeros(3, 0, 3, 224, 224), torch.zeros(3, 0, dtype=torch.bool))
        text = model.encode_text(model.tokenize(["a", "b", "c"]))
    assert out["perspectives"].shape == (3, 1, 64) and torch.equal(out["retrieval"], out["global"])
    none = torch.zeros(3, 1, dtype=torch.bool)  # no sub-images: no valid perspective
    emb = EvalEmbeddings(out["global"], out["retrieval"], out["perspectives"], none, text, [0, 1, 2], [[0], [1], [2]])
    results = score_all_modes(emb)
    assert results["fused"] == results["global"] == results["max-response"]


def test_load_model_dispatches_on_the_family(model, tiny_model, tmp_path):
    from mpsclip.model import MPSCLIP

    _authors_checkpoint(model, tmp_path / "prior.pt")
    assert isinstance(load_model(tmp_path / "prior.pt", arch=TINY), PriorCLIP)
    assert isinstance(load_model(tiny_model.save(tmp_path / "mps")), MPSCLIP)


def test_evaluate_cli_on_priorclip_checkpoint(model, tmp_path, capsys):
    from mpsclip.cli import main
    from mpsclip.data.synth import generate

    data = tmp_path / "data"
    generate(data, n_train=1, n_test=3, seed=2, workers=1)
    ckpt = tmp_path / "PriorCLIP_RET-3.pt"
    _authors_checkpoint(model, ckpt)
    out = tmp_path / "res"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--arch", TINY, "--data", str(data), "--out", str(out)]) == 0
    assert "| global |" in capsys.readouterr().out
    assert out.with_suffix(".json").exists()


def test_onnx_export_passes_verification(model, tmp_path, capsys):
    from mpsclip.export.__main__ import main

    ckpt = tmp_path / "PriorCLIP_RET-3.pt"
    _authors_checkpoint(model, ckpt)
    out = tmp_path / "onnx"
    assert main(["--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out), "--arch", TINY]) == 0
    printed = capsys.readouterr().out
    assert "image: max abs error" in printed and (out / "manifest.json").exists()


def test_embed_and_search_an_archive(model, tmp_path, capsys):
    from mpsclip.cli import main
    from mpsclip.data.synth import generate

    data = tmp_path / "data"
    generate(data, n_train=0, n_test=3, seed=4, workers=1)
    ckpt = model.save(tmp_path / "prior")
    store = tmp_path / "store"
    assert main(["embed", str(data / "images"), "--out", str(store), "--checkpoint", str(ckpt), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", str(store), "ships in a harbor", "-k", "2", "--format", "json"]) == 0
    printed = capsys.readouterr().out
    assert printed.count('"rank"') == 2 and "harbor" in printed
    manifest = (store / "manifest.json").read_text()
    assert "priorclip" in manifest.lower()


def test_zero_shot_keywords_take_a_priorclip(model: PriorCLIP, tmp_path) -> None:
    """Either family scores images against a vocabulary; the scale is the clamped one the loss uses."""
    from PIL import Image

    from mpsclip.keywords.zero_shot import ZeroShotKeywords
    from mpsclip.priorclip import LOGIT_SCALE_MAX

    assert torch.equal(model.logit_scale, model.clip.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX))
    path = tmp_path / "tile.png"
    Image.new("RGB", (40, 40), (90, 120, 60)).save(path)
    scorer = ZeroShotKeywords(model, ["forest", "harbour", "runway"])
    probabilities = scorer.probabilities([path])
    assert probabilities.shape == (1, 3) and torch.allclose(probabilities.sum(-1), torch.ones(1))
    assert torch.equal(scorer.scale, model.logit_scale)
