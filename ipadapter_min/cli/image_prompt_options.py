"""The sample command's image prompts: one group of flags per IP-Adapter.

Every ``--ip-adapter FILE`` starts a group, and the image-prompt flags after it belong to it:

    --ip-adapter ip-adapter-plus_sd15.bin --image-encoder models/image_encoder --image scene.png --scale 0.6 \\
    --ip-adapter ip-adapter-plus-face_sd15.bin --image-encoder models/image_encoder --image face.png \\
        --image-mask face-region.png --start 0.2

With one adapter (or none: the demo model's) they may stand anywhere, as they always could; with
several, an image-prompt flag before the first ``--ip-adapter`` is an error. Each group becomes a
namespace of the same parser, so each has every image-prompt option.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from PIL import Image

from ..ip_adapter.combine import COMBINE
from ..ip_adapter.embeds_scaling import EMBEDS_SCALING
from ..ip_adapter.layers import expand_scale
from ..ip_adapter.negative_noise import KINDS as NOISE_KINDS, negative_noise
from ..ip_adapter.weight_types import WEIGHT_TYPES, weight_type
from ..kernels import decoupled_attention, decoupled_attention_reference
from ..pipelines.image_prompt_input import ImagePromptInput, image_prompt_hook
from .image_embeds import read_image_embeds, save_image_embeds
from .image_files import open_image, open_mask
from .parsing import finite, flag_spans, fraction
from .sweeps import Sweep, comma_list

GROUP_DESTS = ("ip_adapter", "image_encoder", "image", "scale", "image_mask", "start", "end", "sigma_range",
               "weight_type", "composition_weight", "embeds_scaling", "image_combine", "negative_image",
               "negative_noise", "black_negative", "embeds", "save_embeds", "no_crop")


def add_options(parser: argparse.ArgumentParser) -> None:
    """One image-prompt group's options (every --ip-adapter starts a group)."""
    ip = parser.add_argument_group(
        "image prompt (IP-Adapter)",
        "Give --ip-adapter, --image-encoder and --image together (or --embeds instead of the last two). --scale "
        "(λ) trades the reference image against the text prompt: 1.0 follows the image closely and largely "
        "overrides the text; about 0.5 balances image and text; 0 ignores the image and gives exactly the image "
        "made without an adapter. Use an empty --prompt for image variations. Several adapters: every "
        "--ip-adapter starts a group, and the image-prompt flags after it (all of this section but "
        "--reference-attention) belong to it; e.g. --ip-adapter plus.bin --image-encoder enc --image scene.png "
        "--ip-adapter plus-face.bin --image-encoder enc --image face.png --image-mask face-area.png.")
    ip.add_argument("--ip-adapter", type=Path, help="IP-Adapter weights: official .bin/.safetensors "
                    "(ip-adapter_sd15, _light, -plus, -plus-face, -full-face, _vit-G) or a converted file")
    ip.add_argument("--image-encoder", type=Path, help="CLIP image encoder: the release's image_encoder folder "
                    "(config.json + model.safetensors; ViT-H/14, or ViT-bigG/14 for the vit-G adapter) or a converted file")
    ip.add_argument("--image", type=Path, nargs="+", action="extend", metavar="FILE",
                    help="reference image(s); several are combined by --image-combine")
    ip.add_argument("--scale", type=scale_list, help="λ: a number, or a JSON dict of per-block values "
                    "as diffusers' set_ip_adapter_scale takes, e.g. '{\"down\": {\"block_2\": [0.0, 1.0]}}' "
                    "(blocks not named get 0); default 1.0. A comma list (0,0.25,0.5,0.75,1) makes one image per "
                    "value and a grid of them, as comma lists of --seed, --sampler and --guidance do (two lists: "
                    "a grid of rows and columns)")
    ip.add_argument("--image-combine", choices=COMBINE,
                    help="several reference images: concatenate their tokens (as diffusers), or combine their "
                         "embeddings into one image's as ComfyUI's combine_embeds does (average, add, subtract: the "
                         "first minus the mean of the others, norm average)")
    ip.add_argument("--image-mask", type=Path, nargs="+", action="extend", metavar="FILE",
                    help="one mask per --image (white: where that image acts; diffusers' ip_adapter_masks), of the "
                         "output's aspect ratio; each image then gets its own attention")
    ip.add_argument("--start", type=fraction, help="the fraction of the steps after which the image starts acting "
                    "(default 0.0)")
    ip.add_argument("--end", type=fraction, help="the fraction of the steps after which it stops (default 1.0)")
    ip.add_argument("--sigma-range", action="store_true",
                    help="read --start/--end as ComfyUI's start_at/end_at: fractions turned into noise levels σ "
                         "(percent_to_sigma), the image acting while σ lies between them, instead of fractions of "
                         "the steps; with DDIM the two differ by a step or so")
    ip.add_argument("--weight-type", metavar="NAME",
                    help="ComfyUI_IPAdapter_plus's weight type: λ per layer from --scale as its weight (e.g. "
                         "'style transfer' uses the style layers only, 'composition' the layout ones); one of: "
                         + ", ".join(WEIGHT_TYPES))
    ip.add_argument("--composition-weight", type=finite,
                    help="the second weight of 'style and composition' (default 1.0) and of the precise types "
                         "(their style_boost / composition_boost; default the weight)")
    ip.add_argument("--embeds-scaling", metavar="MODE",
                    help="ComfyUI's embeds scaling: where λ applies (default 'V only': to the attention output, "
                         "as diffusers); one of: " + ", ".join(EMBEDS_SCALING))
    ip.add_argument("--negative-image", type=Path, nargs="+", action="extend", metavar="FILE",
                    help="the negative side of the image prompt (one, or one per --image) instead of the "
                         "reference's default: a zero embedding, or for plus/full-face adapters the encoder's "
                         "features of an all-zero normalised image (diffusers', the default here; ComfyUI encodes "
                         "a black image instead: --black-negative)")
    ip.add_argument("--black-negative", action="store_true",
                    help="ComfyUI's default negative for plus and full-face adapters: the encoder's features of a "
                         "black image (the default here is diffusers': of an all-zero normalised image)")
    ip.add_argument("--negative-noise", metavar="KIND[:STRENGTH]",
                    help="a noise image as the negative (ComfyUI's IPAdapterNoise: fade, dissolve, gaussian or "
                         "shuffle, made from the first --image; strength default 1.0)")
    ip.add_argument("--embeds", type=Path, metavar="FILE",
                    help="precomputed image embeddings (made by --save-embeds, or a one-tensor file of diffusers' "
                         "ip_adapter_image_embeds, negative first) instead of --image and --image-encoder")
    ip.add_argument("--save-embeds", type=Path, metavar="FILE",
                    help="also write this group's image embeddings (encoder features, negative first, with the "
                         "adapter and encoder recorded) to a .safetensors file, to reuse with --embeds")
    ip.add_argument("--no-crop", action="store_true", help="resize reference images whole to the encoder's input size "
                    "(224×224 for the releases') instead of CLIPImageProcessor's shortest-side resize and center crop")
    ip.add_argument("--reference-attention", action="store_true",
                    help="on CUDA, compute decoupled attention as diffusers does (two SDPA calls, a scale and an "
                    "add) instead of with the fused Triton kernel: slower, for comparing images with the "
                    "reference (the CPU always computes it this way)")


