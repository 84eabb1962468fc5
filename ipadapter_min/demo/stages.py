"""The demo's training stages, in order, each resumable, each ending with its weights exported
(fp16, the project's converted formats) to ``OUT/weights/`` and its measured quality to
``OUT/<stage>/report.json``.

    clip   text encoder + image encoder, contrastive       → text_encoder, image_encoder
    vae    autoencoder, reconstruction                     → vae
    unet   denoiser on the frozen text encoder and VAE     → unet (its EMA)
    adapter  a base IP-Adapter, by ``python -m ipadapter_min.train`` → ip_adapter
    judge  an independent attribute classifier, the yardstick of ``demo evaluate`` → judge
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import ImageFilter

from ..cli.train import main as train_main
from ..formats.files import read_state_dict, save_safetensors, write_atomically
from ..formats.image_encoder import image_encoder_metadata
from ..formats.sd15 import sd15_metadata
from ..loading.sd15 import load_part
from ..models.tokenizer import Tokenizer
from .autoencoder import new_vae, psnr, vae_loss, with_measured_scaling
from .batches import draw_scenes
from .clip import TRAIN_TOKENS, DemoCLIP, clip_loss, zero_shot_accuracy
from .denoiser import DenoiserTraining, encode_dataset
from .judge import accuracy, save_judge, train_judge
from .models import IMAGE, RESOLUTION, TEXT
from .stage import run_stage, schedule
from .world import WORDS, training_caption


@dataclass(frozen=True)
class Settings:
    steps: int
    batch: int
    lr: float
    weight_decay: float
    seed: int
    smoke_steps: int = 3


CLIP = Settings(steps=3000, batch=128, lr=5e-4, weight_decay=0.1, seed=1)
VAE = Settings(steps=8000, batch=16, lr=7e-4, weight_decay=0.0, seed=2)
UNET = Settings(steps=6000, batch=64, lr=3e-4, weight_decay=0.0, seed=3)
ADAPTER = Settings(steps=2000, batch=64, lr=1e-4, weight_decay=1e-2, seed=4, smoke_steps=2)  # the paper's lr, wd
ADAPTER_IMAGES = 20_000
JUDGE = Settings(steps=2000, batch=64, lr=3e-3, weight_decay=0.0, seed=5)  # ≥ 99.6% per attribute (measured)
JUDGE_GATE = 0.98  # its verdicts count only above this, per attribute, on held-out renders
UNET_SNAPSHOTS = (2000, 4000, 6000, 10_000, 15_000)  # the EMA UNet kept at these steps (OUT/unet/snapshots/)
UNET_IMAGES = 60_000  # rendered and encoded once; 15,840 attribute combinations, each ~4× with jitter
SMOKE_BATCH = 8


def run_size(s: Settings, smoke: bool) -> tuple[int, int]:
    """Steps and batch size: a smoke run checks the path, not the learning, so a few small batches."""
    return (s.smoke_steps, SMOKE_BATCH) if smoke else (s.steps, s.batch)


def export_part(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_safetensors({k: v.detach().half().contiguous() for k, v in tensors.items()}, path, metadata, overwrite=True)


def world_rows_only(table: torch.Tensor) -> torch.Tensor:
    """The token table with the rows of words the world never uses set to zero: training never
    moved them from their random start, and zero rows cost nothing once compressed (the table is
    49,408 rows, the captions use about 40)."""
    tokenizer = Tokenizer()
    used = set(tokenizer(" ".join(WORDS))[0].tolist())
    keep = torch.zeros(table.shape[0], dtype=torch.bool)
    keep[sorted(used)] = True
    return torch.where(keep[:, None], table, torch.zeros_like(table))


def write_report(folder: Path, report: dict) -> None:
    text = json.dumps(report, indent=1)
    write_atomically(folder / "report.json", lambda tmp: Path(tmp).write_text(text), overwrite=True)
    print(f"{folder.name}: {text}")


def train_clip(out: Path, smoke: bool = False, progress: bool = True) -> dict:
    s = CLIP
    steps, batch = run_size(s, smoke)
    model, tokenizer = DemoCLIP(), Tokenizer(TRAIN_TOKENS)
    run_stage("clip", out / "clip", {"clip": model}, lambda step: clip_loss(model, tokenizer, s.seed, step, batch),
              steps, schedule(s.lr, steps), s.weight_decay, progress=progress)
    weights = out / "weights"
    text = model.text.state_dict()
    text["embeddings.token_embedding.weight"] = world_rows_only(text["embeddings.token_embedding.weight"])
    export_part({f"text_encoder.{k}": v for k, v in text.items()},
                weights / "text_encoder.safetensors", sd15_metadata({"text_encoder": TEXT}))
    export_part(model.image.state_dict(), weights / "image_encoder.safetensors", image_encoder_metadata(IMAGE))
    export_part({"text_projection": model.text_projection.weight, "logit_scale": model.logit_scale},
                weights / "clip_text_projection.safetensors", {"format": "ipadapter_min.demo_clip_head"})
    report = {"steps": steps, "zero_shot_accuracy": zero_shot_accuracy(model, s.seed, 10 if smoke else 200)}
    write_report(out / "clip", report)
    return report


def train_vae(out: Path, smoke: bool = False, progress: bool = True) -> dict:
    s = VAE
    steps, batch = run_size(s, smoke)
    vae = new_vae()

    def loss(step: int) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # 2× faster on the CPU; the pilot trained this way
            return vae_loss(vae, s.seed, step, batch)

    run_stage("vae", out / "vae", {"vae": vae}, loss, steps, schedule(s.lr, steps), s.weight_decay, progress=progress)
    vae = with_measured_scaling(vae, s.seed, 32 if smoke else 512)
    export_part({f"vae.{k}": v for k, v in vae.state_dict().items()}, out / "weights" / "vae.safetensors",
                sd15_metadata({"vae": vae.cfg}))
    report = {"steps": steps, "psnr_db": psnr(vae, s.seed, 8 if smoke else 64), "scaling_factor": vae.cfg.scaling_factor}
    write_report(out / "vae", report)
    return report




def train_unet(out: Path, smoke: bool = False, progress: bool = True) -> dict:
    s = UNET
    steps, batch = run_size(s, smoke)
    weights, folder = out / "weights", out / "unet"
    text_encoder, vae = (load_part(weights / f"{part}.safetensors", part) for part in ("text_encoder", "vae"))
    dataset_path = folder / "dataset.pt"
    if dataset_path.is_file():
        dataset = torch.load(dataset_path, weights_only=True)
    else:
        dataset = encode_dataset(vae, 64 if smoke else UNET_IMAGES, s.seed, progress)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(dataset_path, lambda tmp: torch.save(dataset, tmp))
    training = DenoiserTraining(text_encoder, vae, dataset, s.seed, batch)
    snapshots = (steps,) if smoke else UNET_SNAPSHOTS

    def export_ema(path: Path) -> None:
        export_part({f"unet.{k}": v for k, v in training.ema.state_dict().items()}, path,
                    sd15_metadata({"unet": training.ema.cfg}))

    def after_step(step: int) -> None:
        training.update_ema(step)
        if step + 1 in snapshots:  # for the learning curve: `demo evaluate --unet` on each
            export_ema(folder / "snapshots" / f"unet-{step + 1}.safetensors")

    run_stage("unet", folder, {"unet": training.unet, "ema": training.ema}, training.loss, steps,
              schedule(s.lr, steps), s.weight_decay, progress=progress, after_step=after_step)
    export_ema(weights / "unet.safetensors")
    report = {"steps": steps}
    write_report(folder, report)
    return report


def write_adapter_data(folder: Path, count: int, seed: int) -> Path:
    """Rendered scenes as PNGs with the official JSON (one caption each: full, partial or empty)."""
    data = folder / "data.json"
    if data.is_file():
        return data
    folder.mkdir(parents=True, exist_ok=True)
    entries, chunk = [], 256
    for start in range(0, count, chunk):
        scenes, images, rng = draw_scenes(seed, start, min(chunk, count - start))
        for i, (scene, image) in enumerate(zip(scenes, images)):
            name = f"{start + i:06d}.png"
            write_atomically(folder / name, lambda tmp: image.save(tmp, format="PNG"), overwrite=True)
            entries.append({"image_file": name, "text": training_caption(scene, rng)})
    text = json.dumps(entries)
    write_atomically(data, lambda tmp: Path(tmp).write_text(text))
    return data


def train_adapter(out: Path, smoke: bool = False, progress: bool = True) -> dict:
    """The real command line, as a user runs it, on the demo's models and rendered images."""
    s = ADAPTER
    steps, batch = run_size(s, smoke)
    weights, folder = out / "weights", out / "adapter"
    data = write_adapter_data(folder / "data", 64 if smoke else ADAPTER_IMAGES, s.seed)
    run = folder / "run"
    argv = ["--model", str(weights), "--image-encoder", str(weights / "image_encoder.safetensors"), "--data", str(data),
            "--resolution", str(RESOLUTION), "--batch-size", str(batch), "--steps", str(steps), "--lr", str(s.lr),
            "--weight-decay", str(s.weight_decay), "--seed", str(s.seed), "--save-every", "500",
            "--cache", str(folder / "cache"), "--out", str(run)]
    if run.exists():
        argv += ["--resume", str(run)]
    if not progress:
        argv.append("--no-progress")
    if train_main(argv) != 0:
        raise RuntimeError(f"the adapter stage's python -m ipadapter_min.train {' '.join(argv)} failed")
    export_part(read_state_dict(run / "ip-adapter.safetensors"), weights / "ip_adapter.safetensors", {"format": "pt"})
    report = {"steps": steps}
    write_report(folder, report)
    return report


def train_judge_stage(out: Path, smoke: bool = False, progress: bool = True) -> dict:
    s = JUDGE
    steps, batch = run_size(s, smoke)
    judge = train_judge(steps, out / "judge", batch, s.seed, progress, s.lr)
    save_judge(judge, out / "weights" / "judge.safetensors", overwrite=True)
    scenes_, images, _ = draw_scenes(s.seed, 10**9, 40 if smoke else 1000)
    blurred = [image.filter(ImageFilter.GaussianBlur(1)) for image in images]
    report = {"steps": steps, "held_out_accuracy": accuracy(judge, scenes_, images),
              "blurred_accuracy": accuracy(judge, scenes_, blurred)}
    report["passes_gate"] = min(report["held_out_accuracy"].values()) >= JUDGE_GATE
    write_report(out / "judge", report)
    return report


STAGES = {"clip": train_clip, "vae": train_vae, "unet": train_unet, "adapter": train_adapter, "judge": train_judge_stage}
