"""megatron-hybrid: a Megatron-Core trainer for Olmo Hybrid (Gated DeltaNet + attention)."""
from setuptools import find_packages, setup

setup(
    name="megatron-hybrid",
    version="0.1.0",
    description="Tensor- and pipeline-parallel Megatron-Core trainer for Olmo Hybrid",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_hybrid", "megatron_hybrid.*"]),
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.17",
        "numpy",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "tensorboard",
        "tqdm",
        "pyyaml",
        "einops",
        "psutil",
    ],
    extras_require={
        "gpu": ["fla-core==0.6.0"],
        "hf": ["transformers>=5.6"],
        "dev": ["pytest>=7", "transformers>=5.6", "ruff>=0.17,<0.18"],
        "te": ["transformer-engine"],
    },
)