def split_groups(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[list[str]]]:
    """(the tokens of everything else, the tokens of each image-prompt group). With fewer than
    two ``--ip-adapter`` there is at most one group, wherever its flags stand."""
    spans = flag_spans(argv, parser)
    if sum(dest == "ip_adapter" for dest, _ in spans) < 2:
        return argv, []
    rest, groups = [], []
    for dest, tokens in spans:
        if dest == "ip_adapter":
            groups.append(list(tokens))
        elif dest in GROUP_DESTS:
            if not groups:
                raise ValueError(f"{tokens[0]} stands before the first --ip-adapter: with several adapters, each "
                                 "image-prompt flag follows the --ip-adapter it belongs to")
            groups[-1] += tokens
        else:
            rest += tokens
    return rest, groups


def parse_groups(argv: list[str], parser: argparse.ArgumentParser
                 ) -> tuple[argparse.Namespace, list[argparse.Namespace]]:
    """(the command's arguments, one namespace per image-prompt group: the command's own when
    there is at most one adapter)."""
    rest, groups = split_groups(argv, parser)
    args = parser.parse_args(rest)
    return args, [parser.parse_args(group) for group in groups] or [args]


def parse_scale(text: str) -> float | dict:
    """``--scale``: a number or a per-block JSON dict."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected a number or a JSON dict, got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a number or a JSON dict, got {text!r}")
    return value


def scale_list(text: str) -> list:
    """``--scale``: a per-block JSON dict, or one or more numbers separated by commas."""
    if text.lstrip().startswith("{"):
        return [parse_scale(text)]
    try:
        return comma_list(float)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number, numbers separated by commas, or a JSON dict, got "
                                         f"{text!r}") from None


def check_image_prompts(args: argparse.Namespace, groups: list[argparse.Namespace], sweep: Sweep) -> None:
    """Each group's options, and each --scale of the sweep, checked before any loading."""
    for group in groups:
        check_group(group, args.width, args.height)
    for cell in sweep.cells():
        if "scale" in cell.values:
            check_scale(groups[0], cell.values["scale"])
    if args.reference_attention and not groups[0].ip_adapter:
        raise ValueError("--reference-attention applies to an image prompt: give --ip-adapter, --image-encoder "
                         "and --image")


