"""ipadapter_min: IP-Adapter on Stable Diffusion 1.5 in plain PyTorch."""
from setuptools import find_packages, setup

setup(
    name="ipadapter_min",
    version="0.1.0",
    description="From-scratch IP-Adapter for Stable Diffusion 1.5 in pure PyTorch",
    python_requires=">=3.10",
    # Two import names and no others: the attention kernels and the benchmarks live inside
    # ipadapter_min (a top-level "kernels" or "benchmarks" is another project's name on PyPI).
    packages=find_packages(include=["ipadapter_min", "ipadapter_min.*", "weights_convert", "weights_convert.*"]),
    package_data={"ipadapter_min.demo": ["weights/*.safetensors"]},  # the demo model, trained here
    # Ranges, from the oldest releases the suite ran with (constraints-oldest.txt; README:
    # "Versions") up, so that the package can be embedded beside another torch. constraints.txt
    # holds the exact set the suite was last run with: the README's install command uses it.
    # open_clip needs torchvision.
    install_requires=[
        "torch>=2.6.0",
        "torchvision>=0.21.0",
        "safetensors>=0.8.0",
        "open_clip_torch>=2.26.1",
        "einops>=0.7.0",
        "numpy>=1.26.4",
        "pillow>=10.3.0",
        "tqdm>=4.66.0",
        'triton; platform_system == "Linux"',
    ],
    extras_require={
        # Oracles for parity tests, and matplotlib for the benchmark's plot: the runtime never
        # imports them. The floors are the releases the suite was last run with (constraints.txt
        # has them exactly): the tests assert the oracles' behaviour, and hypothesis draws its
        # derandomized examples per version. README: "Moving the pins" says how to update them.
        "test": [
            "pytest>=9.2.0",
            "hypothesis>=6.170.27",
            "diffusers>=0.42.1",
            "peft>=0.22.0",  # diffusers' load_lora_weights, the LoRA tests' reference; it brings accelerate
            "accelerate>=1.16.0",  # which changes how diffusers loads: reference_models.from_folder
            "transformers>=5.25.0",  # which brings Hugging Face's kernels package: tests/test_coexistence.py
            "tokenizers>=0.23.3",
            "huggingface_hub>=2.5.0",
            "matplotlib>=3.11.2",
        ],
    },
)
