"""PriorCLIP (Pan et al., arXiv 2405.10160): a CLIP whose ViT is steered by a ResNet "prior" token.

Image encoding, in eval mode, as the authors' code computes it:

1. prior: ``y = vision_proj_res(res_visual(image))`` (a CLIP-RN50-style ModifiedResNet, then Linear) -> [B, 1, W];
2. ViT stem ``x = visual._embeds(image)`` (patches, class token, positional embedding, ``ln_pre``) -> [B, N, W];
3. belief ``beta = softmax_n(x . y)``; rank weights ``w = 1 / sqrt(argsort(beta, descending) + 1)``;
4. ``x = normalize(x * beta + x * w)`` over the token axis (``belief-only``: ``x * beta`` alone);
5. ``[y, x]`` through the ViT blocks, ``ln_post``, take the prior token, ``@ proj``, L2-normalise.

The text tower is the stock open_clip one. Checkpoints readable: ours (``<stem>.safetensors`` + ``<stem>.json``
with ``"family": "priorclip"``) and the authors' ``{"epoch", "name", "state_dict", ...}`` files, whose keys are
open_clip's CLIP layout plus ``res_visual.*`` and ``vision_proj_res.*`` (optionally under ``module.``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from mpsclip.backbone import create_backbone
from mpsclip.checkpoints import Checkpoint, load_strict, read_checkpoint, save_checkpoint
from mpsclip.distributed import gather_features
from mpsclip.errors import MPSCLIPError
from mpsclip.family import Family

FAMILY = "priorclip"
DEFAULT_ARCH = "ViT-B-32"
BELIEF_MODES = ("rank", "belief-only")
PRIOR_PREFIXES = ("res_visual.", "vision_proj_res.")
LOGIT_SCALE_MAX = 100.0


@dataclass
class PriorCLIPConfig:
    """Everything needed to rebuild a PriorCLIP (saved beside its weights). ``None`` fields are derived:
    ``res_heads = res_width // 2`` (64-dim heads, as CLIP-RN50) and ``res_output_dim`` = the CLIP embed dim."""

    arch: str = DEFAULT_ARCH
    belief_weighting: str = "rank"
    res_layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    res_width: int = 64
    res_heads: int | None = None
    res_output_dim: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["res_layers"] = list(self.res_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PriorCLIPConfig:
        data = dict(data)
        if "res_layers" in data:
            data["res_layers"] = tuple(int(n) for n in data["res_layers"])
        return cls(**data)


class PriorCLIP(nn.Module):
    """open_clip CLIP (``clip``) + ModifiedResNet prior branch (``res_visual``) + ``vision_proj_res``."""

    def __init__(
        self,
        arch: str = DEFAULT_ARCH,
        belief_weighting: str = "rank",
        res_layers: Sequence[int] = (3, 4, 6, 3),
        res_width: int = 64,
        res_heads: int | None = None,
        res_output_dim: int | None = None,
        *,
        pretrained: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if belief_weighting not in BELIEF_MODES:
            raise MPSCLIPError(f"belief_weighting {belief_weighting!r} is unknown; choose from {BELIEF_MODES}")
        if len(res_layers) != 4:
            raise MPSCLIPError(f"res_layers must give 4 stage depths, got {list(res_layers)}")
        layers = (int(res_layers[0]), int(res_layers[1]), int(res_layers[2]), int(res_layers[3]))
        self.family = FAMILY
        self.supports_perspectives = False
        self.config = PriorCLIPConfig(arch, belief_weighting, layers, res_width, res_heads, res_output_dim)
        self.clip = create_backbone(arch, pretrained, cache_dir)
        self.res_visual = ModifiedResNet(
            layers=list(layers),
            output_dim=self.res_output_dim,
            heads=res_heads if res_heads is not None else res_width // 2,
            image_size=self.image_size,
            width=res_width,
        )
        self.vision_proj_res = nn.Linear(self.res_output_dim, self.vision_width)
        self._tokenizer = open_clip.get_tokenizer(arch)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        arch: str | None = None,
        belief_weighting: str | None = None,
        map_location: str = "cpu",
        trust_checkpoint: bool = False,
    ) -> PriorCLIP:
        """Ours (``.safetensors`` + ``.json``) or the authors' ``.pth`` (``state_dict``, ``module.`` prefix).
        ``belief_weighting=None``: the saved mode for ours, ``"rank"`` for the authors' files. ``trust_checkpoint``:
        also a TorchScript archive (it runs code when loaded)."""
        checkpoint = read_checkpoint(path, map_location, trust_checkpoint)
        if not claims(checkpoint):
            raise MPSCLIPError(
                f"{checkpoint.path}: no res_visual.* / vision_proj_res.* keys and no priorclip config, so not a "
                "PriorCLIP checkpoint; load it with mpsclip.load_model instead"
            )
        return build(checkpoint, arch, belief_weighting)

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json`` atomically; returns the weights path."""
        return save_checkpoint(self, self.config_dict(), FAMILY, path)

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def perspectives(self, images: torch.Tensor, regions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise MPSCLIPError("PriorCLIP has no MPR perspectives; use mode 'global' (or an MPS-CLIP checkpoint)")

    def optimize(self, precision: str = "fp16") -> PriorCLIP:
        """PriorCLIP has no fast runtime yet: the eager model itself (callers cast inputs to its precision)."""
        return self

    # ----------------------------------------------------------------- sizes
    @property
    def embed_dim(self) -> int:
        return int(self.clip.text_projection.shape[1])

    @property
    def vision_width(self) -> int:
        return int(self.clip.visual.proj.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.clip.visual.image_size[0])

    @property
    def logit_scale(self) -> torch.Tensor:
        """The backbone's learned temperature, exponentiated and clamped as the authors' loss does."""
        return self.clip.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)

    @property
    def res_output_dim(self) -> int:
        return self.config.res_output_dim if self.config.res_output_dim is not None else self.embed_dim

    # ----------------------------------------------------------------- towers
    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        return self._tokenizer(texts)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def prior_token(self, images: torch.Tensor) -> torch.Tensor:
        """Step 1: the ResNet prior projected to the ViT width, [B, 1, W]."""
        return self.vision_proj_res(self.res_visual(images)).unsqueeze(1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, D] (steps 1-5 of the module docstring)."""
        visual = self.clip.visual
        prior = self.prior_token(images)
        tokens = belief_weight(visual._embeds(images), prior, self.config.belief_weighting)
        x = visual.transformer(torch.cat([prior, tokens], dim=1))
        pooled = visual.ln_post(x)[:, 0]
        return F.normalize(pooled @ visual.proj, dim=-1)

    def embed_all(
        self,
        images: torch.Tensor,
        regions: torch.Tensor,
        mask: torch.Tensor,
        encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The MPS-CLIP evaluation interface: PriorCLIP has no sub-image branch, so every mode scores with
        the global embedding (``regions`` and ``mask`` are ignored); ``encode`` replaces the image tower."""
        glob = (encode or self.encode_image)(images)
        return {"global": glob, "regions": torch.zeros_like(glob), "retrieval": glob, "perspectives": glob[:, None]}

    # ----------------------------------------------------------------- objective
    def forward(self, images: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same as :meth:`loss` (``forward`` is what DistributedDataParallel wraps)."""
        return self.loss(images, tokens, labels)

    def loss(self, images: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"contrastive", "affiliation", "total"}``; features are gathered across DDP ranks first."""
        image = gather_features(self.encode_image(images))
        text = gather_features(self.encode_text(tokens))
        labels = gather_features(labels.view(-1).to(image.device))
        scale = self.logit_scale
        contrastive = contrastive_loss(image, text, scale)
        affiliation = affiliation_loss(image, text, labels, scale)
        return {"contrastive": contrastive, "affiliation": affiliation, "total": contrastive + affiliation}


# --------------------------------------------------------------------- the belief step and the losses
def belief_weight(x: torch.Tensor, prior: torch.Tensor, mode: str = "rank") -> torch.Tensor:
    """Steps 3-4: reweight the ViT tokens ``x`` [B, N, W] by their belief w.r.t. ``prior`` [B, 1, W].

    ``w`` is ``1 / sqrt(pi + 1)`` with ``pi`` the descending-sort permutation itself (as the authors' code
    does), not each token's rank. The result is L2-normalised over the token axis (dim 1)."""
    belief = torch.softmax(torch.sum(x * prior, dim=2), dim=1)  # [B, N]
    weighted = x * belief.unsqueeze(2)
    if mode == "rank":
        order = torch.sort(belief, dim=1, descending=True).indices
        weighted = weighted + x * torch.rsqrt(order.to(x.dtype) + 1).unsqueeze(2)
    elif mode != "belief-only":
        raise MPSCLIPError(f"belief_weighting {mode!r} is unknown; choose from {BELIEF_MODES}")
    return F.normalize(weighted, dim=1)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP InfoNCE on matching rows."""
    logits = scale * image @ text.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def class_centres(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Row i = mean of the features of every sample sharing sample i's label, [B, D]."""
    same = (labels.view(-1, 1) == labels.view(1, -1)).to(features.dtype)
    return (same @ features) / same.sum(dim=1, keepdim=True)


def affiliation_loss(
    image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Images against their class's text centres and texts against image centres, diagonal targets, averaged."""
    targets = torch.arange(image.shape[0], device=image.device)
    img_to_text = F.cross_entropy(scale * image @ class_centres(text, labels).t(), targets)
    text_to_img = F.cross_entropy(scale * text @ class_centres(image, labels).t(), targets)
    return 0.5 * (img_to_text + text_to_img)


def class_labels_from_filenames(names: Iterable[str | Path]) -> torch.Tensor:
    """Class index per image, the class being the file name before its first ``_`` (``airport_12.tif`` ->
    ``airport``; a name without ``_`` is its own stem). Indices follow first appearance."""
    classes: dict[str, int] = {}
    labels = []
    for name in names:
        stem = Path(name).stem
        if not stem:
            raise MPSCLIPError(f"image file name {str(name)!r} is empty; cannot derive its class")
        labels.append(classes.setdefault(stem.split("_", 1)[0], len(classes)))
    return torch.tensor(labels, dtype=torch.long)


# --------------------------------------------------------------------- checkpoints
def is_priorclip_state(keys: Iterable[str]) -> bool:
    """True when a state dict's keys hold the prior branch (``res_visual.*`` / ``vision_proj_res.*``, with or
    without a ``module.`` or ``clip.`` prefix)."""
    for key in keys:
        for prefix in ("module.", "clip."):
            key = key[len(prefix) :] if key.startswith(prefix) else key
        if key.startswith(PRIOR_PREFIXES):
            return True
    return False


def claims(checkpoint: Checkpoint) -> bool:
    """Ours saved as PriorCLIP, or a foreign state dict with the prior branch."""
    if checkpoint.family is not None:
        return checkpoint.family == FAMILY
    return checkpoint.kind == "backbone" and is_priorclip_state(checkpoint.state)


def build(checkpoint: Checkpoint, arch: str | None = None, belief_weighting: str | None = None) -> PriorCLIP:
    """A PriorCLIP filled strictly from ``checkpoint``. For foreign files the prior branch's size (stage depths,
    width, output dim) is read from the tensors themselves; ``belief_weighting=None`` keeps the saved mode
    (``"rank"`` for foreign files)."""
    if checkpoint.kind == "ours":
        try:
            config = PriorCLIPConfig.from_dict(checkpoint.config)
        except (KeyError, TypeError) as err:
            raise MPSCLIPError(f"{checkpoint.path.with_suffix('.json')}: not a PriorCLIP config ({err})") from err
        checkpoint.check_arch(config.arch, arch)
        if belief_weighting is not None:
            config.belief_weighting = belief_weighting
        model = PriorCLIP(**config.to_dict())
        state = checkpoint.state
    else:
        shape = _res_shape(checkpoint.state, checkpoint.path)
        model = PriorCLIP(arch or DEFAULT_ARCH, belief_weighting or "rank", **shape)
        state = {k if k.startswith(PRIOR_PREFIXES) else f"clip.{k}": v for k, v in checkpoint.state.items()}
    load_strict(model, state, checkpoint.path, require_adapters=True, arch=model.config.arch)
    return model.eval()


def _res_shape(state: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """ModifiedResNet hyper-parameters read from its tensors, so a wrong guess cannot mis-shape the model."""
    try:
        width = int(state["res_visual.conv3.weight"].shape[0])
        output_dim = int(state["res_visual.attnpool.c_proj.weight"].shape[0])
    except KeyError as err:
        raise MPSCLIPError(f"{path}: PriorCLIP key {err.args[0]} is missing; the file is incomplete") from err
    layers = []
    for stage in range(1, 5):
        prefix = f"res_visual.layer{stage}."
        blocks = {k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)}
        if not blocks:
            raise MPSCLIPError(f"{path}: no {prefix}* keys; the PriorCLIP prior branch is incomplete")
        layers.append(len(blocks))
    return {"res_layers": tuple(layers), "res_width": width, "res_output_dim": output_dim}


def create(arch: str = DEFAULT_ARCH, pretrained: str | None = None, **options: Any) -> PriorCLIP:
    return PriorCLIP(arch, pretrained=pretrained, **options)


FAMILY_ENTRY = Family(FAMILY, create=create, claims=claims, build=build)
"""PriorCLIP in the family registry (:mod:`mpsclip.factory`)."""
