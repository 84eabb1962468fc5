"""``python -m ipadapter_min.demo evaluate``: does the demo model follow its prompts? The judge says.

Over fixed held-out references (scenes the models never saw: another seed), with DDIM, guidance
7.5 and one seed per reference:

- text to image: the judge's reading of an image made from a full caption, against the caption;
- image prompt, empty text, λ = 0, 0.5 and 1: the judge's reading against the reference's true
  attributes (at λ = 0 the adapter is off: agreement is the model's marginal, about chance);
- text + image (the paper's multimodal claim): a reference with the prompt "a <another shape>" at
  λ = 0.5 should give that shape in the reference's colour;
- CLIP-I and CLIP-T by ``python -m ipadapter_min.evaluate`` itself, with the demo's CLIP (built in
  open_clip's layout from the shipped parts), at λ = 0 and 1.

Also draws the README's pictures: a λ sweep (references down, λ across) and a text + image grid.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..cli.evaluate import main as evaluate_main
from ..formats.files import read_state_dict, save_safetensors, write_atomically
from ..loading.sd15 import load_part
from ..pipelines.image_prompts import IPAdapterPipeline
from .clip import open_clip_checkpoint
from .judge import load_judge, predict
from .world import ATTRIBUTES, SHAPES, full_caption, render, scenes

HELD_OUT_SEED = 77_777  # no training stage draws scenes from this seed
LAMBDAS = (0.0, 0.5, 1.0)
TEXT_AND_IMAGE_LAMBDA = 0.5


def held_out_references(count: int) -> tuple[list, list[Image.Image]]:
    """The evaluation's reference scenes and their renders: scenes no training stage saw."""
    held_out = scenes(count, HELD_OUT_SEED)
    return held_out, [render(scene, HELD_OUT_SEED + i) for i, scene in enumerate(held_out)]


def agreement(readings: list[dict[str, str]], truths: list) -> dict[str, float]:
    """Per attribute, the fraction of images whose judge reading equals the truth."""
    return {name: sum(r[name] == t.attribute(name) for r, t in zip(readings, truths)) / len(truths)
            for name in ATTRIBUTES}


def other_shape(scene, index: int) -> str:
    """A shape the reference does not have, cycling through the others."""
    others = [s for s in SHAPES if s != scene.shape]
    return others[index % len(others)]


def write_demo_clip(weights: Path, folder: Path) -> tuple[Path, Path]:
    """The demo's CLIP as an open_clip checkpoint and config JSON, for ``python -m ipadapter_min.evaluate``."""
    text = {k[len("text_encoder."):]: v.float() for k, v in read_state_dict(weights / "text_encoder.safetensors").items()}
    image = {k: v.float() for k, v in read_state_dict(weights / "image_encoder.safetensors").items()}
    head = {k: v.float() for k, v in load_file(weights / "clip_text_projection.safetensors").items()}
    state, config = open_clip_checkpoint(text, image, head)
    save_safetensors(state, folder / "demo-clip.safetensors", {"format": "pt"}, overwrite=True)
    text = json.dumps(config)
    write_atomically(folder / "demo-clip.json", lambda tmp: Path(tmp).write_text(text), overwrite=True)
    return folder / "demo-clip.safetensors", folder / "demo-clip.json"


def clip_scores(weights: Path, references: list, count: int, steps: int, folder: Path) -> dict:
    """CLIP-I / CLIP-T means from the real ``evaluate`` command, at λ = 0 and 1."""
    for i, (scene, image) in enumerate(references):
        write_atomically(folder / f"ref-{i:04d}.png", lambda tmp: image.save(tmp, format="PNG"), overwrite=True)
    entries = [{"image_file": f"ref-{i:04d}.png", "text": full_caption(scene)} for i, (scene, _) in enumerate(references)]
    text = json.dumps(entries)
    write_atomically(folder / "pairs.json", lambda tmp: Path(tmp).write_text(text), overwrite=True)
    clip, config = write_demo_clip(weights, folder)
    result = {}
    for scale in (0.0, 1.0):
        out = folder / f"scores-{scale}"
        code = evaluate_main(["--model", str(weights), "--ip-adapter", str(weights / "ip_adapter.safetensors"),
                              "--image-encoder", str(weights / "image_encoder.safetensors"),
                              "--data", str(folder / "pairs.json"), "--limit", str(count), "--num-images", "1",
                              "--steps", str(steps), "--scale", str(scale), "--resolution", "64", "--clip", str(clip),
                              "--clip-model", str(config), "--out", str(out), "--no-progress"])
        if code != 0:
            raise RuntimeError("python -m ipadapter_min.evaluate failed on the demo model")
        summary = json.loads((out / "summary.json").read_text())
        result[f"lambda {scale}"] = {"clip_i": summary["clip_i"]["mean"], "clip_t": summary["clip_t"]["mean"]}
    return result


