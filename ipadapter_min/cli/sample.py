"""``python -m ipadapter_min.sample``: generate images from a prompt and, with an IP-Adapter,
from reference images.

    python -m ipadapter_min.sample --prompt "a large red star on the left" --out star.png   # the demo model
    python -m ipadapter_min.sample --image ref.png --out variation.png                      # demo + image prompt
    python -m ipadapter_min.sample --model sd15.safetensors --prompt "a red bicycle" --out bike.png
    python -m ipadapter_min.sample --model sd15.safetensors --ip-adapter ip-adapter_sd15.bin \
        --image-encoder models/image_encoder --image ref.png --prompt "" --scale 0.7 --out out.png

It reads top-down: parse the command line, check every input, load the models, then for each
image (or each cell of a comma-list sweep) build the image-prompt hook, generate and write. Each
feature's options are defined beside the code that reads them, in ``*_options.py``.
"""
from __future__ import annotations

import argparse
import sys
from copy import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..models.cpu_convolutions import pack_convolutions
from ..pipelines.controls import ControlNetInput, T2IAdapterInput
from ..pipelines.image_prompt_input import ImagePromptInput
from ..pipelines.image_prompt_models import load_image_prompt_models
from ..pipelines.text_to_image import StableDiffusion
from . import control_options, editing_options, generation_options, image_prompt_options, model_options, \
    output_options, rerun
from .parsing import Parser, failed
from .png_parameters import generation_parameters
from .sweeps import Sweep

FEATURES = (model_options, generation_options, output_options, editing_options, control_options,
            image_prompt_options)  # each adds its options, as one group of --help


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except where there is none to show (the help says in words what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m ipadapter_min.sample",
        description="Generate images with Stable Diffusion 1.5 (classifier-free guidance; DDIM or another "
                    "--sampler). The same seed gives the same image as diffusers' StableDiffusionPipeline with "
                    "the scheduler of that name.",
        formatter_class=HelpFormatter, allow_abbrev=False)  # a shortened flag would escape --from-png's record
    for feature in FEATURES:
        feature.add_options(parser)
    return parser


@dataclass
class Command:
    """One run: the parser, the arguments, one namespace per image-prompt group (the arguments
    themselves with at most one adapter), and the sweep of comma-list options."""

    parser: argparse.ArgumentParser
    args: argparse.Namespace
    groups: list[argparse.Namespace]
    sweep: Sweep

    def cell(self, values: dict) -> tuple[argparse.Namespace, list[argparse.Namespace]]:
        """Copies of the arguments and groups with a sweep cell's values (``--scale``: the first
        image prompt's)."""
        args, groups = copy(self.args), [copy(g) for g in self.groups]
        for dest, value in values.items():
            setattr(groups[0] if dest == "scale" else args, dest, value)
        return args, groups

    def recorded(self, args: argparse.Namespace, values: dict) -> str:
        return output_options.recorded(args, self.parser, values)


@dataclass
class Inputs:
    """What the checks found, kept for every image: no file is read twice."""

    paths: list[list[Path]]  # the output files of each cell of the sweep
    init_image: Image.Image | None
    mask: Image.Image | None
    control_images: list[Image.Image]  # the ControlNets', then the T2I-Adapters'


@dataclass
class Models:
    """Loaded once for every image of a sweep."""

    sd: StableDiffusion
    controls: list[ControlNetInput | T2IAdapterInput]
    prompts: list[ImagePromptInput]  # with their images encoded


def parse(argv: list[str]) -> Command:
    """``--from-png`` expanded (the command line run kept as ``args.argv``), the image-prompt
    groups split, ``--seed -1`` drawn, comma lists made the sweep's axes and each option set to
    its first value."""
    parser = build_parser()
    argv = rerun.expand(argv, parser)
    args, groups = image_prompt_options.parse_groups(argv, parser)
    args.argv = argv
    generation_options.draw_seeds(args)
    return Command(parser, args, groups, Sweep.from_args(args, groups))


