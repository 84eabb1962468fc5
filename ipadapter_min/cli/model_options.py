"""The sample command's model: which SD1.5 (the demo model without --model), its LoRAs and
VAE, and where and in what precision it runs."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import demo
from ..formats.lora import lora_argument
from ..formats.sd15 import declared_configs
from ..pipelines.generation_memory import check_fits
from .parsing import integer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_options(parser: argparse.ArgumentParser) -> None:
    """The model, its LoRAs and VAE, and where it runs."""
    g = parser.add_argument_group("model and device", "What to run, and where. Without --model: the demo "
                              "model, at its native 64×64.")
    g.add_argument("--model", type=Path,
                   help="SD1.5 weights: a file made by `python -m weights_convert sd15`, an original single-file "
                        "checkpoint (.safetensors or .ckpt), or a diffusers folder. Without it: the demo model "
                        "shipped in the package (a toy world of coloured shapes at 64×64, trained here; see the "
                        "README), with its own IP-Adapter and image encoder for --image")
    g.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="a LoRA merged into the UNet and text encoder at load time, times WEIGHT (default 1.0): a "
                        "kohya-ss / A1111 .safetensors (lora_unet_*, lora_te_*; LoCon's convolutions too) or diffusers' "
                        "pytorch_lora_weights.safetensors (or its folder). Repeat for several; they add up")
    g.add_argument("--vae", type=Path, metavar="FILE",
                   help="an SD1.5 VAE instead of the model's own, e.g. stabilityai's sd-vae-ft-mse: the original "
                        "vae-ft-mse-840000-ema-pruned.safetensors (or .ckpt), or a diffusers folder (config.json + "
                        "diffusion_pytorch_model.safetensors)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    g.add_argument("--dtype", choices=sorted(DTYPES),
                   help="weights and activations precision (default: fp16 on CUDA, fp32 on the CPU)")
    g.add_argument("--packed-convolutions", action="store_true",
                   help="fp32 on the CPU: convolution weights reordered once for oneDNN and upsampling done in "
                   "four phases (ipadapter_min.models.cpu_convolutions): about 15%% less time per image at 256 px, "
                   "up to ~2 GB more memory at full size; pixels move by fp32 rounding, so images differ from "
                   "runs without it by 1/255 here and there")
    g.add_argument("--threads", type=integer(1, 4096), metavar="N",
                   help="CPU threads for torch (default: torch's; 1 for the demo model, whose layers are too small "
                        "to share: as fast on an idle machine, and not slowed many times over by a busy one)")


def use_demo_model(args: argparse.Namespace) -> None:
    """No --model: the demo world's weights, at their native size; an --image alone gets the demo's
    adapter and image encoder."""
    if not demo.installed():
        raise ValueError(f"no --model given, and the demo weights are not in this install ({demo.WEIGHTS}): "
                         f"give --model, or train them with python -m ipadapter_min.demo train")
    args.model = demo.WEIGHTS
    args.width, args.height = args.width or demo.NATIVE_SIZE, args.height or demo.NATIVE_SIZE
    args.threads = 1 if args.threads is None else args.threads
    if args.image and not args.ip_adapter and not args.image_encoder:
        args.ip_adapter, args.image_encoder = demo.ADAPTER, demo.IMAGE_ENCODER


def check_files(args: argparse.Namespace) -> None:
    """The model (the demo's without --model), LoRA and VAE files exist; ``args.loras``: (file,
    weight) pairs from --lora."""
    if args.model is None:
        use_demo_model(args)
    if not args.model.exists():
        raise ValueError(f"--model {args.model}: no such file or folder")
    args.loras = [lora_argument(text) for text in args.lora or []]
    for path, _ in args.loras:
        if not path.exists():
            raise ValueError(f"--lora {path}: no such file")
    if args.vae is not None and not args.vae.exists():
        raise ValueError(f"--vae {args.vae}: no such file or folder")


def check_device(args: argparse.Namespace) -> None:
    """--device exists here; --dtype defaults to fp16 on CUDA, fp32 on the CPU."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")


def check_memory(args: argparse.Namespace) -> None:
    """The generation fits in the device's memory, by the model's declared configs (the first of
    its files that the checks read: run last)."""
    configs = declared_configs(args.model)
    check_fits(configs["unet"], configs["vae"], args.width, args.height, args.num_images, DTYPES[args.dtype],
               args.device)
