"""The ``parameters`` text of each PNG, in AUTOMATIC1111's layout, so that the tools that read
A1111's images (its PNG Info tab, civitai, prompt readers built on its
``parse_generation_parameters``) show how an image was made:

    a red bicycle
    Negative prompt: blurry
    Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly, ...

The prompt, the negative prompt's line when there is one, then one line of ``Key: value``
pairs; a value holding a comma, a colon or a line break is written in JSON quotes, as A1111
does. A1111's keys come first (with its meanings: ``Clip skip`` 1 is no skip), the settings it
has no key for follow under keys of their own (``IP-Adapter scale: 0.7``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import demo
from .parsing import value_text

# our sampler names → AUTOMATIC1111's for the same samplers
A1111_SAMPLERS = {"ddim": "DDIM", "euler": "Euler", "euler-a": "Euler a", "dpmpp-2m": "DPM++ 2M",
                  "dpmpp-2m-karras": "DPM++ 2M Karras"}


def quote(value) -> str:
    text = value_text(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_text(prompt: str, negative_prompt: str, settings: dict) -> str:
    lines = [prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else [])
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in settings.items() if value is not None))
    return "\n".join(lines)


def name_of(path: Path) -> str:
    """A model's name as A1111 shows it: the file name without its extension."""
    if path == demo.WEIGHTS:
        return "ipadapter_min demo"
    return path.name if path.is_dir() else path.stem


def generation_parameters(args: argparse.Namespace, groups: list[argparse.Namespace], index: int,
                          size: tuple[int, int]) -> str:
    """The text for image ``index`` of a generation with ``args`` (one value per option)."""
    settings = {
        "Steps": args.steps, "Sampler": A1111_SAMPLERS[args.sampler],
        "CFG scale": args.guidance, "Seed": args.seed, "Size": f"{size[0]}x{size[1]}", "Model": name_of(args.model),
        "VAE": args.vae and name_of(args.vae), "Clip skip": args.clip_skip + 1 if args.clip_skip else None,
        "Eta DDIM": args.eta or None,
        "Batch size": args.num_images if args.num_images > 1 else None,
        "Batch pos": index if args.num_images > 1 else None,
        "Init image": args.init_image and args.init_image.name, "Mask": args.mask and args.mask.name,
        "Denoising strength": args.strength if args.init_image else None,
        "Inpaint area": "Only masked" if args.mask_crop is not None else None,
        "Masked area padding": args.mask_crop,
        "Long prompt": "chunk" if args.long_prompt == "chunk" else None,
        "LoRA": " ".join(f"{name_of(path)}:{value_text(weight)}" for path, weight in args.loras) or None,
        "Precision": args.dtype,
    }
    for i, net in enumerate(args.controlnet or []):
        settings[f"ControlNet {i}"] = ", ".join(
            [f"Model: {name_of(net)}", f"Image: {args.control_image[i].name}", f"Weight: {args.control_scale[i]:g}",
             f"Guidance Start: {args.control_start[i]:g}", f"Guidance End: {args.control_end[i]:g}"]
            + (["Guess Mode: True"] if args.guess_mode else []))
    for i, adapter in enumerate(args.t2i_adapter or []):
        settings[f"T2I-Adapter {i}"] = (f"Model: {name_of(adapter)}, Image: {args.adapter_image[i].name}, "
                                        f"Weight: {args.adapter_scale[i]:g}")
    for number, group in enumerate(g for g in groups if g.ip_adapter):
        settings.update(image_prompt_settings(group, "IP-Adapter" + (f" {number + 1}" if number else "")))
    if groups[0].ip_adapter and args.reference_attention:
        settings["Attention"] = "reference"
    return a1111_text(args.prompt, args.negative_prompt, settings)


def image_prompt_settings(group: argparse.Namespace, key: str) -> dict:
    """One IP-Adapter's settings, the defaults left out."""
    scale = group.scale if isinstance(group.scale, float) else json.dumps(group.scale)
    images = group.image or []
    return {
        key: name_of(group.ip_adapter),
        f"{key} image": " ".join(p.name for p in images) if images else None,
        f"{key} embeds": group.embeds.name if group.embeds else None,
        f"{key} scale": scale,
        f"{key} weight type": group.weight_type,
        f"{key} composition weight": group.composition_weight,
        f"{key} combine": group.image_combine if len(images) > 1 else None,
        f"{key} mask": " ".join(p.name for p in group.image_mask or []) or None,
        f"{key} start": group.start or None,
        f"{key} end": group.end if group.end != 1.0 else None,
        f"{key} range": "sigmas" if group.sigma_range else None,
        f"{key} embeds scaling": group.embeds_scaling if group.embeds_scaling != "V only" else None,
        f"{key} negative": " ".join(p.name for p in group.negative_image or []) or None,
        f"{key} negative noise": group.negative_noise,
        f"{key} black negative": True if group.black_negative else None,
        f"{key} crop": False if group.no_crop else None,
    }