def check_scale(group: argparse.Namespace, scale) -> None:
    if group.weight_type is not None and not isinstance(scale, float):
        raise ValueError("--weight-type takes a plain number as --scale (its weight)")
    expand_scale(scale)  # a bad per-block --scale fails now, before any file is read


def check_group(group: argparse.Namespace, width: int, height: int) -> None:
    """One image-prompt group's flags, checked before any loading; defaults filled in."""
    sources = [name for name in ("image_encoder", "image") if getattr(group, name)]
    options = [flag for flag, value in (("--scale", group.scale), ("--image-combine", group.image_combine),
                                        ("--no-crop", group.no_crop), ("--image-mask", group.image_mask),
                                        ("--start", group.start), ("--end", group.end),
                                        ("--weight-type", group.weight_type), ("--embeds", group.embeds),
                                        ("--negative-image", group.negative_image),
                                        ("--negative-noise", group.negative_noise),
                                        ("--black-negative", group.black_negative),
                                        ("--save-embeds", group.save_embeds))
               if value not in (None, False)]
    if not group.ip_adapter:
        given = options + ["--" + name.replace("_", "-") for name in sources]
        if given:
            raise ValueError(f"{given[0]} applies to an image prompt: give --ip-adapter, --image-encoder and --image")
        return
    if group.embeds is None and len(sources) < 2:
        missing = sorted({"image_encoder", "image"} - set(sources))
        raise ValueError("an image prompt needs " + ", ".join("--" + m.replace("_", "-") for m in missing) +
                         " too (or --embeds)")
    if group.embeds is not None and group.image:
        raise ValueError("--embeds replaces --image: give one or the other")
    if group.embeds is not None and group.save_embeds is not None:
        raise ValueError("--save-embeds writes the embeddings of --image: with --embeds they are already saved")
    group.scale = 1.0 if group.scale is None else group.scale
    check_scale(group, group.scale)
    for flag, path in (("--ip-adapter", group.ip_adapter), ("--image-encoder", group.image_encoder),
                       ("--embeds", group.embeds)):
        if path is not None and not path.exists():
            raise ValueError(f"{flag} {path}: no such file or folder")
    for flag in ("image", "negative_image"):
        for path in getattr(group, flag) or []:
            open_image(path, "--" + flag.replace("_", "-"))
    if group.image_mask:
        if len(group.image_mask) != len(group.image or []):
            raise ValueError(f"--image-mask: {len(group.image_mask)} masks for {len(group.image or [])} images; give "
                             "one mask per --image")
        for path in group.image_mask:
            mask = open_mask(path, "--image-mask")
            if mask.width * height != mask.height * width:
                raise ValueError(f"--image-mask {path} is {mask.width}×{mask.height}, not of the output's aspect "
                                 f"({width}×{height}): it would be stretched")
    group.start, group.end = group.start or 0.0, 1.0 if group.end is None else group.end
    if not 0 <= group.start < group.end <= 1:
        raise ValueError(f"--start {group.start} and --end {group.end}: need 0 ≤ --start < --end ≤ 1")
    group.image_combine = group.image_combine or "concat"
    group.embeds_scaling = group.embeds_scaling or "V only"
    if group.embeds_scaling not in EMBEDS_SCALING:
        raise ValueError(f"--embeds-scaling {group.embeds_scaling!r} is not one of: {', '.join(EMBEDS_SCALING)}")
    if group.weight_type is not None:
        weight_type(group.weight_type)  # an unknown name fails now
    if group.negative_noise is not None:
        kind, _, strength = group.negative_noise.partition(":")
        if kind not in NOISE_KINDS:
            raise ValueError(f"--negative-noise {group.negative_noise}: the kind is one of {', '.join(NOISE_KINDS)}")
        try:
            group.noise = (kind, finite(strength or "1.0"))
        except argparse.ArgumentTypeError:
            raise ValueError(f"--negative-noise {group.negative_noise}: the strength after ':' must be a finite "
                             "number") from None
    if group.save_embeds is not None and group.save_embeds.suffix != ".safetensors":
        raise ValueError(f"--save-embeds must name a .safetensors file, got {group.save_embeds}")


