"""cai-engine: Constitutional AI end to end in one process, on one shared model."""
from setuptools import setup

setup(
    name="cai-engine",
    version="0.1.0",
    description="A fast in-process engine for Constitutional AI: generation, self-critique, "
    "AI preference labelling, reward scoring and PPO/DPO on one shared model.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["engine", "kernels", "cai"],
    package_data={"cai": ["presets/*.yaml"]},
    install_requires=[
        "torch>=2.4",  # any recent torch, CUDA build included; scripts/env.sh pins the CPU build
        # 5.25 made the hub's own "kernels" distribution a requirement and imports it when it is
        # installed; its import name is this package's kernels/, so transformers then fails to
        # import ("cannot import name 'CUDAProperties' from 'kernels'").
        "transformers>=5.0,<5.25",
        "tokenizers",
        "safetensors",
        "gguf",
        "numpy",
        "pyyaml",
        "tqdm",
        "nvtx",
        "matplotlib",
    ],
    extras_require={
        # Tests, benchmarks and the peers the benchmarks measure against.
        "dev": [
            "pytest",
            "pytest-benchmark",
            "triton",
            "peft",
            "accelerate",
            "datasets",
            "trl==1.12.0",
        ],
        # GPU-only fast paths; never imported unconditionally.
        "gpu": ["triton", "flash-attn", "vllm"],
    },
    entry_points={"console_scripts": ["cai = cai.cli:main"]},
)
