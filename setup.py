"""Install mdpo and mdpo_kernels.

Install against the torch you already have (the C++ CPU extension is compiled against it):
    pip install torch  # your own build, CPU or CUDA
    pip install --no-build-isolation -e .
"""
from setuptools import find_packages, setup

setup(
    name="mdpo",
    version="0.1.0",
    description="Fused kernels and a thin trainer for multimodal preference optimisation (mDPO)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mdpo", "mdpo.*", "mdpo_kernels", "mdpo_kernels.*", "benchmarks"]),
    package_data={"mdpo": ["configs/*.yaml"]},
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
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "flash-attn": ["flash-attn>=2.6"],
        "dev": ["pytest", "pytest-benchmark", "triton>=3.0"],
        "peers": ["liger-kernel", "cut-cross-entropy"],
    },
    entry_points={
        "console_scripts": [
            "mdpo-train=mdpo.train:main",
            "mdpo-data=mdpo.data.cli:main",
        ]
    },
)