def check(command: Command) -> Inputs:
    """Every check that needs no model, so that bad input fails before minutes of loading."""
    args, groups, sweep = command.args, command.groups, command.sweep
    model_options.check_files(args)
    init_image, mask = editing_options.check_editing(args)
    controls = control_options.check_controls(args)
    generation_options.check_size(args, init_image or (controls[0][2] if controls else None))
    control_options.check_control_sizes(controls, args.width, args.height)
    model_options.check_device(args)
    generation_options.check_samplers(args, sweep)
    image_prompt_options.check_image_prompts(args, groups, sweep)
    paths = output_options.check_outputs(args, groups, sweep)
    model_options.check_memory(args)
    return Inputs(paths, init_image, mask, [image for _, _, image in controls])


def load(command: Command, inputs: Inputs) -> Models:
    args, groups = command.args, command.groups
    device, dtype = args.device, model_options.DTYPES[args.dtype]
    controls = control_options.load_controls(args, inputs.control_images, device, dtype)
    if not groups[0].ip_adapter:
        sd, prompts = StableDiffusion.from_file(args.model, device=device, dtype=dtype, loras=args.loras,
                                                vae=args.vae), []
    else:
        sd, adapters, encoders = load_image_prompt_models(
            args.model, [g.ip_adapter for g in groups], [None if g.embeds else g.image_encoder for g in groups],
            device, dtype, args.loras, args.vae)
        prompts = image_prompt_options.image_prompts(groups, adapters, encoders, args.force)
    if args.packed_convolutions:
        for model in (sd.unet, sd.vae, *(control.model for control in controls)):
            pack_convolutions(model)  # fp32 on the CPU only: a no-op elsewhere
    return Models(sd, controls, prompts)


def generate(models: Models, inputs: Inputs, args: argparse.Namespace,
             groups: list[argparse.Namespace]) -> list[Image.Image]:
    """The images of one setting (one cell of a sweep)."""
    hook = image_prompt_options.prompt_hook(models.prompts, groups, args)
    return models.sd(args.prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance, seed=args.seed,
                     width=args.width, height=args.height, num_images=args.num_images, clip_skip=args.clip_skip,
                     init_image=inputs.init_image, strength=args.strength, mask=inputs.mask,
                     mask_crop=args.mask_crop, controls=models.controls, hook=hook, sampler=args.sampler,
                     eta=args.eta or 0.0, long_prompt=args.long_prompt, progress=not args.no_progress)


def write(images: list[Image.Image], paths: list[Path], command: Command, args: argparse.Namespace,
          groups: list[argparse.Namespace], values: dict) -> None:
    """One cell's images, each with its settings and the command line that makes it again."""
    for index, (image, path) in enumerate(zip(images, paths)):
        output_options.save_png(image, path, generation_parameters(args, groups, index, image.size),
                                args.force, command.recorded(args, values))
        print(f"wrote {path}")


def write_grid(firsts: list[Image.Image], command: Command, models: Models) -> None:
    """A sweep's labelled grid at --out, the reference image in its corner."""
    args, sweep = command.args, command.sweep
    reference = models.prompts[0].images[0] if models.prompts and models.prompts[0].images else None
    lists = {axis.dest: ",".join(map(str, axis.values)) for axis in sweep.axes}
    output_options.save_png(sweep.grid(firsts, reference), args.out,
                            generation_parameters(args, command.groups, 0, firsts[0].size), args.force,
                            command.recorded(args, lists))
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    threads = torch.get_num_threads()
    try:
        command = parse(list(sys.argv[1:] if argv is None else argv))
        inputs = check(command)
        if command.args.threads:
            torch.set_num_threads(command.args.threads)
        models = load(command, inputs)
        firsts = []
        for number, (cell, paths) in enumerate(zip(command.sweep.cells(), inputs.paths)):
            if command.sweep:
                print(f"[{number + 1}/{len(inputs.paths)}] {cell.label()}")
            args, groups = command.cell(cell.values)
            images = generate(models, inputs, args, groups)
            write(images, paths, command, args, groups, cell.values)
            firsts.append(images[0])
        if command.sweep:
            write_grid(firsts, command, models)
    except (ValueError, TypeError, OSError, RuntimeError, KeyboardInterrupt) as exc:  # CheckpointError is a ValueError
        return failed(exc)
    finally:
        torch.set_num_threads(threads)  # main() called from Python leaves the caller's setting as it was
    return 0
