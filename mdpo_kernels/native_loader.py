"""Loads the C++ CPU extension `mdpo_kernels._C` (built from csrc/ by setup.py) once per process.

The extension is optional: the install succeeds without a compiler. When it is missing, the first
caller that asks for it gets one loud warning and the library runs the chunked torch path instead;
the import error is kept for `load_error()` and for the message of `impl="native"`.

Environment:
  MDPO_REQUIRE_NATIVE=1  a missing extension is an error, not a warning (CI sets it, to prove the
                         build works from a fresh clone).
  MDPO_DISABLE_NATIVE=1  behave as if the extension were missing (to compare paths, or to test the
                         fallback).
"""
from __future__ import annotations

import importlib
import os
import warnings

ENV_REQUIRE = "MDPO_REQUIRE_NATIVE"
ENV_DISABLE = "MDPO_DISABLE_NATIVE"
OPS = ("logprobs_forward", "logprobs_backward", "logprobs_backward_")

_tried = False
_module = None
_error: str | None = None
_warned = False


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _try_import():
    """Import the extension once; afterwards `_module` or `_error` is set. Never raises, never warns."""
    global _tried, _module, _error
    if _tried:
        return _module
    _tried = True
    if _flag(ENV_DISABLE):
        _error = f"disabled by {ENV_DISABLE}=1"
        return None
    try:
        import torch  # noqa: F401  (loads libtorch, which the extension links against)

        module = importlib.import_module("mdpo_kernels._C")
        missing = [op for op in OPS if not hasattr(torch.ops.mdpo, op)]
        if missing:
            raise ImportError(f"mdpo_kernels._C loaded but does not register torch.ops.mdpo.{missing[0]}")
    except Exception as exc:  # ImportError, or OSError / undefined symbol for a build against another torch
        _error = f"{type(exc).__name__}: {exc}"
        return None
    _module = module
    return module


def load():
    """The extension module, or None when it is missing (warns once, loudly).

    Raises RuntimeError instead when MDPO_REQUIRE_NATIVE=1 and the extension is missing.
    """
    global _warned
    module = _try_import()
    if module is not None:
        return module
    if _flag(ENV_REQUIRE):
        raise RuntimeError(
            f"mdpo_kernels: the C++ CPU extension mdpo_kernels._C is required ({ENV_REQUIRE}=1) but could not be "
            f"loaded: {_error}. Build it with `pip install --no-build-isolation -e .` (needs torch installed first "
            f"and a C++ compiler)."
        )
    if not _warned:
        _warned = True
        warnings.warn(
            "\n" + "!" * 78 + "\n"
            f"mdpo_kernels: the C++ CPU extension mdpo_kernels._C is NOT available ({_error}).\n"
            "CPU log-prob ops fall back to the slower chunked torch path. Build the extension with\n"
            "`pip install --no-build-isolation -e .` (torch installed first, a C++ compiler present);\n"
            f"set {ENV_REQUIRE}=1 to make this an error.\n" + "!" * 78,
            RuntimeWarning,
            stacklevel=3,
        )
    return None


def load_error() -> str | None:
    """Why the extension is not available (None when it loaded). Never raises, never warns."""
    _try_import()
    return _error


def kernel_isa() -> str | None:
    """Instruction set of the native kernels in use ('avx512', 'avx2', 'default'), or None if missing."""
    module = _try_import()
    return module.kernel_isa() if module is not None else None
