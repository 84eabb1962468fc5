"""How fast ``python -m ipadapter_min.train`` trains, from images and from a ``--cache``.

    python -m ipadapter_min.benchmarks.training                         # full SD1.5 + ViT-H/14, 256 px, CPU
    python -m ipadapter_min.benchmarks.training --resolution 512 --batch-size 8 --steps 30 --device cuda
    torchrun --nproc_per_node 2 -m ipadapter_min.benchmarks.training …  # not this: see --processes

The first run makes random full-size weights (SD1.5 and a ViT-H/14 image encoder, built with the
project's own classes: nothing is downloaded and diffusers is not needed) in the project's
converted formats, and a folder of synthetic images with captions, in ``--workdir``. Then the
real command line trains with and without ``--cache`` (each in a fresh process, ``--processes``
of them under torchrun if > 1); figures come from its log.csv: the median samples/s over the
steps after the first (which pays for warm-up), and the wall time of the cache's one-off build.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..formats.files import save_safetensors, write_atomically
from ..formats.image_encoder import image_encoder_metadata
from ..formats.sd15 import sd15_metadata
from ..models.configs import ImageEncoderConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..models.image_encoder import ImageEncoder
from ..models.text_encoder import TextEncoder
from ..models.unet import UNet
from ..models.vae import VAE


def make_weights(workdir: Path) -> tuple[Path, Path]:
    """Random full-size weights (PyTorch's default init, fp16 on disk) in the converted formats."""
    sd15, encoder = workdir / "sd15-random.safetensors", workdir / "vit-h-random.safetensors"
    if not sd15.exists():
        configs = {"unet": UNetConfig(), "vae": VAEConfig(), "text_encoder": TextEncoderConfig()}
        tensors = {}
        for part, model in (("unet", UNet), ("vae", VAE), ("text_encoder", TextEncoder)):
            tensors.update({f"{part}.{k}": v.half() for k, v in model(configs[part]).state_dict().items()})
        save_safetensors(tensors, sd15, sd15_metadata(configs))
    if not encoder.exists():
        config = ImageEncoderConfig()
        save_safetensors({k: v.half() for k, v in ImageEncoder(config).state_dict().items()}, encoder,
                         image_encoder_metadata(config))
    return sd15, encoder


def make_images(workdir: Path, count: int) -> Path:
    """Synthetic photographs-to-be: smooth colour fields plus noise, 640×480, with captions."""
    folder = workdir / f"images-{count}"
    if not folder.exists():
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:480, 0:640] / 480
        for i in range(count):
            phase = rng.uniform(0, 6, 3)
            pixels = 127 + 100 * np.sin(x[..., None] * (i + 3) + y[..., None] * 2 + phase) + rng.normal(0, 10, (480, 640, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
            (folder / f"{i:04d}.txt").write_text(f"a striped pattern, number {i}")
    return folder


def train(args: argparse.Namespace, model: Path, encoder: Path, data: Path, out: Path, cache: Path | None) -> dict:
    command = ["-m", "ipadapter_min.train", "--model", str(model), "--image-encoder", str(encoder), "--data", str(data),
               "--resolution", str(args.resolution), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--save-every", "0", "--mixed-precision", args.mixed_precision, "--out", str(out), "--force",
               "--no-progress"]
    if args.device:
        command += ["--device", args.device]
    if cache is not None:
        command += ["--cache", str(cache)]
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(args.processes)]
                                   if args.processes > 1 else [])
    started = time.perf_counter()
    subprocess.run(launcher + command, check=True)
    wall = time.perf_counter() - started
    rows = list(csv.DictReader((out / "log.csv").open()))
    speeds = [float(r["samples_per_second"]) for r in rows[1:]] or [float(rows[0]["samples_per_second"])]
    return {"samples_per_second": statistics.median(speeds), "wall_seconds": round(wall, 1),
            "first_step_seconds": float(rows[0]["elapsed_seconds"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ipadapter_min.benchmarks.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/ipadapter_min_training_bench"))
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--images", type=int, default=8, help="dataset size (the cache encodes each image once)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--device", help="passed to the trainer (default: its own)")
    p.add_argument("--processes", type=int, default=1, help="run the trainer under torchrun with this many")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, encoder = make_weights(args.workdir)
    data = make_images(args.workdir, args.images)
    cache = args.workdir / f"cache-{args.resolution}-{args.mixed_precision}-{time.time_ns()}"
    results = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "from images": train(args, model, encoder, data, args.workdir / "run-images", None),
               "with --cache": train(args, model, encoder, data, args.workdir / "run-cache", cache)}
    speed_up = results["with --cache"]["samples_per_second"] / results["from images"]["samples_per_second"]
    results["speed_up"] = round(speed_up, 2)
    print(json.dumps(results, indent=1))
    print("\n| | samples/s | run wall time (s) |\n|---|---|---|")
    for name in ("from images", "with --cache"):
        print(f"| {name} | {results[name]['samples_per_second']:.3f} | {results[name]['wall_seconds']} |")
    print(f"--cache speed-up per step: ×{speed_up:.2f} (the cached run's wall time includes building the cache)")
    if args.json:
        text = json.dumps(results, indent=1)
        write_atomically(args.json, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
