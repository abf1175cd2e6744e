"""Triton model configurations, defined once: the exported repository's ``config.pbtxt`` files
(:mod:`mpsclip.export.triton_repo`) and the tower models ``mpsclip serve`` binds on PyTriton
(:mod:`mpsclip.serve.triton`) are both rendered from a :class:`TritonModel`, and :func:`tower_model` describes a
tower (inputs, outputs, batching) for both.

:meth:`TritonModel.pbtxt` writes Triton's own ``ModelConfig`` protobuf message in text format (``tritonclient[grpc]``
ships the message, without the server: ``pip install 'mpsclip[triton-repo]'``); :meth:`TritonModel.pytriton` gives
PyTriton's ``Triton.bind`` the same name, tensors, batch size and batching. This module imports neither protobuf nor
PyTriton until one of them is called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mpsclip.errors import MPSCLIPError

MAX_BATCH_SIZE = 32
"""Most rows Triton merges into one tower call, unless the caller (``--max-batch``) says otherwise."""

QUEUE_DELAY_US = 2000
"""Longest wait of a request for batch companions, for both Triton integrations. Chosen from the sweep in
bench/results/serve-load.md (2-core shared CPU, MPS-Tiny, text queries through the API): 0 / 2000 / 8000 µs gave
p50 15.7 / 17.3 / 23.2 ms at one client and 117 / 168 / 206 requests/s at 32 clients (10 / 10 / 13 rows per tower
call). A delay costs about itself when load is light; 2 ms keeps one client within 2 ms of no wait and gives 1.4x
the throughput of 0 µs under load, where 8 ms buys another 1.2x for a third more latency at one client. The
exported repository had 500 µs, a figure nothing measured; it takes this one too. One run on a noisy machine:
rerun ``python -m mpsclip.bench.serve --queue-delays ...`` where the towers are heavier (a GPU, ViT-B-32)."""

INPUT_NAMES = {"image": "pixels", "text": "tokens"}
INPUT_TYPES = {"image": "TYPE_FP32", "text": "TYPE_INT64"}
OUTPUT_NAME = "embedding"
PERSPECTIVES_NAME = "perspectives"

NUMPY_TYPES = {"TYPE_FP32": "float32", "TYPE_INT64": "int64", "TYPE_STRING": "bytes_"}
"""Triton data types these models use, and the numpy type PyTriton takes for each."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: ``data_type`` is Triton's (``TYPE_FP32``...), ``dims`` leave out the batch axis."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.data_type not in NUMPY_TYPES:
            raise MPSCLIPError(
                f"tensor {self.name!r}: data type {self.data_type!r} is not one of {', '.join(NUMPY_TYPES)}"
            )


@dataclass(frozen=True)
class DynamicBatching:
    """Triton's dynamic batcher: merge queued requests, waiting at most ``queue_delay_us`` for more.

    ``preferred_batch_sizes``: the sizes a TensorRT engine was optimised for; Triton's advice is to leave them out
    for other backends (the batcher then forms the largest batch it can)."""

    queue_delay_us: int = QUEUE_DELAY_US
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class InstanceGroup:
    """``count`` copies of the model on ``kind`` (``KIND_AUTO``, ``KIND_GPU`` or ``KIND_CPU``)."""

    kind: str = "KIND_AUTO"
    count: int = 1


@dataclass(frozen=True)
class EnsembleStep:
    """One step of an ensemble: ``model_name``'s tensors from/to the ensemble's (``{step tensor: ensemble tensor}``)."""

    model_name: str
    input_map: Mapping[str, str]
    output_map: Mapping[str, str]


