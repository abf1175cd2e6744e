import open_clip
import pytest
import torch

from mpsclip.model import MPSCLIP
from tests.conftest import TINY


def test_adapter_after_every_block(tiny_model):
    for tower in (tiny_model.clip.visual.transformer, tiny_model.clip.transformer):
        assert all(hasattr(block, "g2adapter") for block in tower.resblocks)
    assert len(tiny_model.adapters()) == 4


def test_fresh_model_equals_plain_open_clip():
    torch.manual_seed(0)
    model = MPSCLIP(TINY).eval()
    plain = open_clip.create_model(TINY).eval()
    plain.load_state_dict({k[5:]: v for k, v in model.state_dict().items() if k.startswith("clip.")}, strict=False)
    images = torch.randn(2, 3, 224, 224)
    tokens = model.tokenize(["a harbour with ships", "storage tanks"])
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), plain.encode_image(images, normalize=True), atol=1e-6)
        assert torch.allclose(model.encode_text(tokens), plain.encode_text(tokens, normalize=True), atol=1e-6)


def test_embeddings_shapes_and_norms(tiny_model, batch):
    with torch.no_grad():
        out = tiny_model.embed_all(batch["images"], batch["regions"], batch["mask"])
        glob = tiny_model.encode_image(batch["images"])
    assert out["retrieval"].shape == (3, 64) and out["perspectives"].shape == (3, 4, 64)
    assert torch.allclose(out["global"], glob, atol=1e-6)
    assert torch.allclose(out["retrieval"].norm(dim=-1), torch.ones(3), atol=1e-5)
    # image 2 has no sub-image: zero regions, retrieval == global, perspectives from the global embedding
    assert torch.equal(out["regions"][2], torch.zeros(64))
    assert torch.allclose(out["retrieval"][2], glob[2], atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(out["perspectives"][2], tiny_model.mpr_head(glob[2:3])[0], atol=1e-6)


def test_regions_are_masked_mean(tiny_model, batch):
    with torch.no_grad():
        reg = tiny_model.encode_regions(batch["regions"], batch["mask"])
        subs = tiny_model.encode_image(batch["regions"][0])
        single = tiny_model.encode_image(batch["regions"][1, :1])
    expected0 = torch.nn.functional.normalize(subs.mean(0), dim=-1)
    assert torch.allclose(reg[0], expected0, atol=1e-6)
    assert torch.allclose(reg[1], single[0], atol=1e-6)


def test_public_api_methods_agree(tiny_model, batch):
    with torch.no_grad():
        out = tiny_model.embed_all(batch["images"], batch["regions"], batch["mask"])
        assert torch.allclose(tiny_model.embed_images(**batch), out["retrieval"], atol=1e-6)
        assert torch.allclose(tiny_model.perspectives(**batch), out["perspectives"], atol=1e-6)
        glob, patches = tiny_model.encode_image_tokens(batch["images"])
    assert torch.allclose(glob, out["global"], atol=1e-6)
    assert patches.shape == (3, 49, 64)


def test_only_adapters_and_mpr_train_by_default():
    model = MPSCLIP(TINY)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".g2adapter." in n or n.startswith("mpr_head.") for n in trainable)
    model.freeze_backbone(False)
    assert model.clip.visual.conv1.weight.requires_grad
    assert not model.clip.logit_scale.requires_grad


def test_loss_backward_reaches_adapters_only():
    torch.manual_seed(0)
    model = MPSCLIP(TINY)
    images, regions = torch.randn(2, 3, 224, 224), torch.randn(2, 1, 3, 224, 224)
    mask = torch.tensor([[True], [False]])
    tokens = model.tokenize(["two ships", "a bridge"])
    out = model.loss(images, regions, mask, tokens, torch.tensor([0, 1]))
    assert set(out) == {"contrastive", "triplet", "total"} and out["total"].ndim == 0
    out["total"].backward()
    assert model.clip.visual.transformer.resblocks[0].g2adapter.up_proj.weight.grad is not None
    assert model.mpr_head.heads[0][0].weight.grad is not None
    assert model.clip.visual.conv1.weight.grad is None


def test_random_init_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """A random-init backbone (checkpoints fill it) logs no 'No pretrained weights loaded' warning."""
    import logging

    with caplog.at_level(logging.WARNING):
        MPSCLIP("MPS-Tiny")
    assert not [r for r in caplog.records if "pretrained" in r.getMessage()]
