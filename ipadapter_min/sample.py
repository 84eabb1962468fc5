"""``python -m ipadapter_min.sample``: generate images from a prompt.

    python -m ipadapter_min.sample --model sd15.safetensors --prompt "a red bicycle" --out bike.png
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from PIL import PngImagePlugin

from weights_convert.files import CheckpointError

from .pipeline import StableDiffusion, check_size

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ipadapter_min.sample",
        description="Generate images with Stable Diffusion 1.5 (DDIM, classifier-free guidance). "
                    "The same seed gives the same image as diffusers' StableDiffusionPipeline with DDIMScheduler.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, type=Path,
                   help="SD1.5 weights: a file made by `python -m weights_convert sd15`, an original single-file "
                        "checkpoint (.safetensors or .ckpt), or a diffusers folder")
    p.add_argument("--prompt", default="", help="what the image should show")
    p.add_argument("--negative-prompt", default="", help="what the image should not show (used by guidance)")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; ≤ 1 turns it off")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise (drawn on the CPU, as diffusers does)")
    p.add_argument("--width", type=int, default=512, help="image width, a multiple of 8")
    p.add_argument("--height", type=int, default=512, help="image height, a multiple of 8")
    p.add_argument("--num-images", type=int, default=1, help="images to generate; several are written as OUT-0.png, OUT-1.png, …")
    p.add_argument("--clip-skip", type=int, default=0, help="stop the text encoder this many layers early (diffusers' clip_skip)")
    p.add_argument("--out", type=Path, default=Path("out.png"), help="PNG file to write")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations precision")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def output_paths(out: Path, count: int) -> list[Path]:
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out}")
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def validate(args: argparse.Namespace) -> list[Path]:
    """Every check that needs no model, so bad input fails before minutes of loading."""
    if not args.model.exists():
        raise ValueError(f"--model {args.model}: no such file or folder")
    check_size(args.width, args.height)
    if args.steps < 1 or args.steps > 1000:
        raise ValueError(f"--steps must be in [1, 1000], got {args.steps}")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    paths = output_paths(args.out, args.num_images)
    existing = [p for p in paths if p.exists()]
    if existing and not args.force:
        raise ValueError(f"{existing[0]} already exists (pass --force to overwrite it)")
    return paths


def generation_parameters(args: argparse.Namespace, index: int) -> str:
    """Written into the PNG so that an image says how it was made."""
    fields = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
              "guidance": args.guidance, "seed": args.seed, "image_index": index, "width": args.width,
              "height": args.height, "clip_skip": args.clip_skip, "sampler": "DDIM", "model": args.model.name,
              "dtype": args.dtype}
    return "\n".join(f"{k}: {v}" for k, v in fields.items())


def save_png(image, path: Path, parameters: str) -> None:
    """Write atomically: a crash leaves either the old file or the whole new one."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = validate(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            pipe = StableDiffusion.from_file(args.model, device=args.device, dtype=DTYPES[args.dtype])
        except CheckpointError as exc:
            raise ValueError(str(exc)) from None
        images = pipe(args.prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance, seed=args.seed,
                      width=args.width, height=args.height, num_images=args.num_images, clip_skip=args.clip_skip,
                      progress=not args.no_progress)
        for i, (image, path) in enumerate(zip(images, paths)):
            save_png(image, path, generation_parameters(args, i))
            print(f"wrote {path}")
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