def image_prompts(groups: list[argparse.Namespace], adapters, encoders, overwrite: bool) -> list[ImagePromptInput]:
    """Each group's image prompt, with its adapter and encoder loaded; --save-embeds written."""
    prompts = []
    for group, adapter, encoder in zip(groups, adapters, encoders):
        images = [open_image(p) for p in group.image or []]
        negatives = [open_image(p, "--negative-image") for p in group.negative_image or []] or None
        if group.black_negative and adapter.spec.uses_hidden_states:  # ComfyUI zeroes base adapters' embedding too
            size = encoder.config.image_size if encoder is not None else 224
            negatives = [Image.new("RGB", (size, size))]
        if getattr(group, "noise", None):
            size = encoder.config.image_size if encoder is not None else 224
            negatives = [negative_noise(*group.noise, image=images[0] if images else None, size=size)]
        prompt = ImagePromptInput(
            adapter, encoder, images, group.scale, group.weight_type, group.composition_weight,
            [open_mask(p, "--image-mask") for p in group.image_mask] if group.image_mask else None, group.start,
            group.end, "sigmas" if group.sigma_range else "steps", group.embeds_scaling, group.image_combine, negatives,
            read_image_embeds(group.embeds, adapter.spec) if group.embeds else None, crop=not group.no_crop)
        prompt = replace(prompt, features=prompt.encoded())  # encoded once for every image of a sweep
        if group.save_embeds is not None:
            save_image_embeds(group.save_embeds, prompt.features, adapter.spec, encoder.config.name, overwrite)
            print(f"wrote {group.save_embeds}")
        prompts.append(prompt)
    return prompts


def prompt_hook(prompts: list[ImagePromptInput], groups: list[argparse.Namespace], args: argparse.Namespace):
    """The cross-attention hook of one sweep cell's image prompts (None without any), at its --scale."""
    if not prompts:
        return None
    attention = decoupled_attention_reference if args.reference_attention else decoupled_attention
    scaled = [replace(prompt, scale=group.scale) for prompt, group in zip(prompts, groups)]
    return image_prompt_hook(scaled, args.width, args.height, attention)