@dataclass(frozen=True)
class TritonModel:
    """One Triton model: what ``config.pbtxt`` holds and what PyTriton's ``bind`` is given.

    ``backend`` (``onnxruntime``, ``tensorrt``, ``python``) or ``platform`` (``ensemble``, with ``steps``);
    ``max_batch_size`` > 0: every tensor has a leading batch axis; ``batching`` None: each request runs alone;
    ``parameters``: string parameters the model reads at load time."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = MAX_BATCH_SIZE
    backend: str = ""
    platform: str = ""
    batching: DynamicBatching | None = DynamicBatching()
    instances: tuple[InstanceGroup, ...] = ()
    parameters: Mapping[str, str] = field(default_factory=dict)
    steps: tuple[EnsembleStep, ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise MPSCLIPError(f"model {self.name!r}: max_batch_size {self.max_batch_size} must be 0 or more")
        if self.batching is not None and self.batching.queue_delay_us < 0:
            raise MPSCLIPError(f"model {self.name!r}: queue delay {self.batching.queue_delay_us} µs must be 0 or more")

    def proto(self) -> Any:
        """This model as Triton's ``inference.ModelConfig`` protobuf message."""
        try:
            from tritonclient.grpc import model_config_pb2 as pb
        except ImportError as err:
            raise MPSCLIPError(
                f"writing Triton's config.pbtxt needs tritonclient[grpc] (Triton's ModelConfig protobuf; {err}): "
                "pip install 'mpsclip[triton-repo]'"
            ) from err
        config = pb.ModelConfig(
            name=self.name, backend=self.backend, platform=self.platform, max_batch_size=self.max_batch_size
        )
        for specs, repeated in ((self.inputs, config.input), (self.outputs, config.output)):
            for spec in specs:
                repeated.add(name=spec.name, data_type=pb.DataType.Value(spec.data_type), dims=spec.dims)
        if self.batching is not None:
            config.dynamic_batching.SetInParent()  # present even when every field keeps its default
            config.dynamic_batching.preferred_batch_size.extend(self.batching.preferred_batch_sizes)
            config.dynamic_batching.max_queue_delay_microseconds = self.batching.queue_delay_us
        for group in self.instances:
            config.instance_group.add(count=group.count, kind=pb.ModelInstanceGroup.Kind.Value(group.kind))
        for key, value in self.parameters.items():
            config.parameters[key].string_value = value
        for step in self.steps:
            added = config.ensemble_scheduling.step.add(model_name=step.model_name, model_version=-1)
            added.input_map.update(step.input_map)
            added.output_map.update(step.output_map)
        return config

    def pbtxt(self) -> str:
        """``config.pbtxt``: :meth:`proto` in protobuf text format."""
        from google.protobuf import text_format

        return text_format.MessageToString(self.proto())

    def pytriton(self) -> dict[str, Any]:
        """Keyword arguments of PyTriton's ``Triton.bind`` (``model_name``, ``inputs``, ``outputs``, ``config``) for
        this model; add ``infer_func``. PyTriton makes every bound model a Python-backend one whose instances are
        the bound functions, so ``backend`` and ``instances`` are not passed on."""
        import numpy as np
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

        def tensors(specs: Sequence[TensorSpec]) -> list[Tensor]:
            return [Tensor(name=s.name, dtype=np.dtype(NUMPY_TYPES[s.data_type]).type, shape=s.dims) for s in specs]

        batcher = None
        if self.batching is not None:
            preferred = list(self.batching.preferred_batch_sizes) or None
            batcher = DynamicBatcher(max_queue_delay_microseconds=self.batching.queue_delay_us,
                                     preferred_batch_size=preferred)
        config = ModelConfig(batching=self.max_batch_size > 0, max_batch_size=self.max_batch_size,
                             batcher=batcher)  # type: ignore[arg-type]  # None: no dynamic batcher
        return {"model_name": self.name, "inputs": tensors(self.inputs), "outputs": tensors(self.outputs),
                "config": config}


def tower_model(
    tower: str,
    *,
    input_dims: Sequence[int],
    embed_dim: int,
    name: str | None = None,
    perspectives: int = 0,
    max_batch_size: int = MAX_BATCH_SIZE,
    batching: DynamicBatching | None = DynamicBatching(),
    backend: str = "python",
    instances: tuple[InstanceGroup, ...] = (),
) -> TritonModel:
    """The model of one query tower: ``image`` (``pixels`` FP32 ``input_dims`` = [3, S, S], CLIP-normalised) or
    ``text`` (``tokens`` INT64 [context length]) → ``embedding`` FP32 [embed_dim], L2-normalised, and with
    ``perspectives`` = k > 0 also ``perspectives`` FP32 [k, embed_dim]. ``name`` defaults to ``<tower>_encoder``."""
    if tower not in INPUT_NAMES:
        raise MPSCLIPError(f"unknown tower {tower!r}; choose one of {', '.join(INPUT_NAMES)}")
    outputs = [TensorSpec(OUTPUT_NAME, "TYPE_FP32", (embed_dim,))]
    if perspectives > 0:
        outputs.append(TensorSpec(PERSPECTIVES_NAME, "TYPE_FP32", (perspectives, embed_dim)))
    return TritonModel(
        name=name or f"{tower}_encoder",
        inputs=(TensorSpec(INPUT_NAMES[tower], INPUT_TYPES[tower], tuple(input_dims)),),
        outputs=tuple(outputs),
        max_batch_size=max_batch_size,
        backend=backend,
        batching=batching,
        instances=instances,
    )
