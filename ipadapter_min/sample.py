"""``python -m ipadapter_min.sample``: generate images from a prompt and, with an IP-Adapter,
from reference images.

    python -m ipadapter_min.sample --prompt "a large red star on the left" --out star.png   # the demo model
    python -m ipadapter_min.sample --image ref.png --out variation.png                      # demo + image prompt
    python -m ipadapter_min.sample --model sd15.safetensors --prompt "a red bicycle" --out bike.png
    python -m ipadapter_min.sample --model sd15.safetensors --ip-adapter ip-adapter_sd15.bin \
        --image-encoder models/image_encoder --image ref.png --prompt "" --scale 0.7 --out out.png
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
from copy import copy
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from . import demo, image_prompt_args, rerun
from .controlnet import ControlNetInput
from .cpu_convolutions import pack_convolutions
from .editing import IMG2IMG_STRENGTH, INPAINT_STRENGTH
from .formats.files import write_atomically
from .image_files import open_image, open_mask
from .image_processing import require_output_size, size_of
from .ip_layers import expand_scale
from .image_prompt_args import read_image_embeds, save_image_embeds
from .ip_adapter import COMBINE, EMBEDS_SCALING
from .ip_pipeline import ImagePromptInput, image_prompt_hook, load_image_prompt_models
from .kernels import decoupled_attention, decoupled_attention_reference
from .png_parameters import generation_parameters
from .negative_noise import KINDS as NOISE_KINDS, negative_noise
from .command_line import MAX_SIDE, Parser, failed, finite, fraction, integer, side
from .weight_types import WEIGHT_TYPES, weight_type
from .formats.lora import lora_argument
from .formats.sd15 import declared_configs
from .generation_memory import check_fits
from .loading import load_controlnet, load_t2i_adapter
from .long_prompts import LONG_PROMPT_MODES
from .pipeline import DEFAULT_SIZE, StableDiffusion, check_size
from .samplers import DESCRIPTIONS as SAMPLER_DESCRIPTIONS, SAMPLERS, max_steps
from .sweeps import Sweep, comma_list, text_of
from .t2i_adapter import T2IAdapterInput

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except where there is none to show (the help says in words what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m ipadapter_min.sample",
        description="Generate images with Stable Diffusion 1.5 (classifier-free guidance; DDIM or another "
                    "--sampler). The same seed gives the same image as diffusers' StableDiffusionPipeline with "
                    "the scheduler of that name.",
        formatter_class=HelpFormatter, allow_abbrev=False)  # a shortened flag would escape --from-png's record
    p.add_argument("--model", type=Path,
                   help="SD1.5 weights: a file made by `python -m weights_convert sd15`, an original single-file "
                        "checkpoint (.safetensors or .ckpt), or a diffusers folder. Without it: the demo model "
                        "shipped in the package (a toy world of coloured shapes at 64×64, trained here; see the "
                        "README), with its own IP-Adapter and image encoder for --image")
    p.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="a LoRA merged into the UNet and text encoder at load time, times WEIGHT (default 1.0): a "
                        "kohya-ss / A1111 .safetensors (lora_unet_*, lora_te_*; LoCon's convolutions too) or diffusers' "
                        "pytorch_lora_weights.safetensors (or its folder). Repeat for several; they add up")
    p.add_argument("--vae", type=Path, metavar="FILE",
                   help="an SD1.5 VAE instead of the model's own, e.g. stabilityai's sd-vae-ft-mse: the original "
                        "vae-ft-mse-840000-ema-pruned.safetensors (or .ckpt), or a diffusers folder (config.json + "
                        "diffusion_pytorch_model.safetensors)")
    p.add_argument("--prompt", default="", help="what the image should show")
    p.add_argument("--negative-prompt", default="", help="what the image should not show (used by guidance)")
    p.add_argument("--steps", type=integer(1), default=30, help="denoising steps")
    p.add_argument("--sampler", type=comma_list(sampler_name), default="ddim", metavar="NAME[,NAME…]",
                   help="how the steps are taken, each as diffusers' scheduler of that name built from SD1.5's "
                        "scheduler config: " + "; ".join(f"{name}: {text}"
                                                          for name, text in SAMPLER_DESCRIPTIONS.items()))
    p.add_argument("--eta", type=fraction,
                   help="DDIM's η in [0, 1]: the share of fresh noise added at each step (0, the default, is "
                        "deterministic; 1 is like DDPM). --sampler ddim only")
    p.add_argument("--guidance", type=comma_list(finite), default="7.5", metavar="G[,G…]",
                   help="classifier-free guidance scale; ≤ 1 turns it off")
    p.add_argument("--seed", type=comma_list(int), default="0", metavar="SEED[,SEED…]",
                   help="seed of the starting noise (drawn on the CPU, as diffusers does); -1 draws one at random, "
                        "prints it and records it in the PNG (in a list, write --seed=-1,-1,-1)")
    p.add_argument("--width", type=side, help="image width, a multiple of 8 (default 512; the demo model's 64)")
    p.add_argument("--height", type=side, help="image height, a multiple of 8 (default 512; the demo model's 64)")
    p.add_argument("--num-images", type=integer(1), default=1, help="images to generate; several are written as OUT-0.png, OUT-1.png, …")
    p.add_argument("--clip-skip", type=integer(0, 11), default=0, help="stop the text encoder this many layers early (diffusers' clip_skip)")
    p.add_argument("--long-prompt", choices=LONG_PROMPT_MODES, default="truncate",
                   help="a prompt over CLIP's 75 tokens: truncate drops the rest with a warning naming the words "
                        "dropped (diffusers); chunk encodes it 75 tokens at a time and joins the chunks "
                        "(AUTOMATIC1111's long prompts, BREAK starting a new chunk; no (emphasis:1.2) syntax)")
    p.add_argument("--out", type=Path, default=Path("out.png"),
                   help="PNG file to write, with the settings in its metadata (AUTOMATIC1111's 'parameters' text, "
                        "and the command line for --from-png). With comma lists: the labelled grid, each image "
                        "beside it as OUT-<option><value>.png")
    p.add_argument("--from-png", type=Path, metavar="FILE",
                   help="run again the command that made FILE (a PNG written by this command), for the same bits on "
                        "the same device; options given besides it override the recorded ones (repeatable ones such as "
                        "--lora and --image add to them)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="weights and activations precision (default: fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("--packed-convolutions", action="store_true",
                   help="fp32 on the CPU: convolution weights reordered once for oneDNN and upsampling done in "
                   "four phases (ipadapter_min.cpu_convolutions): about 15%% less time per image at 256 px, "
                   "up to ~2 GB more memory at full size; pixels move by fp32 rounding, so images differ from "
                   "runs without it by 1/255 here and there")
    p.add_argument("--threads", type=integer(1, 4096), metavar="N",
                   help="CPU threads for torch (default: torch's; 1 for the demo model, whose layers are too small "
                        "to share: as fast on an idle machine, and not slowed many times over by a busy one)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    edit = p.add_argument_group(
        "img2img and inpainting",
        "Start from a picture instead of pure noise. The output takes the picture's size (rounded down to a "
        "multiple of 8) unless --width/--height say otherwise. Both combine with an image prompt.")
    edit.add_argument("--init-image", type=Path, metavar="FILE",
                      help="img2img: the picture to start from (with --mask: the picture to repaint)")
    edit.add_argument("--strength", type=finite,
                      help="how much of the picture is noised away, in (0, 1]: 1 keeps only faint traces, 0.3 keeps "
                           "most of it; runs that fraction of --steps (default 0.8 for img2img and 1.0 for "
                           "inpainting, as diffusers)")
    edit.add_argument("--mask", type=Path, metavar="FILE",
                      help="inpainting: white repaints, black keeps (with --init-image). Works with a regular SD1.5 "
                           "and with the 9-channel inpainting checkpoints (sd-v1-5-inpainting)")
    edit.add_argument("--mask-crop", type=integer(0, MAX_SIDE), metavar="PAD",
                      help="inpaint only the mask's bounding box widened by PAD pixels, at the output size, and paste "
                           "the result back into the whole picture (diffusers' padding_mask_crop): more detail "
                           "for a small mask in a large picture")
    control = p.add_argument_group(
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
    t2i = p.add_argument_group(
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
    ip = p.add_argument_group(
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
    return p


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


def sampler_name(text: str) -> str:
    if text not in SAMPLERS:
        raise ValueError(f"not a sampler: choose from {', '.join(SAMPLERS)}")
    return text


def output_paths(out: Path, count: int) -> list[Path]:
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out}")
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def sweep_paths(out: Path, sweep: Sweep, count: int) -> list[list[Path]]:
    """The files of each cell's images: OUT's own without a sweep, else OUT-<option><value>.png
    beside the grid at OUT."""
    if not sweep:
        return [output_paths(out, count)]
    if count > 1:
        raise ValueError("--num-images makes several images of one setting: with comma lists each cell of the grid "
                         "is one image (list several --seed values instead)")
    output_paths(out, 1)
    paths = [[out.with_name(f"{out.stem}{cell.suffix()}{out.suffix}")] for cell in sweep.cells()]
    names = [p for [p] in paths]
    twice = next((p for p in names if names.count(p) > 1), None)
    if twice is not None:
        raise ValueError(f"two images of the sweep would both be {twice}: give each value of a comma list once")
    return paths


def draw_seeds(args: argparse.Namespace) -> None:
    """``--seed -1``: a random seed each, printed, so that the image can be made again."""
    for i, seed in enumerate(args.seed):
        if seed == -1:
            args.seed[i] = secrets.randbelow(2 ** 32)
            print(f"seed: {args.seed[i]}")
        elif not 0 <= seed < 2 ** 64:
            raise ValueError(f"--seed must be in [0, 2**64) or -1 (random), got {seed}")


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


def validate(args: argparse.Namespace, groups: list[argparse.Namespace] | None = None,
             sweep: Sweep | None = None) -> list[list[Path]]:
    """Every check that needs no model, so bad input fails before minutes of loading; the output
    files of each of the sweep's cells. ``groups``: the image-prompt groups
    (``image_prompt_args.parse``), by default ``args`` itself."""
    groups = groups or [args]
    sweep = sweep or Sweep([])
    if args.model is None:
        use_demo_model(args)
    if not args.model.exists():
        raise ValueError(f"--model {args.model}: no such file or folder")
    validate_loras_and_vae(args)
    validate_editing(args)
    controls = validate_controls(args)
    picture = open_image(args.init_image, "--init-image") if args.init_image else controls[0][2] if controls else None
    default_width, default_height = size_of(picture) if picture else (DEFAULT_SIZE, DEFAULT_SIZE)
    args.width, args.height = args.width or default_width, args.height or default_height
    check_size(args.width, args.height)
    for flag, path, image in controls:
        require_output_size(image, args.width, args.height, f"{flag} {path}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    for cell in sweep.cells():
        validate_sampler(cell.values.get("sampler", args.sampler), args.steps, args.eta)
    for group in groups:
        validate_image_prompt(group, args.width, args.height)
    for cell in sweep.cells():
        if "scale" in cell.values:
            validate_scale(groups[0], cell.values["scale"])
    if args.reference_attention and not groups[0].ip_adapter:
        raise ValueError("--reference-attention applies to an image prompt: give --ip-adapter, --image-encoder "
                         "and --image")
    paths = sweep_paths(args.out, sweep, args.num_images)
    saved = [g.save_embeds for g in groups if g.ip_adapter and g.save_embeds is not None]
    existing = [p for p in [*sum(paths, []), *([args.out] if sweep else []), *saved] if p.exists()]
    if existing and not args.force:
        raise ValueError(f"{existing[0]} already exists (pass --force to overwrite it)")
    configs = declared_configs(args.model)  # last: the model's header is the first file these checks read
    check_fits(configs["unet"], configs["vae"], args.width, args.height, args.num_images, DTYPES[args.dtype],
               args.device)
    return paths


def validate_sampler(sampler: str, steps: int, eta: float | None) -> None:
    if eta is not None and sampler != "ddim":
        raise ValueError(f"--eta applies to --sampler ddim only, not to {sampler}")
    if eta is not None and not 0 <= eta <= 1:
        raise ValueError(f"--eta must be in [0, 1], got {eta}")
    if not 1 <= steps <= max_steps(sampler):
        raise ValueError(f"--steps must be in [1, {max_steps(sampler)}] for --sampler {sampler}, got {steps}")


def validate_scale(group: argparse.Namespace, scale) -> None:
    if group.weight_type is not None and not isinstance(scale, float):
        raise ValueError("--weight-type takes a plain number as --scale (its weight)")
    expand_scale(scale)  # a bad per-block --scale fails now, before any file is read


def validate_image_prompt(group: argparse.Namespace, width: int, height: int) -> None:
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
    validate_scale(group, group.scale)
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


def validate_editing(args: argparse.Namespace) -> None:
    if args.mask is not None and args.init_image is None:
        raise ValueError("--mask needs --init-image: the picture whose masked part is repainted")
    if args.mask_crop is not None and args.mask is None:
        raise ValueError("--mask-crop applies to inpainting: give --mask and --init-image")
    if args.strength is not None and args.init_image is None:
        raise ValueError("--strength applies to img2img and inpainting: give --init-image")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
    images = {flag: read(path, flag) for read, flag, path in ((open_image, "--init-image", args.init_image),
                                                               (open_mask, "--mask", args.mask))
              if path is not None}  # a missing or unreadable file fails before any loading
    if args.mask_crop is not None and images["--mask"].size != images["--init-image"].size:
        raise ValueError(f"--mask-crop: the mask ({'×'.join(map(str, images['--mask'].size))}) must be the size of "
                         f"the init image ({'×'.join(map(str, images['--init-image'].size))}), as the same box is cut "
                         "from both")
    if args.init_image is not None and args.strength is None:
        args.strength = INPAINT_STRENGTH if args.mask else IMG2IMG_STRENGTH


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


def validate_controls(args: argparse.Namespace) -> list[tuple[str, Path, Image.Image]]:
    """The ControlNet and T2I-Adapter options, checked; (flag, path, image) of each control image."""
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


def validate_loras_and_vae(args: argparse.Namespace) -> None:
    """``args.loras``: (file, weight) pairs from --lora; the files and --vae exist."""
    args.loras = [lora_argument(text) for text in args.lora or []]
    for path, _ in args.loras:
        if not path.exists():
            raise ValueError(f"--lora {path}: no such file")
    if args.vae is not None and not args.vae.exists():
        raise ValueError(f"--vae {args.vae}: no such file or folder")


def save_png(image, path: Path, parameters: str, overwrite: bool, run: str | None = None) -> None:
    """Write atomically: a crash leaves either the old file or the whole new one. ``parameters``:
    A1111's text; ``run``: the command line to make it again (``rerun``)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    if run is not None:
        info.add_text(rerun.CHUNK, run)
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite)


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


