"""The query towers on a real Triton Inference Server (PyTriton's bundled ``tritonserver`` 2.51 + Python backend).

For each checkpoint served, two models are bound (KServe v2 protocol, any ``tritonclient`` can call them):

* ``text_encoder``: input ``tokens`` INT64 ``[-1, context_length]`` (the model's open_clip tokenizer) → output
  ``embedding`` FP32 ``[-1, D]``;
* ``image_encoder``: input ``pixels`` FP32 ``[-1, 3, S, S]`` (CLIP-normalised) → ``embedding`` FP32 ``[-1, D]``
  and, for MPS-CLIP checkpoints, ``perspectives`` FP32 ``[-1, k, D]`` (the MPR head over the global embedding,
  as ``mpsclip embed`` stores items without sub-images).

With more than one checkpoint the names get ``_<sha256[:12]>`` appended. The bound functions run in this process
(the server calls back over PyTriton's IPC) through :class:`~mpsclip.serve.towers.Tower`, so they use the engine
the caller chose. Dynamic batching merges concurrent requests up to ``max_batch_size`` rows, waiting at most
``queue_delay_us`` for more (:data:`mpsclip.triton_config.QUEUE_DELAY_US` by default, as in the exported model
repository: both are described by :func:`mpsclip.triton_config.tower_model`); ``dynamic_batching=False`` runs every
request alone (the benchmark's unbatched baseline). HTTP, gRPC and metrics all bind 127.0.0.1.
"""

from __future__ import annotations

import os
import platform
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpsclip.serve import metrics
from mpsclip.serve.towers import Tower

from mpsclip.errors import MPSCLIPError
from mpsclip.triton_config import (
    INPUT_NAMES,
    MAX_BATCH_SIZE,
    OUTPUT_NAME,
    PERSPECTIVES_NAME,
    QUEUE_DELAY_US,
    DynamicBatching,
    TritonModel,
    tower_model,
)

HOST = "127.0.0.1"
MIN_GLIBC = (2, 35)
EXIT_TIMEOUT_S = 5
"""How long a stopping server waits for in-flight inferences and open client connections."""


def triton_availability() -> str | None:
    """Why the bundled Triton server cannot run here (None when it can)."""
    system, arch = platform.system(), platform.machine()
    if system != "Linux" or arch not in ("x86_64", "aarch64"):
        return f"the bundled tritonserver runs on Linux x86_64/aarch64 only, not {system} {arch}"
    libc, version = platform.libc_ver()
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if libc != "glibc" or parts < MIN_GLIBC:
        return f"the bundled tritonserver needs glibc {'.'.join(map(str, MIN_GLIBC))}+, found {libc} {version or '?'}"
    try:
        import pytriton  # noqa: F401
    except ImportError as err:
        return f"nvidia-pytriton is not installed ({err}); pip install 'mpsclip[serve]'"
    return numpy_conflict()


def numpy_conflict(installed: str | None = None) -> str | None:
    """Why the installed numpy breaks PyTriton, or None: nvidia-pytriton declares the numpy it works with (0.7:
    ``numpy<2``), and with numpy 2 its Python backend returns empty outputs (every query fails) while the server
    reports itself ready. ``installed``: the numpy version to check (default: the one installed)."""
    from packaging.requirements import Requirement

    installed = installed or metadata.version("numpy")
    pytriton = metadata.version("nvidia-pytriton")
    for line in metadata.requires("nvidia-pytriton") or []:
        requirement = Requirement(line)
        if requirement.name == "numpy" and requirement.marker is None and installed not in requirement.specifier:
            return (
                f"nvidia-pytriton {pytriton} requires numpy{requirement.specifier}, but numpy {installed} is "
                f"installed (another package, e.g. geopandas>=1.2 or pandas>=3.1, needs numpy 2); with it every "
                f"query through Triton fails. For Triton: pip install 'numpy{requirement.specifier}' (and packages "
                "that work with it)"
            )
    return None


@dataclass(frozen=True)
class TritonSettings:
    """Ports (all on 127.0.0.1) and batching of the Triton server."""

    http_port: int
    grpc_port: int
    metrics_port: int
    max_batch_size: int = MAX_BATCH_SIZE
    queue_delay_us: int = QUEUE_DELAY_US
    dynamic_batching: bool = True
    workspace: Path | None = None  # None: a fresh folder under $PYTRITON_HOME, removed on stop
    log_file: Path | None = None  # None: a temporary file, removed after a clean stop

    def check(self) -> None:
        ports = {"--triton-http-port": self.http_port, "--triton-grpc-port": self.grpc_port,
                 "--triton-metrics-port": self.metrics_port}
        for flag, port in ports.items():
            if not 0 < port < 65536:
                raise MPSCLIPError(f"{flag}: {port} is not a port number (1-65535)")
        if len(set(ports.values())) != len(ports):
            raise MPSCLIPError(f"Triton ports must differ, got {ports}")
        if self.max_batch_size < 1 or self.queue_delay_us < 0:
            raise MPSCLIPError("Triton max_batch_size must be 1 or more and queue_delay_us 0 or more")


def model_names(towers: dict[str, Tower]) -> dict[str, tuple[str, str]]:
    """``{checkpoint sha256: (text model, image model)}``: plain names when there is one checkpoint."""
    if len(towers) == 1:
        return {key: ("text_encoder", "image_encoder") for key in towers}
    return {key: (f"text_encoder_{key[:12]}", f"image_encoder_{key[:12]}") for key in towers}


