"""``langsam`` backend: segment-geospatial's LangSAM (GroundingDINO boxes from the noun, then SAM masks).

This is the segmenter the paper's sub-images come from, with the authors' thresholds by default (box 0.1,
text 0.24). It needs the optional extra ``pip install 'mpsclip[sam]'`` and a SAM checkpoint: ``--sam-checkpoint
PATH`` or the file in the torch hub cache (``$TORCH_HOME/hub/checkpoints`` or ``~/.cache/torch/hub/checkpoints``,
e.g. ``sam_vit_h_4b8939.pth``). GroundingDINO's weights come from the user's Hugging Face cache.

The dependency check never imports ``samgeo.text_sam`` while ``groundingdino`` is missing: that import would
run ``pip install groundingdino-py`` by itself.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mpsclip.choices import LANGSAM_BOX_THRESHOLD, LANGSAM_TEXT_THRESHOLD
from mpsclip.errors import MPSCLIPError
from mpsclip.subimages.writer import Request

DEFAULT_BOX_THRESHOLD = LANGSAM_BOX_THRESHOLD
DEFAULT_TEXT_THRESHOLD = LANGSAM_TEXT_THRESHOLD
SAM_CHECKPOINTS = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
INSTALL_HINT = "pip install 'mpsclip[sam]'"


def module_available(name: str) -> bool:
    """Whether a top-level module can be imported, found without importing it."""
    return importlib.util.find_spec(name) is not None


def check_installed() -> None:
    """Raise a clear error when segment-geospatial or GroundingDINO is missing (without importing them)."""
    missing = [name for name in ("samgeo", "groundingdino") if not module_available(name)]
    if missing:
        raise MPSCLIPError(
            f"the langsam backend needs segment-geospatial with GroundingDINO (missing: {', '.join(missing)}); "
            f"install the extra: {INSTALL_HINT} (or use --backend clip-saliency)"
        )


def sam_cache_dirs() -> list[Path]:
    """Folders searched for a SAM checkpoint when no ``--sam-checkpoint`` is given."""
    dirs = []
    if os.environ.get("TORCH_HOME"):
        home = Path(os.environ["TORCH_HOME"])
        dirs += [home / "hub" / "checkpoints", home]
    dirs.append(Path.home() / ".cache" / "torch" / "hub" / "checkpoints")
    return list(dict.fromkeys(dirs))


def resolve_sam_checkpoint(path: str | Path | None, model_type: str = "vit_h") -> Path:
    """The given checkpoint file, or the one for ``model_type`` found in the cache; a clear error otherwise."""
    if model_type not in SAM_CHECKPOINTS:
        raise MPSCLIPError(f"unknown SAM model type {model_type!r}; use one of {', '.join(SAM_CHECKPOINTS)}")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MPSCLIPError(f"{path}: SAM checkpoint not found; check --sam-checkpoint")
        return path
    name = SAM_CHECKPOINTS[model_type]
    for folder in sam_cache_dirs():
        if (folder / name).is_file():
            return folder / name
    searched = ", ".join(str(folder) for folder in sam_cache_dirs())
    raise MPSCLIPError(
        f"no SAM checkpoint {name} for model type {model_type!r} in the cache ({searched}); "
        f"download it and pass --sam-checkpoint PATH"
    )


def build_langsam(model_type: str, checkpoint: Path) -> Any:
    """segment-geospatial's LangSAM on a local SAM checkpoint."""
    from samgeo.text_sam import LangSAM  # safe: check_installed() ran first

    if "checkpoint" in inspect.signature(LangSAM.__init__).parameters:
        try:
            return LangSAM(model_type=model_type, checkpoint=str(checkpoint))
        except OSError as err:  # huggingface_hub's LocalEntryNotFoundError is an OSError
            raise MPSCLIPError(
                f"LangSAM could not load GroundingDINO (ShilongLiu/GroundingDINO) or BERT (bert-base-uncased) "
                f"from the Hugging Face hub or its cache ({type(err).__name__}); run once with network access, or "
                "copy a populated ~/.cache/huggingface to this machine"
            ) from err
    raise MPSCLIPError(
        "the installed segment-geospatial's LangSAM cannot take a local SAM checkpoint; "
        "upgrade it: pip install -U 'mpsclip[sam]'"
    )


def union_mask(result: Any, shape: tuple[int, int]) -> np.ndarray:
    """The union of LangSAM's instance masks (``predict(..., return_results=True)``); None means nothing found."""
    if result is None:
        return np.zeros(shape, dtype=bool)
    masks = result[0]
    array = masks.cpu().numpy() if hasattr(masks, "cpu") else np.asarray(masks)
    if array.size == 0:
        return np.zeros(shape, dtype=bool)
    union = array.reshape(-1, *array.shape[-2:]).astype(bool).any(axis=0)
    if union.shape != shape:
        raise ValueError(f"LangSAM gave a mask of shape {union.shape} for an image of shape {shape}")
    return union


class LangSamBackend:
    """One image and one noun at a time through LangSAM."""

    batch_size = 1

    def __init__(
        self,
        sam_checkpoint: str | Path | None = None,
        model_type: str = "vit_h",
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
    ) -> None:
        check_installed()
        checkpoint = resolve_sam_checkpoint(sam_checkpoint, model_type)
        self.model = build_langsam(model_type, checkpoint)
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold

    def segment(self, batch: list[Request]) -> list[dict[str, np.ndarray]]:
        results = []
        for request in batch:
            image = Image.fromarray(request.rgb)
            shape = request.rgb.shape[:2]
            masks = {}
            for noun in request.nouns:
                result = self.model.predict(image, noun, self.box_threshold, self.text_threshold, return_results=True)
                masks[noun] = union_mask(result, shape)
            results.append(masks)
        return results
