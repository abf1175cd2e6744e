"""Zero-shot keywords from the image itself, for archives whose images have no captions.

The paper's protocol derives test-time nouns from the ground-truth captions (the sub-images of a test image are
cut for the nouns of its own captions). A real archive has no captions, so that protocol cannot run on it: this
mode is what to use there. Each image is scored against a remote-sensing noun vocabulary (the packaged
``rs_vocabulary.txt``, or ``--vocabulary-file``) with the model's own text tower and the prompt
``"a satellite image of {noun}"``; the vocabulary's text embeddings are computed once. A noun's score is its
softmax probability over the vocabulary at the model's own logit scale; the ``top_k`` best nouns whose score is
at least ``threshold`` are kept.

Output records: ``{"image": ..., "nouns": [...]}``, ready for ``mpsclip subimages``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mpsclip.choices import PROMPT_TEMPLATE
from mpsclip.data.annotations import read_json_list
from mpsclip.data.transforms import eval_transform
from mpsclip.errors import MPSCLIPError
from mpsclip.family import RetrievalModel

DEFAULT_TEMPLATE = PROMPT_TEMPLATE
DEFAULT_TOP_K = 5
DEFAULT_THRESHOLD = 0.02
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
RS_VOCABULARY = Path(__file__).with_name("rs_vocabulary.txt")


@dataclass(frozen=True)
class ArchiveImage:
    image: str  # the name written to the output record
    path: Path  # on disk


def load_rs_vocabulary(path: str | Path | None = None) -> list[str]:
    """Distinct nouns of a vocabulary file (one per line, ``#`` comments); the packaged list by default."""
    path = Path(path) if path is not None else RS_VOCABULARY
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise MPSCLIPError(f"{path}: cannot read the vocabulary ({err}); pass a UTF-8 file, one noun per line") from err
    nouns = [line.split("#", 1)[0].strip() for line in lines]
    vocabulary = list(dict.fromkeys(noun for noun in nouns if noun))
    if not vocabulary:
        raise MPSCLIPError(f"{path}: the vocabulary is empty; list one noun per line")
    return vocabulary


def list_images(source: str | Path, image_root: str | Path | None = None) -> list[ArchiveImage]:
    """Images of a folder (recursively, sorted; names relative to it) or the distinct images of an annotation file
    (names as written there, found under ``image_root``, default: the file's folder)."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        images = [ArchiveImage(p.relative_to(source).as_posix(), p) for p in paths]
    else:
        root = Path(image_root) if image_root is not None else source.parent
        images = [ArchiveImage(name, root / name) for name in _annotation_images(source)]
    if not images:
        raise MPSCLIPError(f"{source}: no images found; pass a folder of images or an annotation .json")
    return images


def _annotation_images(path: Path) -> list[str]:
    return list(dict.fromkeys(record["image"] for record in read_annotation(path)))


def read_annotation(path: Path) -> list[dict[str, Any]]:
    """Records of an annotation file; each must name its ``image``."""
    data = read_json_list(path)
    if not all(isinstance(r, dict) and isinstance(r.get("image"), str) for r in data):
        raise MPSCLIPError(f"{path}: expected a JSON list of records, each with an 'image' string")
    return data


def reference_nouns_by_image(path: Path) -> dict[str, list[str]]:
    """The nouns an annotation file already has, merged per image (for scoring)."""
    merged: dict[str, dict[str, None]] = {}
    for index, record in enumerate(read_annotation(path)):
        nouns = record.get("nouns")
        if not isinstance(nouns, list):
            raise MPSCLIPError(f"{path}: record {index} has no 'nouns' list to score against")
        merged.setdefault(record["image"], {}).update(dict.fromkeys(str(noun) for noun in nouns))
    return {image: list(nouns) for image, nouns in merged.items()}


class ZeroShotKeywords:
    """Scores images against a fixed vocabulary with a retrieval model of either family (text embeddings
    computed once)."""

    def __init__(
        self,
        model: RetrievalModel,
        vocabulary: list[str],
        template: str = DEFAULT_TEMPLATE,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        if not vocabulary:
            raise MPSCLIPError("the vocabulary is empty; give at least one noun")
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.vocabulary = list(vocabulary)
        self.batch_size = max(1, batch_size)
        self.transform = eval_transform(model.image_size)
        with torch.no_grad():
            tokens = model.tokenize([template.format(noun=noun) for noun in self.vocabulary]).to(self.device)
            self.text = model.encode_text(tokens)
            self.scale = model.logit_scale

    @torch.no_grad()
    def probabilities(self, paths: list[Path]) -> torch.Tensor:
        """[N, V] softmax probabilities over the vocabulary, on the CPU."""
        chunks = []
        for start in range(0, len(paths), self.batch_size):
            images = torch.stack([self._load(path) for path in paths[start : start + self.batch_size]])
            features = self.model.encode_image(images.to(self.device))
            chunks.append((self.scale * features @ self.text.T).softmax(dim=-1).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, len(self.vocabulary))

    def _load(self, path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as image:
                return self.transform(image)
        except FileNotFoundError as err:
            raise MPSCLIPError(f"{path}: image not found; check the folder or --image-root") from err
        except OSError as err:
            raise MPSCLIPError(f"{path}: not a readable image ({err})") from err

    def keywords(self, probabilities: torch.Tensor, top_k: int, threshold: float) -> list[list[str]]:
        """Per image, the ``top_k`` most probable nouns whose probability is at least ``threshold``, best first."""
        k = min(top_k, len(self.vocabulary))
        values, indices = probabilities.topk(k, dim=-1)
        return [
            [self.vocabulary[i] for v, i in zip(row_v.tolist(), row_i.tolist(), strict=True) if v >= threshold]
            for row_v, row_i in zip(values, indices, strict=True)
        ]


def image_keywords(
    model: RetrievalModel,
    images: list[ArchiveImage],
    vocabulary: list[str],
    top_k: int = DEFAULT_TOP_K,
    threshold: float = DEFAULT_THRESHOLD,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """``{"image", "nouns"}`` records for ``images``, in order."""
    if top_k < 1:
        raise MPSCLIPError(f"--top-k must be at least 1, got {top_k}")
    scorer = ZeroShotKeywords(model, vocabulary, device=device, batch_size=batch_size)
    nouns = scorer.keywords(scorer.probabilities([image.path for image in images]), top_k, threshold)
    return [{"image": image.image, "nouns": found} for image, found in zip(images, nouns, strict=True)]