def load_models(args: argparse.Namespace, groups: list[argparse.Namespace]):
    """(the pipeline, the structural controls with their images, the image prompts with their
    images encoded), loaded once for every image of a sweep."""
    device, dtype = args.device, DTYPES[args.dtype]
    controls = [
        ControlNetInput(load_controlnet(net, device, dtype), open_image(image, "--control-image"), scale, start, end,
                        args.guess_mode)
        for net, image, scale, start, end in zip(args.controlnet or [], args.control_image or [],
                                                  args.control_scale, args.control_start, args.control_end)]
    controls += [
        T2IAdapterInput(load_t2i_adapter(adapter, device, dtype), open_image(image, "--adapter-image"), scale)
        for adapter, image, scale in zip(args.t2i_adapter or [], args.adapter_image or [], args.adapter_scale)]
    if not groups[0].ip_adapter:
        sd, prompts = StableDiffusion.from_file(args.model, device=device, dtype=dtype, loras=args.loras,
                                                vae=args.vae), []
    else:
        sd, adapters, encoders = load_image_prompt_models(
            args.model, [g.ip_adapter for g in groups], [None if g.embeds else g.image_encoder for g in groups],
            device, dtype, args.loras, args.vae)
        prompts = image_prompts(groups, adapters, encoders, args.force)
    if args.packed_convolutions:
        for model in (sd.unet, sd.vae, *(control.model for control in controls)):
            pack_convolutions(model)  # fp32 on the CPU only: a no-op elsewhere
    return sd, controls, prompts


