"""Triton Inference Server model repository: ``image_encoder`` and ``text_encoder`` plus a README and a client."""

from __future__ import annotations

from pathlib import Path

from mpsclip.export.towers import INPUT_NAMES, OUTPUT_NAME, input_shape

from mpsclip.errors import MPSCLIPError
from mpsclip.model import MPSCLIP

BACKENDS = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}
TRITON_TYPES = {"image": "TYPE_FP32", "text": "TYPE_INT64"}
QUEUE_DELAY_US = 500


def model_name(tower: str) -> str:
    return f"{tower}_encoder"


def config_text(model: MPSCLIP, tower: str, backend: str, *, opt_batch: int, max_batch: int) -> str:
    """``config.pbtxt`` for one tower: batched I/O (Triton adds the batch axis), dynamic batching."""
    dims = ", ".join(str(d) for d in input_shape(model, tower)[1:])
    kind = "KIND_GPU" if backend == "tensorrt" else "KIND_AUTO"
    preferred = sorted({min(opt_batch, max_batch), max_batch})
    return f"""name: "{model_name(tower)}"
backend: "{backend}"
max_batch_size: {max_batch}
input [
  {{
    name: "{INPUT_NAMES[tower]}"
    data_type: {TRITON_TYPES[tower]}
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {model.embed_dim} ]
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(b) for b in preferred)} ]
  max_queue_delay_microseconds: {QUEUE_DELAY_US}
}}
instance_group [
  {{
    count: 1
    kind: {kind}
  }}
]
"""


def parse_config(text: str) -> object:
    """Parse ``text`` with Triton's own ModelConfig protobuf (from ``tritonclient[grpc]``)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        raise MPSCLIPError(f"generated config.pbtxt does not parse as a Triton ModelConfig ({err})") from err


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
    """Write ``<tower>_encoder/config.pbtxt``, validated when ``tritonclient[grpc]`` is importable."""
    if backend not in BACKENDS:
        raise MPSCLIPError(f"unknown Triton backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    text = config_text(model, tower, backend, opt_batch=opt_batch, max_batch=max_batch)
    try:
        parse_config(text)
    except ImportError:
        pass  # validation is optional: tritonclient[grpc] is not a dependency
    path = folder / model_name(tower) / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


TOKENIZER = "tokenizer"
TEXT_ENSEMBLE = "text_ensemble"


def tokenizer_config_text(model: MPSCLIP, *, max_batch: int) -> str:
    """``config.pbtxt`` of the Python-backend tokenizer: raw strings ``TEXT`` → token ids."""
    return f"""name: "{TOKENIZER}"
backend: "python"
max_batch_size: {max_batch}
input [
  {{
    name: "TEXT"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }}
]
output [
  {{
    name: "{INPUT_NAMES["text"]}"
    data_type: TYPE_INT64
    dims: [ {input_shape(model, "text")[1]} ]
  }}
]
parameters {{
  key: "arch"
  value: {{ string_value: "{model.config.arch}" }}
}}
instance_group [
  {{
    count: 1
    kind: KIND_CPU
  }}
]
"""


def ensemble_config_text(model: MPSCLIP, *, max_batch: int) -> str:
    """``config.pbtxt`` of the ensemble: raw strings → ``tokenizer`` → ``text_encoder`` → embedding."""
    tokens = INPUT_NAMES["text"]
    return f"""name: "{TEXT_ENSEMBLE}"
platform: "ensemble"
max_batch_size: {max_batch}
input [
  {{
    name: "TEXT"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {model.embed_dim} ]
  }}
]
ensemble_scheduling {{
  step [
    {{
      model_name: "{TOKENIZER}"
      model_version: -1
      input_map {{ key: "TEXT" value: "TEXT" }}
      output_map {{ key: "{tokens}" value: "ensemble_tokens" }}
    }},
    {{
      model_name: "{model_name("text")}"
      model_version: -1
      input_map {{ key: "{tokens}" value: "ensemble_tokens" }}
      output_map {{ key: "{OUTPUT_NAME}" value: "{OUTPUT_NAME}" }}
    }}
  ]
}}
"""


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
    for name, text in (
        (TOKENIZER, tokenizer_config_text(model, max_batch=max_batch)),
        (TEXT_ENSEMBLE, ensemble_config_text(model, max_batch=max_batch)),
    ):
        try:
            parse_config(text)
        except ImportError:
            pass  # validation is optional: tritonclient[grpc] is not a dependency
        (folder / name / "1").mkdir(parents=True, exist_ok=True)
        (folder / name / "config.pbtxt").write_text(text)
        written.append(folder / name / "config.pbtxt")
    (folder / TOKENIZER / "1" / "model.py").write_text(TOKENIZER_MODEL_PY % INPUT_NAMES["text"])
    return written
