"""``python -m weights_convert KIND SRC -o OUT.safetensors``: turn downloaded checkpoints into the
project's safetensors layout, which later loads as a plain memory map with no renaming.

  sd15           Stable Diffusion 1.5: original single file (.safetensors/.ckpt) or diffusers folder
  ip-adapter     IP-Adapter for SD1.5: official .bin (nested) or .safetensors (flat)
  image-encoder  CLIP image encoder: transformers CLIPVisionModelWithProjection folder (ViT-H/14, ViT-bigG/14)
  controlnet     ControlNet for SD1.5: original .pth/.safetensors (control_v11*_sd15_*) or diffusers folder
  t2i-adapter    T2I-Adapter for SD1.5: original TencentARC .pth (full or light) or diffusers folder

An existing OUT is never overwritten without --force; OUT is written atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .convert import write_controlnet, write_image_encoder, write_ip_adapter, write_sd15, write_t2i_adapter
from ipadapter_min.cli.parsing import Parser, failed

DTYPES = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


COMMANDS = {
    "sd15": (write_sd15, "Stable Diffusion 1.5: original single file (.safetensors/.ckpt) or diffusers folder"),
    "ip-adapter": (write_ip_adapter, "IP-Adapter for SD1.5: official .bin or .safetensors"),
    "image-encoder": (write_image_encoder, "CLIP image encoder: transformers CLIPVisionModelWithProjection folder"),
    "controlnet": (write_controlnet, "ControlNet for SD1.5: original .pth/.safetensors or diffusers folder"),
    "t2i-adapter": (write_t2i_adapter, "T2I-Adapter for SD1.5: original TencentARC .pth or diffusers folder"),
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m weights_convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, (_, help_text) in COMMANDS.items():
        cmd = sub.add_parser(kind, help=help_text, description=help_text)
        cmd.add_argument("src", type=Path, help="the downloaded file or folder")
        cmd.add_argument("-o", "--out", type=Path, required=True, help="output .safetensors file")
        cmd.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
        if kind == "sd15":
            cmd.add_argument("--dtype", choices=list(DTYPES), default="keep",
                             help="cast floating-point weights (default: keep)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    write, _ = COMMANDS[args.kind]
    extra = {"dtype": DTYPES[args.dtype]} if args.kind == "sd15" else {}
    try:
        if args.out.suffix != ".safetensors":
            raise ValueError(f"--out must end in .safetensors, got {args.out}")
        if args.out.exists() and not args.force:
            raise FileExistsError(f"{args.out} already exists (pass --force to overwrite it)")
        print(write(args.src, args.out, args.force, **extra))
    except (ValueError, OSError, KeyboardInterrupt) as exc:  # CheckpointError is a ValueError
        return failed(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