def generate(sd: StableDiffusion, controls, prompts: list[ImagePromptInput], args: argparse.Namespace,
             groups: list[argparse.Namespace]) -> list[Image.Image]:
    """The images of one setting (one cell of a sweep)."""
    hook = None
    if prompts:
        attention = decoupled_attention_reference if args.reference_attention else decoupled_attention
        scaled = [replace(prompt, scale=group.scale) for prompt, group in zip(prompts, groups)]
        hook = image_prompt_hook(scaled, args.width, args.height, attention)
    return sd(args.prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance, seed=args.seed,
              width=args.width, height=args.height, num_images=args.num_images, clip_skip=args.clip_skip,
              init_image=args.init_image and open_image(args.init_image, "--init-image"), strength=args.strength,
              mask=args.mask and open_mask(args.mask, "--mask"), mask_crop=args.mask_crop, controls=controls,
              hook=hook, sampler=args.sampler, eta=args.eta or 0.0, long_prompt=args.long_prompt,
              progress=not args.no_progress)


def with_values(args: argparse.Namespace, groups: list[argparse.Namespace], values: dict):
    """Copies of ``args`` and ``groups`` with a sweep cell's values (``--scale``: the image prompt's)."""
    args_copy, group_copies = copy(args), [copy(g) for g in groups]
    for dest, value in values.items():
        setattr(group_copies[0] if dest == "scale" else args_copy, dest, value)
    return args_copy, group_copies


