"""The sample command's structure controls: ControlNets and T2I-Adapters, each with its control
image, scale and (ControlNets) step range; several add up."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from ..loading.controls import load_controlnet, load_t2i_adapter
from ..pipelines.controls import ControlNetInput, T2IAdapterInput
from ..pipelines.image_processing import require_output_size
from .image_files import open_image
from .parsing import finite, fraction


def add_options(parser: argparse.ArgumentParser) -> None:
    """ControlNets and T2I-Adapters."""
    control = parser.add_argument_group(
        "structure (ControlNet)",
        "Repeat --controlnet and --control-image for several ControlNets; their effects add up. --control-scale, "
        "--control-start and --control-end take one value for all, or one per --controlnet in order. The control "
        "image (an edge, depth or pose map, as the ControlNet was trained on) sets the output size unless an init "
        "image or --width/--height do, and must then be of that size.")
    control.add_argument("--controlnet", type=Path, action="append", metavar="FILE",
                         help="ControlNet weights: the original control_v11*_sd15_*.pth/.safetensors, a diffusers "
                              "folder, or a converted file")
    control.add_argument("--control-image", type=Path, action="append", metavar="FILE",
                         help="the control image of the --controlnet at the same position")
    control.add_argument("--control-scale", type=finite, action="append", metavar="S",
                         help="how strongly the ControlNet acts (default 1.0)")
    control.add_argument("--control-start", type=fraction, action="append", metavar="F",
                         help="the fraction of the steps after which it starts acting (default 0.0)")
    control.add_argument("--control-end", type=fraction, action="append", metavar="F",
                         help="the fraction of the steps after which it stops acting (default 1.0)")
    control.add_argument("--guess-mode", action="store_true",
                         help="the ControlNets guide the prompt's half of classifier-free guidance only, their "
                              "shallow layers damped: they recognise the content with an empty --prompt")
    t2i = parser.add_argument_group(
        "structure (T2I-Adapter)",
        "A lighter alternative to ControlNet: the adapter reads its image once, not at every step. Repeat "
        "--t2i-adapter and --adapter-image for several; their features add up, each times its --adapter-scale "
        "(one value for all, or one per adapter). They combine with ControlNets and image prompts.")
    t2i.add_argument("--t2i-adapter", type=Path, action="append", metavar="FILE",
                     help="T2I-Adapter weights: an original TencentARC t2iadapter_*_sd1*.pth (full or light), a "
                          "diffusers folder, or a converted file")
    t2i.add_argument("--adapter-image", type=Path, action="append", metavar="FILE",
                     help="the control image of the --t2i-adapter at the same position (grayscale for sketch and "
                          "canny adapters: colour images are converted)")
    t2i.add_argument("--adapter-scale", type=finite, action="append", metavar="S",
                     help="how strongly the T2I-Adapter acts (default 1.0)")


def per_model(args: argparse.Namespace, name: str, models: str, default: float) -> list[float]:
    """One value per model (``--controlnet`` or ``--t2i-adapter``) from a repeated option given 0, 1
    or N times."""
    values, count = getattr(args, name) or [], len(getattr(args, models) or [])
    if len(values) not in (0, 1, count):
        raise ValueError(f"--{name.replace('_', '-')}: give one value, or one per --{models.replace('_', '-')} "
                         f"({count}), not {len(values)}")
    return values * count if len(values) == 1 else values or [default] * count


def paired(args: argparse.Namespace, models: str, images: str) -> list[tuple[Path, Path]]:
    """(model, image) pairs of a repeated model option and its repeated image option."""
    given, pictures = getattr(args, models) or [], getattr(args, images) or []
    flags = [f"--{name.replace('_', '-')}" for name in (models, images)]
    if len(given) != len(pictures):
        first, second = flags if len(pictures) < len(given) else flags[::-1]
        raise ValueError(f"{first} needs {second}: {len(given)} × {flags[0]}, {len(pictures)} × {flags[1]}")
    for model in given:
        if not model.exists():
            raise ValueError(f"{flags[0]} {model}: no such file or folder")
    return list(zip(given, pictures))


def check_controls(args: argparse.Namespace) -> list[tuple[str, Path, Image.Image]]:
    """The ControlNet and T2I-Adapter options, checked; (flag, path, image) of each control image,
    opened once for every image of a sweep: the ControlNets' first, then the T2I-Adapters'."""
    nets, adapters = paired(args, "controlnet", "control_image"), paired(args, "t2i_adapter", "adapter_image")
    if args.guess_mode and not nets:
        raise ValueError("--guess-mode applies to ControlNets: give --controlnet and --control-image")
    args.control_scale = per_model(args, "control_scale", "controlnet", 1.0)
    args.control_start = per_model(args, "control_start", "controlnet", 0.0)
    args.control_end = per_model(args, "control_end", "controlnet", 1.0)
    args.adapter_scale = per_model(args, "adapter_scale", "t2i_adapter", 1.0)
    for start, end in zip(args.control_start, args.control_end):
        if not 0 <= start < end <= 1:
            raise ValueError(f"--control-start {start} and --control-end {end}: need 0 ≤ --control-start < "
                             "--control-end ≤ 1")
    return [(flag, path, open_image(path, flag)) for flag, pairs in (("--control-image", nets),
                                                                     ("--adapter-image", adapters))
            for _, path in pairs]


def check_control_sizes(controls: list[tuple[str, Path, Image.Image]], width: int, height: int) -> None:
    for flag, path, image in controls:
        require_output_size(image, width, height, f"{flag} {path}")


def load_controls(args: argparse.Namespace, images: list[Image.Image], device: str, dtype: torch.dtype
                  ) -> list[ControlNetInput | T2IAdapterInput]:
    """The ControlNets and T2I-Adapters, loaded, with their control images (``check_controls``')."""
    nets = args.controlnet or []
    controls = [ControlNetInput(load_controlnet(net, device, dtype), image, scale, start, end, args.guess_mode)
                for net, image, scale, start, end in zip(nets, images, args.control_scale, args.control_start,
                                                         args.control_end)]
    return controls + [T2IAdapterInput(load_t2i_adapter(adapter, device, dtype), image, scale)
                       for adapter, image, scale in zip(args.t2i_adapter or [], images[len(nets):],
                                                        args.adapter_scale)]
