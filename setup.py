"""Install mdpo and mdpo_kernels.

Install against the torch you already have (the C++ CPU extension is compiled against it):
    pip install torch  # your own build, CPU or CUDA
    pip install --no-build-isolation -e .
"""
import os
import platform
import sys

from setuptools import find_packages, setup


# ---------------------------------------------------------------------------------------------
# Optional C++ CPU extension `mdpo_kernels._C` (csrc/). It is built against the torch installed in
# this environment, so install with --no-build-isolation (an isolated build would see no torch, or
# pull a second one). The build never breaks the install: if torch is not importable here or the
# compiler fails, the package installs without it, and at run time mdpo_kernels warns once and uses
# the chunked torch path (MDPO_REQUIRE_NATIVE=1 makes that an error; MDPO_SKIP_NATIVE_BUILD=1 skips
# the build on purpose). AVX2/AVX-512 kernels are chosen at run time; see csrc/logprobs_cpu.cpp.
def _native_build_warning(reason):
    bar = "!" * 78
    sys.stderr.write(
        f"\n{bar}\nWARNING: mdpo_kernels._C (C++ CPU kernels) will NOT be built: {reason}\n"
        "mdpo_kernels will fall back to the slower chunked torch path on the CPU.\n"
        "To build it: install torch first, then `pip install --no-build-isolation -e .` with a C++ compiler.\n"
        f"{bar}\n\n"
    )


def _native_extension():
    """(ext_modules, cmdclass) for mdpo_kernels._C, or ([], {}) when it cannot be built here."""
    if os.environ.get("MDPO_SKIP_NATIVE_BUILD") == "1":
        _native_build_warning("MDPO_SKIP_NATIVE_BUILD=1")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # no torch in this (isolated?) build environment
        _native_build_warning(f"torch is not importable while building ({exc!r}); use --no-build-isolation")
        return [], {}

    # Per-file instruction-set flags (as ATen does): only the kernel copy built for an ISA may use it,
    # and logprobs_cpu.cpp picks a copy at run time, so the library still runs on any x86-64 CPU.
    isa_flags = {
        "logprobs_kernel_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
        "logprobs_kernel_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    }
    x86_64 = platform.machine().lower() in ("x86_64", "amd64")

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension with per-file ISA flags, turning any build failure into a loud warning."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing or failing, ABI check, ...
                _native_build_warning(f"the build failed: {exc!r}")

        def build_extension(self, ext):
            # BuildExtension (without ninja) compiles each file through compiler._compile; add the
            # ISA flags there. Other compilers (MSVC) build the portable kernels only.
            compile_one = getattr(self.compiler, "_compile", None)
            if not (x86_64 and self.compiler.compiler_type == "unix" and compile_one):
                return super().build_extension(ext)

            def compile_with_isa(obj, src, src_ext, cc_args, extra_postargs, pp_opts):
                flags = isa_flags.get(os.path.basename(src), [])
                if isinstance(extra_postargs, dict):
                    extra_postargs = {**extra_postargs, "cxx": list(extra_postargs.get("cxx", [])) + flags}
                else:
                    extra_postargs = list(extra_postargs) + flags
                return compile_one(obj, src, src_ext, cc_args, extra_postargs, pp_opts)

            self.compiler._compile = compile_with_isa
            try:
                super().build_extension(ext)
            finally:
                self.compiler._compile = compile_one

        def get_outputs(self):  # nothing to install or link when the build failed
            return [path for path in super().get_outputs() if os.path.exists(path)]

    if sys.platform == "win32":
        openmp_compile, openmp_link = ["/openmp"], []
    elif sys.platform == "darwin":  # Apple clang has no -fopenmp: at::parallel_for then runs on one thread
        openmp_compile, openmp_link = [], []
    else:  # at::parallel_for is an OpenMP region compiled into the extension; libgomp.so.1 resolves to torch's copy
        openmp_compile, openmp_link = ["-fopenmp"], ["-fopenmp"]
    extension = CppExtension(
        name="mdpo_kernels._C",
        # Linked in sorted order, baseline objects first (see csrc/logprobs_kernel.cpp for why).
        sources=[
            "csrc/logprobs_cpu.cpp",
            "csrc/logprobs_kernel.cpp",
            "csrc/logprobs_kernel_avx2.cpp",
            "csrc/logprobs_kernel_avx512.cpp",
        ],
        depends=["csrc/logprobs_cpu.h", "csrc/logprobs_kernel.h"],
        extra_compile_args={"cxx": ["-O3", *openmp_compile] if sys.platform != "win32" else ["/O2", *openmp_compile]},
        extra_link_args=openmp_link,
    )
    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}


_ext_modules, _cmdclass = _native_extension()

setup(
    name="mdpo",
    version="0.1.0",
    description="Fused kernels and a thin trainer for multimodal preference optimisation (mDPO)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mdpo", "mdpo.*", "mdpo_kernels", "mdpo_kernels.*", "benchmarks"]),
    package_data={"mdpo": ["configs/*.yaml", "eval/data/*.json"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "transformers>=4.50",
        "peft>=0.13",
        "accelerate>=1.0",
        "matplotlib",
        "tensorboard",
        "lemminflect>=0.2.3",  # plural/singular forms for CHAIR (mdpo/eval/chair.py); data ships in the wheel
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "flash-attn": ["flash-attn>=2.6"],
        "dev": ["pytest", "pytest-benchmark", "triton>=3.0"],
        "peers": ["liger-kernel", "cut-cross-entropy"],
        "qlora": ["bitsandbytes>=0.46.1"],  # model.quantization: nf4 | int8 (transformers 5 needs ≥ 0.46.1; tested with 0.50.2)
    },
    ext_modules=_ext_modules,
    cmdclass=_cmdclass,
    entry_points={
        "console_scripts": [
            "mdpo-train=mdpo.train:main",
            "mdpo-data=mdpo.data.cli:main",
            "mdpo-eval=mdpo.eval.cli:main",
        ]
    },
)