def parse_command(argv: list[str]) -> tuple[argparse.Namespace, list[argparse.Namespace], Sweep]:
    """(the arguments, the image-prompt groups, the sweep): ``--from-png`` expanded (the command
    line run kept as ``args.argv``), ``--seed -1`` drawn, comma lists made the sweep's axes and
    each option set to its first value."""
    parser = build_parser()
    argv = rerun.expand(argv, parser)
    args, groups = image_prompt_args.parse(argv, parser)
    args.argv = argv
    draw_seeds(args)
    return args, groups, Sweep.from_args(args, groups)


def recorded(args: argparse.Namespace, values: dict) -> str:
    """The PNG's record of the command line, with ``values`` (dest → value) written in."""
    values = {"seed": args.seed, "dtype": args.dtype, **values}
    return rerun.record(rerun.recorded_argv(args.argv, build_parser(), {d: str(v) for d, v in values.items()}))


def main(argv: list[str] | None = None) -> int:
    threads = torch.get_num_threads()
    try:
        args, groups, sweep = parse_command(list(sys.argv[1:] if argv is None else argv))
        paths = validate(args, groups, sweep)
        if args.threads:
            torch.set_num_threads(args.threads)
        sd, controls, prompts = load_models(args, groups)
        firsts = []
        for number, (cell, cell_paths) in enumerate(zip(sweep.cells(), paths)):
            if sweep:
                print(f"[{number + 1}/{len(paths)}] " + ", ".join(f"{d} {text_of(v)}" for d, v in cell.values.items()))
            cell_args, cell_groups = with_values(args, groups, cell.values)
            images = generate(sd, controls, prompts, cell_args, cell_groups)
            for i, (image, path) in enumerate(zip(images, cell_paths)):
                save_png(image, path, generation_parameters(cell_args, cell_groups, i, image.size), args.force,
                         recorded(cell_args, cell.values))
                print(f"wrote {path}")
            firsts.append(images[0])
        if sweep:
            reference = open_image(groups[0].image[0]) if groups[0].ip_adapter and groups[0].image else None
            lists = {axis.dest: ",".join(map(str, axis.values)) for axis in sweep.axes}
            save_png(sweep.grid(firsts, reference), args.out, generation_parameters(args, groups, 0, firsts[0].size),
                     args.force, recorded(args, lists))
            print(f"wrote {args.out}")
    except (ValueError, TypeError, OSError, RuntimeError, KeyboardInterrupt) as exc:  # CheckpointError is a ValueError
        return failed(exc)
    finally:
        torch.set_num_threads(threads)  # main() called from Python leaves the caller's setting as it was
    return 0


if __name__ == "__main__":
    sys.exit(main())
