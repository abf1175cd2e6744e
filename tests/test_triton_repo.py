"""The triton-repo's Python-backend tokenizer and text ensemble; the tokenizer loaded in pytriton's Triton server."""

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
from extras import require
from mpsclip.export import export

import mpsclip.backbone  # noqa: F401  (registers the tiny arch with open_clip)
from tests.conftest import TINY


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tokenizer_and_ensemble_configs_parse(ckpt, tmp_path):
    pb = require("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] provides Triton's ModelConfig")
    from google.protobuf import text_format

    out = export(ckpt, "triton-repo", tmp_path / "repo", towers=("text",), max_batch=8, opt_batch=4, verify=False)
    tokenizer = text_format.Parse((out / "tokenizer" / "config.pbtxt").read_text(), pb.ModelConfig())
    assert tokenizer.backend == "python" and tokenizer.parameters["arch"].string_value == TINY
    assert list(tokenizer.output[0].dims) == [32] and (out / "tokenizer" / "1" / "model.py").is_file()
    assert not tokenizer.HasField("dynamic_batching") and tokenizer.input[0].data_type == pb.TYPE_STRING
    assert [(g.count, g.kind) for g in tokenizer.instance_group] == [(1, pb.ModelInstanceGroup.KIND_CPU)]
    ensemble = text_format.Parse((out / "text_ensemble" / "config.pbtxt").read_text(), pb.ModelConfig())
    steps = [step.model_name for step in ensemble.ensemble_scheduling.step]
    assert ensemble.platform == "ensemble" and steps == ["tokenizer", "text_encoder"]
    assert dict(ensemble.ensemble_scheduling.step[1].input_map) == {"tokens": "ensemble_tokens"}


@pytest.mark.triton
def test_tokenizer_loads_in_bundled_tritonserver(ckpt, tmp_path):
    pytriton = require("pytriton", reason="nvidia-pytriton ships the Triton server binary")
    httpclient = require("tritonclient.http")
    from pytriton.utils.distribution import get_libs_path

    root = Path(pytriton.__file__).parent / "tritonserver"
    out = export(ckpt, "triton-repo", tmp_path / "repo", towers=("text",), max_batch=8, opt_batch=4, verify=False)
    repo = tmp_path / "python_only"
    shutil.copytree(out / "tokenizer", repo / "tokenizer")  # the ONNX text_encoder needs a backend pytriton lacks
    backends = _python_backend(root, tmp_path / "backends")
    ports = [_free_port() for _ in range(3)]
    env = dict(os.environ)
    # The backend stub loads the first libpython it finds and takes its packages from the python on PATH:
    # make both this interpreter's (as pytriton does).
    libs = [sysconfig.get_config_var("LIBDIR"), str(get_libs_path()), env.get("LD_LIBRARY_PATH")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, libs))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    command = [
        str(root / "bin" / "tritonserver"), "--model-repository", str(repo), "--backend-directory", str(backends),
        "--http-address", "127.0.0.1", "--http-port", str(ports[0]), "--grpc-address", "127.0.0.1",
        "--grpc-port", str(ports[1]), "--metrics-address", "127.0.0.1", "--metrics-port", str(ports[2]),
        "--exit-timeout-secs", "5",
    ]
    log = (tmp_path / "tritonserver.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{ports[0]}")
        deadline = time.monotonic() + 60
        while not _ready(client, "tokenizer"):
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "tritonserver.log").read_text()
            time.sleep(0.5)
        texts = ["a harbour with boats", "dense forest"]
        tensor = httpclient.InferInput("TEXT", [2, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
        tokens = client.infer("tokenizer", [tensor]).as_numpy("tokens")
        assert tokens.dtype == np.int64
        np.testing.assert_array_equal(tokens, open_clip.get_tokenizer(TINY)(texts).numpy())
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _ready(client, model: str) -> bool:
    try:
        return client.is_model_ready(model)
    except Exception:  # noqa: BLE001  (connection refused while the server starts)
        return False


def _python_backend(root: Path, folder: Path) -> Path:
    """A backend directory whose python backend has this interpreter's stub (pytriton keeps stubs per version)."""
    python = folder / "python"
    python.mkdir(parents=True)
    for item in (root / "backends" / "python").iterdir():
        if item.is_file():
            (python / item.name).symlink_to(item)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = "triton_python_backend_stub"
    (python / stub).symlink_to(root / "python_backend_stubs" / version / stub)
    return folder
