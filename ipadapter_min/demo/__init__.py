"""The demo world: coloured shapes drawn procedurally, and SD1.5-structured models small enough to
train on a laptop CPU in a few hours, so that the whole method runs with nothing downloaded.
This file names the shipped weights, which the command lines default to; it imports nothing.

It imports from: cli, formats, loading, models, pipelines, samplers.
"""

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"  # what `python -m ipadapter_min.demo train` writes to OUT/weights
NATIVE_SIZE = 64
MODEL_FILES = ("unet.safetensors", "vae.safetensors", "text_encoder.safetensors")
ADAPTER, IMAGE_ENCODER = WEIGHTS / "ip_adapter.safetensors", WEIGHTS / "image_encoder.safetensors"


def installed() -> bool:
    return all((WEIGHTS / name).is_file() for name in MODEL_FILES)
