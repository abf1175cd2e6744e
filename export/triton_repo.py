"""Triton Inference Server model repository: ``image_encoder`` and ``text_encoder`` plus a README and a client."""

from __future__ import annotations

from pathlib import Path

from mpsclip.export.towers import input_shape

from mpsclip.errors import MPSCLIPError
from mpsclip.model import MPSCLIP
from mpsclip.triton_config import (
    INPUT_NAMES,
    OUTPUT_NAME,
    DynamicBatching,
    EnsembleStep,
    InstanceGroup,
    TensorSpec,
    TritonModel,
    tower_model,
)

BACKENDS = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}


def model_name(tower: str) -> str:
    return f"{tower}_encoder"


def tower_config(model: MPSCLIP, tower: str, backend: str, *, opt_batch: int, max_batch: int) -> TritonModel:
    """The model of one tower: batched I/O (Triton adds the batch axis), dynamic batching with the default queue
    delay, one instance. A TensorRT engine runs on the GPU and prefers the batch sizes its profile was optimised
    for (``opt_batch``, ``max_batch``); ONNX Runtime takes the largest batch it can, as Triton advises."""
    kind = "KIND_GPU" if backend == "tensorrt" else "KIND_AUTO"
    preferred = tuple(sorted({min(opt_batch, max_batch), max_batch})) if backend == "tensorrt" else ()
    return tower_model(
        tower,
        name=model_name(tower),
        input_dims=[int(d) for d in input_shape(model, tower)[1:]],
        embed_dim=model.embed_dim,
        max_batch_size=max_batch,
        batching=DynamicBatching(preferred_batch_sizes=preferred),
        backend=backend,
        instances=(InstanceGroup(kind=kind),),
    )


def readme_text(model: MPSCLIP, backend: str) -> str:
    return f"""# MPS-CLIP encoders for Triton Inference Server

Models: `image_encoder` (input `pixels`, float32 [B, 3, {model.image_size}, {model.image_size}], CLIP-normalised)
and `text_encoder` (input `tokens`, int64 [B, {input_shape(model, "text")[1]}], open_clip tokenizer
`{model.config.arch}`). Both output `embedding`, float32 [B, {model.embed_dim}], L2-normalised: the
similarity of an image and a text is the dot product of their embeddings. Backend: `{backend}`.

Start the server (Docker image `nvcr.io/nvidia/tritonserver:<yy.mm>-py3`):

    docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
        -v "$PWD":/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
        tritonserver --model-repository /models

or, where `tritonserver` is installed: `tritonserver --model-repository .`

Query it with `client_example.py` (`pip install 'tritonclient[http]' mpsclip`); tokenisation and image
preprocessing happen client-side, as `manifest.json` describes.
"""


def client_text(model: MPSCLIP) -> str:
    return f'''"""Rank images for a text query through Triton: python client_example.py "a query" IMAGE [IMAGE ...]"""

import sys

import numpy as np
import open_clip
import tritonclient.http as httpclient
from PIL import Image

import mpsclip.backbone  # noqa: F401  (registers mpsclip's architectures with open_clip)
from mpsclip.data.transforms import eval_transform

ARCH = "{model.config.arch}"
IMAGE_SIZE = {model.image_size}


def embed(client: httpclient.InferenceServerClient, model: str, name: str, batch: np.ndarray) -> np.ndarray:
    tensor = httpclient.InferInput(name, list(batch.shape), "FP32" if batch.dtype == np.float32 else "INT64")
    tensor.set_data_from_numpy(batch)
    return client.infer(model, [tensor]).as_numpy("{OUTPUT_NAME}")


def main() -> None:
    query, paths = sys.argv[1], sys.argv[2:]
    client = httpclient.InferenceServerClient(url="localhost:8000")
    tokens = open_clip.get_tokenizer(ARCH)([query]).numpy().astype(np.int64)
    transform = eval_transform(IMAGE_SIZE)
    pixels = np.stack([transform(Image.open(p)).numpy() for p in paths]).astype(np.float32)
    scores = embed(client, "image_encoder", "pixels", pixels) @ embed(client, "text_encoder", "tokens", tokens)[0]
    for index in np.argsort(-scores):
        print(f"{{scores[index]:.4f}}  {{paths[index]}}")


if __name__ == "__main__":
    main()
'''


