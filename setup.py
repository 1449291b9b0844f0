"""megatron-hybrid: a Megatron-Core trainer for Olmo Hybrid (Gated DeltaNet + attention)."""
from setuptools import setup

PACKAGES = {
    "megatron_hybrid": "megatron_hybrid",
    "megatron_hybrid.compat": "megatron_hybrid/compat",
    "megatron_hybrid.conversion": "megatron_hybrid/conversion",
    "megatron_hybrid.data": "megatron_hybrid/data",
    "megatron_hybrid.training": "megatron_hybrid/training",
    "megatron_hybrid.tuner": "megatron_hybrid/tuner",
    "megatron_hybrid.benchmark": "megatron_hybrid/benchmark",
    "megatron_hybrid.layers": "layers",
    "megatron_hybrid.kernels": "kernels",
}

setup(
    name="megatron-hybrid",
    version="0.1.0",
    description="Tensor- and pipeline-parallel Megatron-Core trainer for Olmo Hybrid",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
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
        "dev": ["pytest>=7", "transformers>=5.6"],
        "te": ["transformer-engine"],
    },
)
