"""Optional dependencies in tests: a skip on a machine without them, a failure where they are expected.

``make test`` (so CI) installs the extras these tests use and sets ``MPSCLIP_REQUIRE_EXTRAS=1``; ``CI=true`` (set by
CI services) counts too. There a missing extra fails the test instead of silently skipping it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def extras_expected() -> bool:
    flags = (os.environ.get("MPSCLIP_REQUIRE_EXTRAS", ""), os.environ.get("CI", ""))
    return any(flag.lower() in ("1", "true", "yes") for flag in flags)


def expect(condition: bool, reason: str) -> None:
    """Skip (or, where extras are expected, fail) the calling test or module unless ``condition`` holds."""
    if condition:
        return
    if extras_expected():
        pytest.fail(f"{reason} (MPSCLIP_REQUIRE_EXTRAS=1 or CI=true: `make venv` installs the extras)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str, reason: str | None = None) -> ModuleType:
    """``module`` imported, like ``pytest.importorskip``, but a failure where the extras are expected."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        expect(False, f"cannot import {module} ({reason or err})")
        raise  # not reached: expect() raised
