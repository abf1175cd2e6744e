"""Choice lists and defaults shared by the library and the command line, defined once.

Commands import these for ``choices=`` and ``default=``; library code validates against the same tuples and
uses the same defaults, so a new mode or engine is added in one place. Nothing here imports torch (or anything
but the standard library): ``mpsclip --help`` builds every parser from this module without loading a model.
"""

from __future__ import annotations

MODES = ("fused", "global", "max-response")
"""Retrieval scoring: fused embedding, global embedding only, or max over the MPR perspectives."""

ENGINES = ("torch", "optimized", "onnxruntime", "tensorrt", "aoti")
"""Things that turn pixels or tokens into embeddings (:mod:`mpsclip.engines`)."""

RUNTIMES = ("torch", "onnxruntime", "tensorrt")
"""Engines ``mpsclip embed --engine`` accepts (``torch`` uses the fast runtime on a GPU)."""

SERVE_ENGINES = ("torch", "onnxruntime", "tensorrt", "aoti")
"""Engines ``mpsclip serve --engine`` accepts for the query towers (``torch``: as ``embed``)."""

DECODERS = ("auto", "cpu", "device")
"""JPEG decoding: ``device`` decodes on the embedding GPU (nvJPEG), ``cpu`` with PIL in worker processes."""

PERSPECTIVES = ("none", "zero-shot", "from-dir")
"""Where an archive item's MPR perspectives come from."""

SEARCH_FORMATS = ("table", "json", "geojson", "html")
"""Renderers of ``mpsclip search`` hits."""

EXPORT_FORMATS = ("onnx", "tensorrt", "aoti", "triton-repo")
"""Artefacts ``mpsclip export`` writes."""

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
"""Compute precisions (int8: quantized ONNX towers, ``mpsclip export --format onnx --precision int8``)."""

DEVICES = ("auto", "cpu", "cuda")
"""Usual ``--device`` values (``cuda:N`` is accepted too): ``auto`` picks CUDA when a GPU is visible."""

MODEL_FAMILIES = ("mpsclip", "priorclip")
"""Model families the factory knows (:mod:`mpsclip.factory`)."""

TRITON_BACKENDS = ("onnxruntime", "tensorrt")
"""Backends of the Triton model repository ``mpsclip export --format triton-repo`` writes."""

KEYWORD_BACKENDS = ("lexicon", "llm", "api")
"""Noun extractors of ``mpsclip keywords``."""

SUBIMAGE_BACKENDS = ("oracle", "clip-saliency", "langsam")
"""Sub-image cutters of ``mpsclip subimages``."""

SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b")
"""SAM backbones LangSAM can load."""

PROMPT_TEMPLATE = "a satellite image of {noun}"
"""Text prompt of zero-shot keywords and clip-saliency sub-images; ``{noun}`` is replaced."""

SALIENCY_K = 1.0
"""clip-saliency keeps pixels above mean + k * std of the similarity map."""

LANGSAM_BOX_THRESHOLD = 0.1
LANGSAM_TEXT_THRESHOLD = 0.24
"""The authors' GroundingDINO thresholds for LangSAM sub-images."""
