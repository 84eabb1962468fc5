"""``python -m ipadapter_min.evaluate``: the IP-Adapter paper's CLIP-I / CLIP-T evaluation.

For each image/caption pair, generate K images from the image prompt (empty text prompt unless
--with-text) and score each generation with CLIP ViT-L/14: CLIP-I against the prompt image,
CLIP-T against the caption. The paper: COCO2017 val, 5,000 pairs, 4 generations each, λ = 1.0,
DDIM 50 steps, guidance 7.5; it reports CLIP-T ≈ 0.588, CLIP-I ≈ 0.828 for SD1.5.

    python -m ipadapter_min.evaluate --model sd15.safetensors --ip-adapter ip-adapter_sd15.bin \\
        --image-encoder models/image_encoder --coco-captions annotations/captions_val2017.json \\
        --coco-images val2017 --clip open_clip_pytorch_model.bin --out eval/
    torchrun --nproc-per-node 8 -m ipadapter_min.evaluate …   (pairs sharded across processes)
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm.auto import tqdm

from ..formats.files import write_atomically
from ..ip_adapter.layers import expand_scale
from ..pipelines.image_prompts import IPAdapterPipeline
from ..samplers import DDIM
from ..training.clip_score import CLIPScorer, model_config
from ..training.data import Pair, check_images, open_rgb, read_coco, read_pairs
from ..training.distributed import Processes
from .image_prompt_options import parse_scale
from .model_options import DTYPES
from .output_options import save_png
from .parsing import Parser, failed, finite, integer, side

CONTACT_SHEET_PAIRS = 16  # rows of contact_sheet.png (the first pairs): a sheet of 5,000 rows helps no one
THUMBNAIL = 128
CSV_COLUMNS = ("pair", "prompt_image", "caption", "generation", "seed", "image", "clip_i", "clip_t")
INTERVAL = ("95% interval of the mean by the normal approximation, mean ± 1.96·sd/√n, over the n generated "
            "images (sd with n−1; the K generations of one pair are correlated, so it is somewhat narrow)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m ipadapter_min.evaluate",
        description="Evaluate an IP-Adapter as the paper does: for each image/caption pair generate --num-images "
                    "images from the image prompt, and score each with CLIP: CLIP-I = cosine of the CLIP image "
                    "embeddings of the generation and the prompt image; CLIP-T = cosine of the generation's CLIP "
                    "image embedding and the caption's CLIP text embedding. Scores are plain cosines (0..1 scale, "
                    "as the paper's CLIP-T ≈ 0.588, CLIP-I ≈ 0.828 for SD1.5 with CLIP ViT-L/14); torchmetrics' "
                    "CLIPScore reports 100×cos instead. Writes OUT/scores.csv (a row per generated image), "
                    "OUT/summary.json (means, 95% intervals, counts, settings), OUT/contact_sheet.png and the "
                    "images under OUT/images/. Under torchrun the pairs are shared out among the processes.")
    p.add_argument("--model", required=True, type=Path, metavar="PATH",
                   help="SD1.5 weights, any format python -m ipadapter_min.sample takes (converted file, original "
                        "single-file checkpoint, diffusers folder)")
    p.add_argument("--ip-adapter", required=True, type=Path, metavar="FILE",
                   help="IP-Adapter weights (official .bin/.safetensors or converted)")
    p.add_argument("--image-encoder", required=True, type=Path, metavar="PATH",
                   help="the adapter's CLIP image encoder (the release's image_encoder folder or a converted file)")
    data = p.add_argument_group("data", "either --data (with --data-root) or --coco-captions with --coco-images")
    data.add_argument("--data", type=Path, metavar="FILE.json",
                      help="training-format pairs: a JSON list of {\"image_file\": ..., \"text\": ...}, or a folder "
                           "of images with .txt captions")
    data.add_argument("--data-root", type=Path, metavar="DIR", help="folder the JSON's image_file paths are relative "
                      "to (default: the JSON's folder)")
    data.add_argument("--coco-captions", type=Path, metavar="FILE",
                      help="COCO's captions file (captions_val2017.json); each image's first caption is used, "
                           "images in id order")
    data.add_argument("--coco-images", type=Path, metavar="DIR", help="folder of the COCO images (val2017/)")
    data.add_argument("--limit", type=integer(1, 10 ** 9), metavar="N",
                      help="evaluate only the first N pairs (default: all; the paper: 5000)")
    gen = p.add_argument_group("generation", "defaults are the paper's")
    gen.add_argument("--num-images", type=integer(1), default=4, metavar="K",
                     help="generations per pair, K (default %(default)s)")
    gen.add_argument("--steps", type=integer(1), default=50, help="DDIM steps (default %(default)s)")
    gen.add_argument("--guidance", type=finite, default=7.5, help="classifier-free guidance scale (default %(default)s)")
    gen.add_argument("--scale", type=parse_scale, default=1.0, help="λ, a number or a per-block JSON dict as "
                     "python -m ipadapter_min.sample takes (default %(default)s)")
    gen.add_argument("--with-text", action="store_true", help="use the caption as the text prompt too (default: "
                     "image prompt only, empty text prompt)")
    gen.add_argument("--seed", type=integer(0, 2 ** 64 - 1), default=0, help="generation g of pair i uses the seed "
                     "numpy.random.SeedSequence([SEED, i, g]).generate_state(1)[0] (in scores.csv), so results "
                     "do not depend on sharding; python -m ipadapter_min.sample --seed S remakes that image "
                     "(default %(default)s)")
    gen.add_argument("--resolution", type=side, default=512,
                     help="generated image width and height, a multiple of 8 (default %(default)s)")
    clip = p.add_argument_group("CLIP scoring model (run in fp32)")
    clip.add_argument("--clip", required=True, type=Path, metavar="FILE",
                      help="OpenCLIP checkpoint as open_clip downloads it (open_clip_pytorch_model.bin or "
                           "open_clip_model.safetensors), e.g. from the hub repository "
                           "timm/vit_large_patch14_clip_224.openai (OpenAI's ViT-L/14: ViT-L-14-quickgelu) or "
                           "laion/CLIP-ViT-L-14-laion2B-s32B-b82K (ViT-L-14)")
    clip.add_argument("--clip-model", metavar="NAME",
                      help="open_clip architecture of --clip: ViT-L-14, ViT-L-14-quickgelu (OpenAI's weights need "
                           "QuickGELU), ViT-H-14, ..., or an open_clip model-config JSON file. Default: the "
                           "open_clip_config.json beside --clip if there is one (hub downloads have it), else ViT-L-14")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--force", action="store_true", help="write into an existing --out, replacing files of the same "
                   "names (others are left)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (under torchrun, CUDA processes use cuda:LOCAL_RANK; default %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="generation precision (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def validate(args: argparse.Namespace) -> list[Pair]:
    """Every check that needs no model, so bad input fails before minutes of loading → the pairs."""
    for flag in ("model", "ip_adapter", "image_encoder", "clip"):
        if not getattr(args, flag).exists():
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: no such file or folder")
    if not 1 <= args.steps <= DDIM.max_steps:
        raise ValueError(f"--steps must be in [1, {DDIM.max_steps}], got {args.steps}")
    expand_scale(args.scale)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder")
    if args.out.exists() and not args.force:
        raise ValueError(f"--out {args.out} already exists (pass --force to write into it)")
    model_config(args.clip_model, args.clip)  # an unknown architecture or bad config JSON fails now
    coco = [flag for flag, value in (("--coco-captions", args.coco_captions), ("--coco-images", args.coco_images))
            if value]
    if args.data and coco:
        raise ValueError(f"give either --data or {coco[0]}, not both")
    if args.data_root and not args.data:
        raise ValueError("--data-root applies to --data")
    if args.data:
        pairs, flag = read_pairs(args.data, args.data_root), "--data"
    elif len(coco) == 2:
        if not args.coco_images.is_dir():
            raise ValueError(f"--coco-images {args.coco_images}: no such folder")
        pairs, flag = read_coco(args.coco_captions, args.coco_images), "--coco-images"
        for pair in pairs[:args.limit]:
            if not pair.image.is_file():
                raise ValueError(f"--coco-images {args.coco_images}: image {pair.image.name} not found")
    elif coco:
        raise ValueError("--coco-captions and --coco-images go together")
    else:
        raise ValueError("no data: give --data FILE.json or --coco-captions FILE --coco-images DIR")
    pairs = pairs[:args.limit]
    check_images(pairs, flag)
    return pairs


def generation_seed(seed: int, pair: int, generation: int) -> int:
    """A 32-bit seed for each image, a function of (seed, pair, generation) only."""
    return int(np.random.SeedSequence([seed, pair, generation]).generate_state(1)[0])


def generation_parameters(args: argparse.Namespace, pair: Pair, prompt: str, seed: int) -> str:
    """Written into each PNG: what python -m ipadapter_min.sample needs to remake it."""
    fields = {"prompt": prompt, "negative_prompt": "", "steps": args.steps, "guidance": args.guidance, "seed": seed,
              "width": args.resolution, "height": args.resolution, "sampler": "DDIM", "model": args.model.name,
              "dtype": args.dtype, "ip_adapter": args.ip_adapter.name, "images": pair.image.name,
              "scale": json.dumps(args.scale)}
    return "\n".join(f"{k}: {v}" for k, v in fields.items())


def evaluate_pairs(pipe: IPAdapterPipeline, scorer: CLIPScorer, pairs: list[Pair], indices: range,
                   args: argparse.Namespace, progress: bool) -> list[dict]:
    """Generate and score the pairs ``indices``; each image is written under OUT/images/."""
    rows = []
    for i in tqdm(indices, desc="pairs", unit="pair", disable=not progress):
        pair = pairs[i]
        try:
            reference = open_rgb(pair.image)
        except OSError as exc:
            raise ValueError(f"{pair.image}: not a readable image ({exc})") from None
        prompt = pair.text if args.with_text else ""
        seeds = [generation_seed(args.seed, i, g) for g in range(args.num_images)]
        images = [pipe(prompt, [reference], scale=args.scale, guidance=args.guidance, steps=args.steps, seed=seed,
                       width=args.resolution, height=args.resolution, progress=False)[0] for seed in seeds]
        clip_i = scorer.clip_i(images, [reference]).tolist()
        clip_t = scorer.clip_t(images, [pair.text]).tolist()
        for g, (image, seed) in enumerate(zip(images, seeds)):
            name = f"images/{i:05d}-{g}.png"
            save_png(image, args.out / name, generation_parameters(args, pair, prompt, seed), args.force)
            rows.append({"pair": i, "prompt_image": str(pair.image), "caption": pair.text, "generation": g,
                         "seed": seed, "image": name, "clip_i": clip_i[g], "clip_t": clip_t[g]})
    return rows


def statistic(values: list[float]) -> dict:
    """Mean, sd and the 95% interval described by INTERVAL (none for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "sd": None, "ci95": None}
    sd = statistics.stdev(values)
    half = 1.96 * sd / math.sqrt(len(values))
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def summary(rows: list[dict], args: argparse.Namespace, world: int, adapter_variant: str, clip_model: str) -> dict:
    settings = {"model": str(args.model), "ip_adapter": str(args.ip_adapter), "adapter_variant": adapter_variant,
                "image_encoder": str(args.image_encoder), "clip": str(args.clip), "clip_model": clip_model,
                "data": str(args.data or args.coco_captions), "images": str(args.data_root or args.coco_images or ""),
                "limit": args.limit, "num_images": args.num_images, "steps": args.steps, "guidance": args.guidance,
                "scale": args.scale, "text_prompt": "caption" if args.with_text else "empty", "negative_prompt": "",
                "seed": args.seed, "seed_of_image": "numpy.random.SeedSequence([seed, pair, generation])"
                ".generate_state(1)[0]", "resolution": args.resolution, "sampler": "DDIM", "dtype": args.dtype,
                "clip_dtype": "fp32", "device": args.device, "processes": world}
    return {"clip_i": statistic([r["clip_i"] for r in rows]), "clip_t": statistic([r["clip_t"] for r in rows]),
            "interval": INTERVAL, "scale_of_scores": "plain cosine (torchmetrics' CLIPScore is 100×cos)",
            "counts": {"pairs": len({r["pair"] for r in rows}), "images": len(rows)}, "settings": settings}


