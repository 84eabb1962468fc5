"""The sample command's prompt and sampling: the prompt, the sampler and its steps, guidance,
seeds, the image size and count."""
from __future__ import annotations

import argparse
import secrets

from PIL import Image

from ..pipelines.image_processing import size_of
from ..pipelines.long_prompts import LONG_PROMPT_MODES
from ..pipelines.text_to_image import DEFAULT_SIZE, check_size as check_output_size
from ..samplers import DESCRIPTIONS as SAMPLER_DESCRIPTIONS, SAMPLERS, max_steps
from .parsing import finite, fraction, integer, side
from .sweeps import Sweep, comma_list


def add_options(parser: argparse.ArgumentParser) -> None:
    """What to make: the prompt, the sampler and its steps, the size and the count."""
    g = parser.add_argument_group("prompt and sampling")
    g.add_argument("--prompt", default="", help="what the image should show")
    g.add_argument("--negative-prompt", default="", help="what the image should not show (used by guidance)")
    g.add_argument("--steps", type=integer(1), default=30, help="denoising steps")
    g.add_argument("--sampler", type=comma_list(sampler_name), default="ddim", metavar="NAME[,NAME…]",
                   help="how the steps are taken, each as diffusers' scheduler of that name built from SD1.5's "
                        "scheduler config: " + "; ".join(f"{name}: {text}"
                                                          for name, text in SAMPLER_DESCRIPTIONS.items()))
    g.add_argument("--eta", type=fraction,
                   help="DDIM's η in [0, 1]: the share of fresh noise added at each step (0, the default, is "
                        "deterministic; 1 is like DDPM). --sampler ddim only")
    g.add_argument("--guidance", type=comma_list(finite), default="7.5", metavar="G[,G…]",
                   help="classifier-free guidance scale; ≤ 1 turns it off")
    g.add_argument("--seed", type=comma_list(int), default="0", metavar="SEED[,SEED…]",
                   help="seed of the starting noise (drawn on the CPU, as diffusers does); -1 draws one at random, "
                        "prints it and records it in the PNG (in a list, write --seed=-1,-1,-1)")
    g.add_argument("--width", type=side, help="image width, a multiple of 8 (default 512; the demo model's 64)")
    g.add_argument("--height", type=side, help="image height, a multiple of 8 (default 512; the demo model's 64)")
    g.add_argument("--num-images", type=integer(1), default=1, help="images to generate; several are written as OUT-0.png, OUT-1.png, …")
    g.add_argument("--clip-skip", type=integer(0, 11), default=0, help="stop the text encoder this many layers early (diffusers' clip_skip)")
    g.add_argument("--long-prompt", choices=LONG_PROMPT_MODES, default="truncate",
                   help="a prompt over CLIP's 75 tokens: truncate drops the rest with a warning naming the words "
                        "dropped (diffusers); chunk encodes it 75 tokens at a time and joins the chunks "
                        "(AUTOMATIC1111's long prompts, BREAK starting a new chunk; no (emphasis:1.2) syntax)")


def sampler_name(text: str) -> str:
    if text not in SAMPLERS:
        raise ValueError(f"not a sampler: choose from {', '.join(SAMPLERS)}")
    return text


def draw_seeds(args: argparse.Namespace) -> None:
    """``--seed -1``: a random seed each, printed, so that the image can be made again."""
    for i, seed in enumerate(args.seed):
        if seed == -1:
            args.seed[i] = secrets.randbelow(2 ** 32)
            print(f"seed: {args.seed[i]}")
        elif not 0 <= seed < 2 ** 64:
            raise ValueError(f"--seed must be in [0, 2**64) or -1 (random), got {seed}")


def check_size(args: argparse.Namespace, picture: Image.Image | None) -> None:
    """--width and --height: as given, else the picture's (the init image, or the first control
    image), else SD1.5's 512."""
    width, height = size_of(picture) if picture else (DEFAULT_SIZE, DEFAULT_SIZE)
    args.width, args.height = args.width or width, args.height or height
    check_output_size(args.width, args.height)


def check_samplers(args: argparse.Namespace, sweep: Sweep) -> None:
    """The sampler of each of the sweep's cells takes --steps and --eta."""
    for cell in sweep.cells():
        check_sampler(cell.values.get("sampler", args.sampler), args.steps, args.eta)


def check_sampler(sampler: str, steps: int, eta: float | None) -> None:
    if eta is not None and sampler != "ddim":
        raise ValueError(f"--eta applies to --sampler ddim only, not to {sampler}")
    if eta is not None and not 0 <= eta <= 1:
        raise ValueError(f"--eta must be in [0, 1], got {eta}")
    if not 1 <= steps <= max_steps(sampler):
        raise ValueError(f"--steps must be in [1, {max_steps(sampler)}] for --sampler {sampler}, got {steps}")
