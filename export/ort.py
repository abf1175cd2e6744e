"""Run an exported ONNX tower with onnxruntime on the best execution provider available."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mpsclip.errors import MPSCLIPError

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def pick_providers(available: list[str]) -> list[str]:
    """TensorRT, CUDA and CPU providers, in that order, among those ``available``."""
    return [p for p in PREFERRED_PROVIDERS if p in available]


class OrtEncoder:
    """``encoder(batch) -> embeddings`` for one ``model.onnx``; I/O bound on the GPU when CUDA runs it."""

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise MPSCLIPError(f"{path}: no such ONNX model; export one with `mpsclip-export CHECKPOINT --format onnx`")
        self.session = ort.InferenceSession(
            str(path), providers=providers or pick_providers(ort.get_available_providers())
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.on_gpu = "CUDAExecutionProvider" in self.session.get_providers()

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if not self.on_gpu:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(batch))
        binding.bind_output(self.output_name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]
