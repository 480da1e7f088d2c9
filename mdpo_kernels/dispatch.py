"""The one place that chooses an implementation of the log-prob ops.

Order when nothing is forced: CUDA tensors -> Triton; CPU tensors -> the C++ extension when it is
built (`logprobs_native`), otherwise the chunked torch path (`logprobs_torch`). Force a choice with
`impl=` on the call or the environment variable `MDPO_KERNEL_IMPL` (`triton`, `native`, `torch`,
`reference`). The argument wins over the variable.
"""
from __future__ import annotations

import os

import torch

from . import logprobs_torch

ENV_IMPL = "MDPO_KERNEL_IMPL"
IMPLS = ("triton", "native", "torch", "reference")


def _native_backend():
    """The C++ backend module if its extension loaded, else None (the loader warns once)."""
    try:
        from . import logprobs_native
    except ImportError:  # the module itself is absent (older checkout)
        return None
    return logprobs_native if logprobs_native.is_available() else None


def resolve_impl(device: torch.device, impl: str | None = None) -> str:
    choice = impl or os.environ.get(ENV_IMPL) or None
    if choice is not None:
        if choice not in IMPLS:
            source = "impl" if impl else ENV_IMPL
            raise ValueError(f"{source}={choice!r} is not one of {IMPLS}")
        return choice
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and _native_backend() is not None:
        return "native"
    return "torch"


def backend(name: str):
    """The backend module that implements `forward` / `backward` for `name`."""
    if name == "triton":
        from . import logprobs_triton

        return logprobs_triton
    if name == "native":
        module = _native_backend()
        if module is None:
            from . import native_loader

            raise RuntimeError(f"impl='native' was asked for but the C++ extension is not available: {native_loader.load_error()}")
        return module
    if name == "torch":
        return logprobs_torch
    raise ValueError(f"no backend module for impl={name!r}")
