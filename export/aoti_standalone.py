"""Run an AOTInductor package with torch alone: ``python -I aoti_standalone.py PACKAGE INPUTS.npz OUTPUTS.npz``.

The exporter runs this file in a fresh interpreter to show that a ``.pt2`` package works without mpsclip's or
open_clip's Python code: both are made unimportable before the package is loaded. It reads the arrays of
``INPUTS.npz`` in key order and writes the float32 embeddings under the same keys to ``OUTPUTS.npz``.
It imports nothing from mpsclip, so that it can also be copied beside a package and used as a loading example.
"""

from __future__ import annotations

import importlib.abc
import sys

BLOCKED = ("mpsclip", "open_clip")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201 (importlib's protocol)
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"{fullname} is blocked: the package must run on torch alone")
        return None


def main(argv: list[str]) -> int:
    sys.meta_path.insert(0, _Blocker())
    import numpy as np
    import torch

    package, inputs_path, outputs_path = argv
    runner = torch._inductor.aoti_load_package(package)
    device = runner.get_metadata().get("AOTI_DEVICE_KEY", "cpu")
    outputs = {}
    with np.load(inputs_path) as inputs, torch.no_grad():
        for key in inputs.files:
            batch = torch.from_numpy(inputs[key]).to(device)
            outputs[key] = runner(batch).float().cpu().numpy()
    np.savez(outputs_path, **outputs)
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    if loaded:
        print(f"error: {loaded} were imported", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
