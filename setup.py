"""ipadapter_min: IP-Adapter on Stable Diffusion 1.5 in plain PyTorch."""
from setuptools import find_packages, setup

setup(
    name="ipadapter_min",
    version="0.1.0",
    description="From-scratch IP-Adapter for Stable Diffusion 1.5 in pure PyTorch",
    python_requires=">=3.10",
    packages=find_packages(include=["ipadapter_min*", "kernels*", "weights_convert*", "benchmarks*"]),
    package_data={"ipadapter_min.demo": ["weights/*.safetensors"]},  # the demo model, trained here
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
        # imports them. Pinned to the versions the suite was last run with: the tests assert the
        # oracles' behaviour, and hypothesis derandomizes its examples per version. README: "Moving
        # the pins" says how to update them.
        "test": [
            "pytest==9.2.0",
            "hypothesis==6.170.15",
            "diffusers==0.42.1",
            "peft==0.21.2",  # diffusers' load_lora_weights, the LoRA tests' reference; it brings accelerate
            "accelerate==1.15.0",  # which changes how diffusers loads: reference_models.from_folder
            "transformers==5.23.0",
            "tokenizers==0.23.3",
            "huggingface_hub==2.4.0",
            "matplotlib==3.11.2",
        ],
    },
)