class BoundTowers:
    """The functions Triton calls: one request list in, one output dict per request out; records batch sizes."""

    def __init__(self, tower: Tower) -> None:
        self.tower = tower
        self.batch_sizes: dict[str, list[int]] = {"text": [], "image": []}
        self._lock = threading.Lock()

    def _rows(self, requests: list[dict[str, np.ndarray]], name: str, kind: str) -> tuple[torch.Tensor, list[int]]:
        sizes = [len(r[name]) for r in requests]
        with self._lock:
            self.batch_sizes[kind].append(sum(sizes))
        metrics.BATCH.observe(sum(sizes))
        return torch.from_numpy(np.concatenate([r[name] for r in requests])), sizes

    @staticmethod
    def _split(outputs: dict[str, torch.Tensor], sizes: list[int]) -> list[dict[str, np.ndarray]]:
        arrays = {name: value.numpy().astype(np.float32, copy=False) for name, value in outputs.items()}
        bounds = np.cumsum([0, *sizes])
        return [{n: a[lo:hi] for n, a in arrays.items()} for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def text(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        tokens, sizes = self._rows(requests, INPUT_NAMES["text"], "text")
        return self._split({OUTPUT_NAME: self.tower.encode_text(tokens)}, sizes)

    def image(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        pixels, sizes = self._rows(requests, INPUT_NAMES["image"], "image")
        glob = self.tower.encode_image(pixels)
        outputs = {OUTPUT_NAME: glob}
        if self.tower.has_perspectives:
            outputs[PERSPECTIVES_NAME] = self.tower.perspectives(glob)
        return self._split(outputs, sizes)


def _python_libdir_first() -> None:
    """Put this interpreter's libpython first on LD_LIBRARY_PATH: the Python-backend stub loads the first
    ``libpython3.X.so`` the loader finds, and another interpreter's copy fails to load the models."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and not current.startswith(libdir):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


class TritonTowers:
    """A running Triton server with every tower bound; :meth:`start` returns once the models are ready."""

    def __init__(self, towers: dict[str, Tower], settings: TritonSettings) -> None:
        if not towers:
            raise MPSCLIPError("no model to put on Triton: the stores were loaded without a checkpoint")
        settings.check()
        self.towers, self.settings = towers, settings
        self.names = model_names(towers)
        self.bound = {key: BoundTowers(tower) for key, tower in towers.items()}
        self._triton: Any = None
        self.log_file = settings.log_file

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.settings.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.settings.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.settings.metrics_port}/metrics"

    def batch_sizes(self, kind: str) -> list[int]:
        """Rows per call of every bound ``kind`` ("text"/"image") function so far."""
        return [n for bound in self.bound.values() for n in bound.batch_sizes[kind]]

    def models(self, key: str) -> tuple[TritonModel, TritonModel]:
        """The text and image models bound for checkpoint ``key``: :func:`~mpsclip.triton_config.tower_model`, as
        the exported repository describes its towers, on the Python backend (PyTriton calls back into this process)
        with this server's batching; the image model also gives MPR perspectives where the checkpoint has them."""
        tower, s = self.towers[key], self.settings
        text_name, image_name = self.names[key]
        dim, size = tower.embed_dim, tower.image_size
        batching = DynamicBatching(queue_delay_us=s.queue_delay_us) if s.dynamic_batching else None
        k = int(tower.perspectives(torch.zeros(1, dim)).shape[1]) if tower.has_perspectives else 0
        common: dict[str, Any] = {"embed_dim": dim, "max_batch_size": s.max_batch_size, "batching": batching}
        return (
            tower_model("text", name=text_name, input_dims=(tower.context_length,), **common),
            tower_model("image", name=image_name, input_dims=(3, size, size), perspectives=k, **common),
        )

    def _bind(self, triton: Any, key: str) -> None:
        bound = self.bound[key]
        text, image = self.models(key)
        triton.bind(infer_func=bound.text, strict=True, **text.pytriton())
        triton.bind(infer_func=bound.image, strict=True, **image.pytriton())

    def start(self) -> float:
        """Start the server and load every model; returns the seconds it took."""
        from pytriton.triton import Triton, TritonConfig

        reason = triton_availability()
        if reason is not None:
            raise MPSCLIPError(f"cannot start Triton: {reason}; run 'mpsclip serve --no-triton'")
        _python_libdir_first()
        s = self.settings
        if self.log_file is None:
            handle, name = tempfile.mkstemp(prefix="mpsclip-triton-", suffix=".log")
            os.close(handle)
            self.log_file = Path(name)
        config = TritonConfig(
            http_address=HOST, http_port=s.http_port, grpc_address=HOST, grpc_port=s.grpc_port,
            metrics_address=HOST, metrics_port=s.metrics_port, allow_gpu_metrics=False,
            exit_timeout_secs=EXIT_TIMEOUT_S, log_file=self.log_file,
        )
        start = time.perf_counter()
        triton = Triton(config=config, workspace=s.workspace)
        try:
            for key in self.towers:
                self._bind(triton, key)
            triton.run()
        except Exception as err:
            triton.stop()
            raise MPSCLIPError(
                f"Triton did not start on 127.0.0.1 ports {s.http_port}/{s.grpc_port}/{s.metrics_port} "
                f"(are they free?): {err}; its log: {self.log_file}"
            ) from err
        self._triton = triton
        return time.perf_counter() - start

    def stop(self, keep_log: bool = False) -> None:
        """Stop the server (in-flight inferences finish first, for at most EXIT_TIMEOUT_S) and remove its
        workspace and, unless the caller named it or ``keep_log`` (an error names it), its log."""
        if self._triton is None:
            return
        self._triton.stop()
        self._triton = None
        if self.settings.log_file is None and self.log_file is not None and not keep_log:
            self.log_file.unlink(missing_ok=True)
            self.log_file = None

    def __enter__(self) -> TritonTowers:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
