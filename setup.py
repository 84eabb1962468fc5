"""ipadapter_min: IP-Adapter on Stable Diffusion 1.5 in plain PyTorch."""
from setuptools import find_packages, setup

setup(
    name="ipadapter_min",
    version="0.1.0",
    description="From-scratch IP-Adapter for Stable Diffusion 1.5 in pure PyTorch",
    python_requires=">=3.10",
    packages=find_packages(include=["ipadapter_min*", "kernels*", "weights_convert*", "benchmarks*"]),
    install_requires=[
        # Pinned to the releases in this project's wheel store; open_clip needs torchvision.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "safetensors",
        "open_clip_torch",
        "einops",
        "numpy",
        "pillow",
        "tqdm",
        'triton; platform_system == "Linux"',
    ],
    extras_require={
        # Oracles for parity tests, and matplotlib for the benchmark's plot: the runtime never
        # imports them.
        "test": ["pytest", "hypothesis", "diffusers", "transformers", "matplotlib"],
    },
)
