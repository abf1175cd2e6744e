"""``mpsclip.kernels.optimize`` on the CPU: SDPA attention rewrite, fallback warning, cosine to eager."""

import open_clip
import pytest
import torch
from mpsclip.kernels import optimize
from mpsclip.kernels.runtime import SdpaAttention, _is_causal_mask
from torch import nn

from mpsclip.adapters import attach_adapters


def _randomize(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "g2adapter" in name and not name.endswith("gate"):
                offset = 1.0 if "norm.weight" in name else 0.0
                param.copy_(offset + 0.05 * torch.randn(param.shape, generator=gen))


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_attention_matches_multihead_attention(causal):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(3, 7, 32)
    mask = torch.full((7, 7), float("-inf")).triu(1) if causal else None
    assert _is_causal_mask(mask) == causal
    want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    got, _ = SdpaAttention(mha, causal)(x, x, x, need_weights=False, attn_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_optimize_falls_back_on_cpu_and_matches_eager():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-quickgelu").eval()
    attach_adapters(model.visual.transformer)
    attach_adapters(model.transformer)
    _randomize(model, seed=1)
    model.eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(1, 49000, (2, 77), generator=torch.Generator().manual_seed(3))
    tokens[:, 10:] = 0
    tokens[:, 9] = 49407  # end-of-text: the pooled position
    with pytest.warns(UserWarning, match="no CUDA device"):
        fast = optimize(model, precision="fp16")
    assert not fast.kernels and not fast.cuda_graphs and not fast.compiled  # never torch.compile on the CPU
    with torch.no_grad():
        want_img = model.encode_image(images, normalize=True)
        want_txt = model.encode_text(tokens, normalize=True)
    got_img, got_txt = fast.encode_image(images), fast.encode_text(tokens)
    assert torch.isfinite(got_img).all() and torch.isfinite(got_txt).all()
    assert (got_img * want_img).sum(-1).min() > 0.999
    assert (got_txt * want_txt).sum(-1).min() > 0.999
    assert all(isinstance(b.attn, nn.MultiheadAttention) for b in model.transformer.resblocks)  # untouched


def test_mpsclip_optimize_delegates_to_runtime(tiny_model):
    import warnings

    images = torch.randn(2, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = tiny_model.optimize()
    with torch.no_grad():
        cos = (fast.encode_image(images).float() * tiny_model.encode_image(images)).sum(-1)
    assert bool((cos > 0.999).all())
