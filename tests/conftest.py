from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mpsclip.data.synth import generate
from mpsclip.model import MPSCLIP

TINY = "MPS-Tiny"


def randomize_adapter(adapter: torch.nn.Module, gen: torch.Generator, scale: float = 0.05, gate: float = 0.3) -> None:
    """Non-trivial weights everywhere (``up_proj`` is zero at init): norms near 1, the rest ``scale``-sized."""
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if name == "gate":
                param.fill_(gate)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(scale * torch.randn(param.shape, generator=gen))


def randomize_adapters(model: MPSCLIP, seed: int = 0) -> MPSCLIP:
    """Give every adapter (and the gate) non-trivial weights so tests see them working."""
    gen = torch.Generator().manual_seed(seed)
    for adapter in model.adapters():
        randomize_adapter(adapter, gen)
    return model


@pytest.fixture(scope="session")
def tiny_model() -> MPSCLIP:
    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    return randomize_adapters(MPSCLIP(TINY)).eval()


@pytest.fixture()
def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "images": torch.randn(3, 3, 224, 224, generator=gen),
        "regions": torch.randn(3, 2, 3, 224, 224, generator=gen),
        "mask": torch.tensor([[True, True], [True, False], [False, False]]),
    }


@pytest.fixture(scope="session")
def ckpt(tiny_model: MPSCLIP, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_model`` saved in our format (read-only for tests)."""
    return tiny_model.save(tmp_path_factory.mktemp("ckpt") / "m")


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 64-px synthetic test scenes with captions, masks and sub-images (read-only: copy before changing)."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, n_train=0, n_test=6, seed=0, image_size=64, workers=1)
    return out


@pytest.fixture(scope="session")
def synth_store(synth: Path, ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete store of the six ``synth`` scenes (3 rows a shard, sub-image perspectives), read-only: the search
    and serve tests share it (copy it before changing it)."""
    from mpsclip.archive.job import EmbedSettings, embed_archive

    settings = EmbedSettings(
        perspectives="from-dir", sub_root=synth / "subimages", batch_size=3, shard_size=3, device="cpu"
    )
    out = tmp_path_factory.mktemp("stores") / "s"
    embed_archive(synth / "images", out, ckpt, settings=settings, progress=False)
    return out