def grid(rows: list[list[Image.Image]], labels: list[str], cell: int = 96) -> Image.Image:
    """Images in rows, enlarged to ``cell`` px, with column labels on top."""
    top = 16
    sheet = Image.new("RGB", (cell * len(rows[0]), top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for x, label in enumerate(labels):
        draw.text((x * cell + 4, 2), label, fill="black")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            sheet.paste(image.resize((cell, cell), Image.NEAREST), (x * cell, top + y * cell))
    return sheet


@torch.no_grad()
def evaluate_demo(weights: Path, count: int = 200, steps: int = 30, guidance: float = 7.5,
                  pictures: Path | None = None, progress: bool = True, unet: Path | None = None,
                  text_only: bool = False) -> dict:
    """The judged tables; ``unet``: another UNet file in place of the folder's (a training snapshot);
    ``text_only``: text to image alone (a learning curve's point)."""
    pipe = IPAdapterPipeline.from_files(weights, weights / "ip_adapter.safetensors", weights / "image_encoder.safetensors")
    if unet is not None:
        other = load_part(unet, "unet").eval()
        if other.cfg != pipe.sd.unet.cfg:
            raise ValueError(f"{unet}: a UNet of another shape than {weights}'s ({other.cfg} vs {pipe.sd.unet.cfg})")
        pipe.sd.unet = other
    judge = load_judge(weights / "judge.safetensors")
    held_out, images = held_out_references(count)
    references = list(zip(held_out, images))
    settings = dict(steps=steps, guidance=guidance, width=64, height=64, progress=False)

    made: dict[str, list[Image.Image]] = {"text": [], "text+image": [], **{f"lambda {s}": [] for s in LAMBDAS}}
    for i, (scene, reference) in enumerate(tqdm(references, desc="generating", disable=not progress)):
        made["text"] += pipe.sd(full_caption(scene), seed=i, **settings)
        if text_only:
            continue
        for scale in LAMBDAS:
            made[f"lambda {scale}"] += pipe("", [reference], scale=scale, seed=i, **settings)
        made["text+image"] += pipe(f"a {other_shape(scene, i)}", [reference], scale=TEXT_AND_IMAGE_LAMBDA, seed=i,
                                   **settings)
    readings = {name: predict(judge, images) for name, images in made.items() if images}
    report = {"references": count, "steps": steps, "guidance": guidance,
              "text_to_image": agreement(readings["text"], held_out)}
    if text_only:
        return report
    report["image_prompt"] = {name: agreement(readings[name], held_out) for name in made if name.startswith("lambda")}
    followed = [r["shape"] == other_shape(s, i) and r["color"] == s.color
                for i, (r, s) in enumerate(zip(readings["text+image"], held_out))]
    report["text_and_image"] = {"lambda": TEXT_AND_IMAGE_LAMBDA, "shape_from_text_colour_from_image": sum(followed) / count}
    with tempfile.TemporaryDirectory() as folder:
        report["clip_scores"] = clip_scores(weights, references, count, steps, Path(folder))
    if pictures is not None:
        pictures.mkdir(parents=True, exist_ok=True)
        shown = range(min(6, count))
        sweep = [[references[i][1]] + [pipe("", [references[i][1]], scale=s, seed=i, **settings)[0]
                                       for s in (0.0, 0.25, 0.5, 0.75, 1.0)] for i in shown]
        sheet = grid(sweep, ["reference"] + [f"lambda {s:g}" for s in (0.0, 0.25, 0.5, 0.75, 1.0)])  # PIL's font has no λ
        write_atomically(pictures / "demo-lambda-sweep.png", lambda tmp: sheet.save(tmp, format="PNG"), True)
        mixed = [[references[i][1]] + [pipe(f"a {shape}", [references[i][1]], scale=TEXT_AND_IMAGE_LAMBDA, seed=i,
                                            **settings)[0] for shape in ("circle", "star", "square", "cross")]
                 for i in shown]
        sheet = grid(mixed, ["reference", '"a circle"', '"a star"', '"a square"', '"a cross"'])
        write_atomically(pictures / "demo-text-and-image.png", lambda tmp: sheet.save(tmp, format="PNG"), True)
    return report