def write_docs(folder: Path, model: MPSCLIP, backend: str) -> None:
    (folder / "README.md").write_text(readme_text(model, backend))
    (folder / "client_example.py").write_text(client_text(model))


def write_config(folder: Path, model: MPSCLIP, tower: str, backend: str, *, opt_batch: int, max_batch: int) -> Path:
    """Write ``<tower>_encoder/config.pbtxt`` (:func:`tower_config`)."""
    if backend not in BACKENDS:
        raise MPSCLIPError(f"unknown Triton backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = folder / model_name(tower) / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tower_config(model, tower, backend, opt_batch=opt_batch, max_batch=max_batch).pbtxt())
    return path


TOKENIZER = "tokenizer"
TEXT_ENSEMBLE = "text_ensemble"
TEXT_INPUT = TensorSpec("TEXT", "TYPE_STRING", (1,))
"""The raw strings the tokenizer and the ensemble take, one per row."""


def tokenizer_config(model: MPSCLIP, *, max_batch: int) -> TritonModel:
    """The Python-backend tokenizer on the CPU: raw strings ``TEXT`` → token ids (its ``arch`` parameter names
    the open_clip tokenizer)."""
    tokens = TensorSpec(INPUT_NAMES["text"], "TYPE_INT64", (int(input_shape(model, "text")[1]),))
    return TritonModel(
        name=TOKENIZER, backend="python", max_batch_size=max_batch, inputs=(TEXT_INPUT,), outputs=(tokens,),
        batching=None, instances=(InstanceGroup(kind="KIND_CPU"),), parameters={"arch": model.config.arch},
    )


def ensemble_config(model: MPSCLIP, *, max_batch: int) -> TritonModel:
    """The ensemble: raw strings → ``tokenizer`` → ``text_encoder`` → embedding."""
    tokens = INPUT_NAMES["text"]
    steps = (
        EnsembleStep(TOKENIZER, input_map={"TEXT": "TEXT"}, output_map={tokens: "ensemble_tokens"}),
        EnsembleStep(model_name("text"), input_map={tokens: "ensemble_tokens"}, output_map={OUTPUT_NAME: OUTPUT_NAME}),
    )
    embedding = TensorSpec(OUTPUT_NAME, "TYPE_FP32", (model.embed_dim,))
    return TritonModel(
        name=TEXT_ENSEMBLE, platform="ensemble", max_batch_size=max_batch, inputs=(TEXT_INPUT,),
        outputs=(embedding,), batching=None, steps=steps,
    )


TOKENIZER_MODEL_PY = '''"""Triton Python backend: strings (TEXT, BYTES [B, 1]) -> open_clip token ids (INT64 [B, L])."""

import json

import numpy as np
import open_clip
import triton_python_backend_utils as pb_utils

import mpsclip.backbone  # noqa: F401  (registers mpsclip's architectures with open_clip)

OUTPUT = "%s"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.tokenizer = open_clip.get_tokenizer(config["parameters"]["arch"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]
            tokens = self.tokenizer(texts).numpy().astype(np.int64)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT, tokens)]))
        return responses
'''


def write_text_ensemble(folder: Path, model: MPSCLIP, *, max_batch: int) -> list[Path]:
    """Add the Python-backend ``tokenizer`` and the ``text_ensemble`` (strings → embedding) to a repository."""
    written = []
    for config in (tokenizer_config(model, max_batch=max_batch), ensemble_config(model, max_batch=max_batch)):
        (folder / config.name / "1").mkdir(parents=True, exist_ok=True)
        (folder / config.name / "config.pbtxt").write_text(config.pbtxt())
        written.append(folder / config.name / "config.pbtxt")
    (folder / TOKENIZER / "1" / "model.py").write_text(TOKENIZER_MODEL_PY % INPUT_NAMES["text"])
    return written