def write_csv(rows: list[dict], path: Path, overwrite: bool) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write, overwrite)


def contact_sheet(rows: list[dict], out: Path) -> Image.Image:
    """The first pairs, a row each: the prompt image, then its generations with their scores."""
    by_pair: dict[int, list[dict]] = {}
    for row in rows:
        by_pair.setdefault(row["pair"], []).append(row)
    shown = sorted(by_pair)[:CONTACT_SHEET_PAIRS]
    columns = 1 + max(len(by_pair[i]) for i in shown)
    cell_h = THUMBNAIL + 16  # room for a line of text under each image
    sheet = Image.new("RGB", (columns * THUMBNAIL, len(shown) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for y, i in enumerate(shown):
        cells = [(open_rgb(Path(by_pair[i][0]["prompt_image"])), f"pair {i}")]
        cells += [(open_rgb(out / r["image"]), f"I {r['clip_i']:.3f} T {r['clip_t']:.3f}") for r in by_pair[i]]
        for x, (image, label) in enumerate(cells):
            thumb = ImageOps.contain(image, (THUMBNAIL, THUMBNAIL))
            sheet.paste(thumb, (x * THUMBNAIL + (THUMBNAIL - thumb.width) // 2, y * cell_h))
            draw.text((x * THUMBNAIL + 2, y * cell_h + THUMBNAIL + 2), label, fill="black")
    return sheet


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pairs = validate(args)
        processes = Processes.start(args.device)
        rank, world, args.device = processes.rank, processes.world_size, str(processes.device)
        scorer = CLIPScorer.from_file(args.clip, args.clip_model, args.device)  # a bad file fails before generating
        pipe = IPAdapterPipeline.from_files(args.model, args.ip_adapter, args.image_encoder, args.device,
                                            DTYPES[args.dtype])
        rows = evaluate_pairs(pipe, scorer, pairs, range(rank, len(pairs), world), args,
                              progress=rank == 0 and not args.no_progress)
        rows = sorted(processes.gather(rows), key=lambda r: (r["pair"], r["generation"]))
        if rank == 0:
            write_csv(rows, args.out / "scores.csv", args.force)
            result = summary(rows, args, world, pipe.adapter.spec.variant, scorer.architecture)
            text = json.dumps(result, indent=2, ensure_ascii=False) + "\n"
            write_atomically(args.out / "summary.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"),
                             args.force)
            sheet = contact_sheet(rows, args.out)
            write_atomically(args.out / "contact_sheet.png", lambda tmp: sheet.save(tmp, format="PNG"), args.force)
            print(f"CLIP-I {result['clip_i']['mean']:.4f}  CLIP-T {result['clip_t']['mean']:.4f}  "
                  f"({len(rows)} images); wrote {args.out}")
    except (ValueError, TypeError, OSError, RuntimeError, KeyboardInterrupt) as exc:  # CheckpointError is a ValueError
        return failed(exc)
    finally:
        Processes.stop()
    return 0
