"""``python -m weights_convert``: turn downloaded checkpoints into the project's safetensors layout.

Converted files load as a plain memory map, with no renaming at run time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .files import CheckpointError, save_safetensors
from .ip_adapter import add_ip_adapter_command, write_ip_adapter
from .sd15 import read_sd15, sd15_metadata

DTYPES = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def convert_sd15(src: Path, out: Path, dtype: torch.dtype | None, force: bool) -> None:
    tensors, configs = read_sd15(src)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_safetensors(tensors, out, sd15_metadata(configs), overwrite=force)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m weights_convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    sd = sub.add_parser("sd15", help="Stable Diffusion 1.5: original single file (.safetensors/.ckpt) or diffusers folder")
    sd.add_argument("src", type=Path, help="checkpoint file or diffusers folder")
    sd.add_argument("-o", "--out", type=Path, required=True, help="output .safetensors file")
    sd.add_argument("--dtype", choices=list(DTYPES), default="keep", help="cast floating-point weights (default: keep)")
    sd.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    add_ip_adapter_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.out.suffix != ".safetensors":
            raise ValueError(f"--out must end in .safetensors, got {args.out}")
        if args.out.exists() and not args.force:
            raise FileExistsError(f"{args.out} already exists (pass --force to overwrite it)")
        if args.kind == "sd15":
            convert_sd15(args.src, args.out, DTYPES[args.dtype], args.force)
        elif args.kind == "ip-adapter":
            print(write_ip_adapter(args.src, args.out, args.force))
    except (CheckpointError, ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
