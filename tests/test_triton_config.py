"""One Triton model configuration for both integrations: the exported repository's config.pbtxt (protobuf text
format, parsed back into Triton's ModelConfig) and the models ``mpsclip serve`` binds on PyTriton agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from extras import require
from mpsclip.export.triton_repo import tower_config

from mpsclip.errors import MPSCLIPError
from mpsclip.triton_config import MAX_BATCH_SIZE, QUEUE_DELAY_US, TensorSpec

pb = require("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] provides Triton's ModelConfig")
from google.protobuf import text_format  # noqa: E402  (protobuf comes with tritonclient[grpc])


def parse(text: str):
    return text_format.Parse(text, pb.ModelConfig())


def test_tower_config_parses_back_into_triton_model_config(tiny_model):
    config = parse(tower_config(tiny_model, "image", "onnxruntime", opt_batch=4, max_batch=8).pbtxt())
    assert (config.name, config.backend, config.max_batch_size) == ("image_encoder", "onnxruntime", 8)
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("pixels", pb.TYPE_FP32, [3, 224, 224])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("embedding", pb.TYPE_FP32, [tiny_model.embed_dim])
    ]
    assert config.dynamic_batching.max_queue_delay_microseconds == QUEUE_DELAY_US
    assert list(config.dynamic_batching.preferred_batch_size) == []
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, pb.ModelInstanceGroup.KIND_AUTO)]

    plan = parse(tower_config(tiny_model, "text", "tensorrt", opt_batch=4, max_batch=8).pbtxt())
    assert plan.backend == "tensorrt" and list(plan.dynamic_batching.preferred_batch_size) == [4, 8]
    assert plan.input[0].data_type == pb.TYPE_INT64 and list(plan.input[0].dims) == [32]
    assert [(g.count, g.kind) for g in plan.instance_group] == [(1, pb.ModelInstanceGroup.KIND_GPU)]


def test_serve_binds_the_towers_the_repository_exports(tiny_model):
    """The PyTriton models of ``mpsclip serve`` (default settings) have the batch size, queue delay and tensors of
    the exported repository's models for the same checkpoint; the image model adds the MPR perspectives."""
    require("pytriton", reason="pip install 'mpsclip[serve]'")
    from mpsclip.serve.towers import load_tower
    from mpsclip.serve.triton import TritonSettings, TritonTowers

    key = "0" * 64
    triton = TritonTowers({key: load_tower(tiny_model, key, "torch", None, torch.device("cpu"))},
                          TritonSettings(http_port=1, grpc_port=2, metrics_port=3))
    served = dict(zip(("text", "image"), triton.models(key), strict=True))
    for tower in ("text", "image"):
        exported = parse(tower_config(tiny_model, tower, "onnxruntime", opt_batch=8, max_batch=MAX_BATCH_SIZE).pbtxt())
        binding = served[tower].pytriton()
        config = binding["config"]
        assert binding["model_name"] == exported.name == f"{tower}_encoder"
        assert config.batching and config.max_batch_size == exported.max_batch_size == MAX_BATCH_SIZE
        delay = exported.dynamic_batching.max_queue_delay_microseconds
        assert config.batcher.max_queue_delay_microseconds == delay == QUEUE_DELAY_US
        assert config.batcher.preferred_batch_size is None and not exported.dynamic_batching.preferred_batch_size
        assert bound_tensors(binding["inputs"]) == exported_tensors(exported.input)
        outputs = bound_tensors(binding["outputs"])
        assert outputs[:1] == exported_tensors(exported.output)
        perspectives = ("perspectives", np.dtype(np.float32), (tiny_model.config.mpr_k, tiny_model.embed_dim))
        assert outputs[1:] == ([perspectives] if tower == "image" else [])


def bound_tensors(tensors) -> list[tuple]:
    return [(t.name, np.dtype(t.dtype), tuple(t.shape)) for t in tensors]


def exported_tensors(tensors) -> list[tuple]:
    numpy = {pb.TYPE_FP32: np.float32, pb.TYPE_INT64: np.int64}
    return [(t.name, np.dtype(numpy[t.data_type]), tuple(t.dims)) for t in tensors]


def test_unbatched_serve_models_have_no_dynamic_batcher(tiny_model):
    require("pytriton", reason="pip install 'mpsclip[serve]'")
    from mpsclip.serve.towers import load_tower
    from mpsclip.serve.triton import TritonSettings, TritonTowers

    key = "1" * 64
    settings = TritonSettings(http_port=1, grpc_port=2, metrics_port=3, max_batch_size=4, dynamic_batching=False)
    text, _ = TritonTowers({key: load_tower(tiny_model, key, "torch", None, torch.device("cpu"))}, settings).models(key)
    config = text.pytriton()["config"]
    assert config.batcher is None and config.max_batch_size == 4
    assert not parse(text.pbtxt()).HasField("dynamic_batching")


def test_unknown_data_type_names_the_tensor():
    with pytest.raises(MPSCLIPError, match="'scores'.*TYPE_FP64"):
        TensorSpec("scores", "TYPE_FP64", (3,))
