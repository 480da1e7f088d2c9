"""Test-wide set-up. Runs before any project module is imported.

TRITON_INTERPRET=1 makes `@triton.jit` kernels run on CPU tensors, so the Triton kernels themselves
are tested on machines without a GPU; it must be set before the kernel module is imported. A GPU
run (benchmarks/gpu_check.sh) sets MDPO_TEST_DEVICE=cuda and leaves the interpreter off.
"""
import os

if os.environ.get("MDPO_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = os.environ.get("MDPO_TEST_DEVICE", "cpu")


@pytest.fixture
def device() -> str:
    """The device kernel tests run on: cpu (Triton interpreted) or cuda (un-interpreted)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    """Digests and validation results of the tests' data go to a folder of the session, not ~/.cache
    (subprocesses inherit it)."""
    if "MDPO_DATA_CACHE" not in os.environ:
        os.environ["MDPO_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
