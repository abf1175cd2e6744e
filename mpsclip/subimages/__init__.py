"""Keyword sub-images: for each image and noun, ``<out>/<image stem>/<noun>_blackbg.png`` = the image with the
noun's region kept and everything else black.

Backends: ``oracle`` (masks shipped with the synthetic set), ``clip-saliency`` (the model's own patch tokens,
no extra weights) and ``langsam`` (segment-geospatial's LangSAM, the paper's segmenter; optional extra).
"""

from __future__ import annotations

from mpsclip.subimages.writer import (
    ImageItem,
    Request,
    Summary,
    load_items,
    mask_iou,
    oracle_pairs,
    shard,
    subimage_path,
    write_subimages,
)

__all__ = [
    "ImageItem",
    "Request",
    "Summary",
    "load_items",
    "mask_iou",
    "oracle_pairs",
    "shard",
    "subimage_path",
    "write_subimages",
]
