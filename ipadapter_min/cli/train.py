"""``python -m ipadapter_min.train``: train an IP-Adapter on a frozen SD1.5 with the official
recipe (tencent-ailab/IP-Adapter tutorial_train.py), on a CPU, a GPU, or many under torchrun.

    python -m ipadapter_min.train --model sd15.safetensors --image-encoder models/image_encoder \
        --data data.json --data-root images/ --steps 10000 --batch-size 8 --out runs/base
    torchrun --nproc_per_node 8 -m ipadapter_min.train … --mixed-precision fp16

Writes ``OUT/ip-adapter.safetensors`` and ``OUT/ip-adapter.bin`` (the release's layouts, read by
the official code, diffusers' load_ip_adapter and ``sample``), ``OUT/checkpoint-<step>/`` every
``--save-every`` steps and at the end, and ``OUT/log.csv``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..formats.files import WriteError, one_line, write_atomically
from ..formats.image_encoder import read_image_encoder
from ..formats.ip_adapter import read_ip_adapter, save_official
from ..formats.sd15 import read_sd15
from ..loading.ip_adapter import (check_compatible, check_context_width, image_encoder_from_checkpoint,
                                  ip_adapter_from_checkpoint)
from ..loading.sd15 import sd15_from_checkpoint
from ..samplers import NoiseSchedule
from ..training.cache import CachedDataset, TrainingCache, file_fingerprint
from ..training.checkpoint import (checkpoint_folder, find_checkpoint, load_checkpoint, read_state, save_checkpoint,
                                   saved_steps)
from ..training.data import PairDataset, RankBatches, check_images, read_pairs, collate
from ..training.distributed import Processes
from ..training.recipe import (VARIANTS, AdapterLoss, FrozenEncoders, StepDraws, new_adapter, step_generator,
                               variant_spec)
from .parsing import Parser, failed, at_least, integer, side

PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_STEPS = 10 ** 9  # the paper trained for 1M steps
LOG_FIELDS = ["step", "loss", "samples_per_second", "elapsed_seconds", "skipped_images"]
# The settings a resumed run must share with the checkpoint to go on bit for bit.
RECIPE = ["variant", "resolution", "global_batch", "seed", "lr", "weight_decay", "mixed_precision", "pairs"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m ipadapter_min.train",
        description="Train an IP-Adapter for Stable Diffusion 1.5 as the official tutorial_train.py does: "
                    "UNet, VAE, text and image encoders frozen; the image projection and the 16 to_k_ip/to_v_ip "
                    "(initialised from to_k/to_v) trained on the ε-MSE loss at uniform timesteps, AdamW at a "
                    "constant learning rate; image, text and both dropped 5% of the time each. Run it under "
                    "torchrun for data-parallel training (DDP: gloo on CPU, NCCL on GPUs); --batch-size is "
                    "per process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="SD1.5 weights, any format `sample` takes")
    p.add_argument("--image-encoder", required=True, type=Path,
                   help="CLIP image encoder: the release's image_encoder folder (ViT-H/14) or a converted file")
    p.add_argument("--data", required=True, type=Path,
                   help="a JSON list of {\"image_file\": ..., \"text\": ...} (the official format), or a folder of "
                        "images with a .txt caption beside each")
    p.add_argument("--data-root", type=Path, help="folder the JSON's image_file paths are relative to "
                   "(default: the JSON's folder)")
    p.add_argument("--variant", choices=VARIANTS, default="base",
                   help="base: 4 tokens from the CLIP embedding; plus: 16 from the patch features (Resampler); "
                        "full-face: 257 from the patch features")
    p.add_argument("--init", type=Path, help="start from this IP-Adapter file instead of a fresh adapter")
    p.add_argument("--resolution", type=side, default=512, help="training image size (short side resized, centre crop)")
    p.add_argument("--batch-size", type=integer(1), default=8, help="samples per process per micro-step")
    p.add_argument("--grad-accum", type=integer(1), default=1, help="micro-steps per optimizer step")
    p.add_argument("--steps", type=integer(0, MAX_STEPS), default=1000, help="optimizer steps in all (0 writes the initial adapter)")
    p.add_argument("--lr", type=at_least(0), default=1e-4, help="AdamW learning rate (constant)")
    p.add_argument("--weight-decay", type=at_least(0), default=1e-2, help="AdamW weight decay")
    p.add_argument("--seed", type=integer(0, 2 ** 64 - 1), default=42, help="seeds the adapter's init, the data order and every draw")
    p.add_argument("--mixed-precision", choices=sorted(PRECISIONS), default="no",
                   help="frozen encoders in this dtype and the UNet under autocast (as the reference's accelerate "
                        "setting); fp16 scales the loss")
    p.add_argument("--save-every", type=integer(0, MAX_STEPS), default=2000, help="write a checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", type=Path, help="a checkpoint folder, or a run's --out folder (its latest checkpoint): "
                   "goes on bit for bit, with the checkpoint's settings")
    p.add_argument("--cache", type=Path, help="precompute the VAE latents (mean and std) and image features once "
                   "into this folder; later epochs skip the VAE and image encoders")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist, unless --resume is in it)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--workers", type=integer(0, 256), default=0, help="DataLoader worker processes reading images")
    p.add_argument("--device", help="torch device (default: cuda if available, under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def validate(args: argparse.Namespace) -> list:
    """Every check that needs no model: bad input fails in seconds, before any loading."""
    for flag, path in (("--model", args.model), ("--image-encoder", args.image_encoder), ("--init", args.init)):
        if path is not None and not path.exists():
            raise ValueError(f"{flag} {path}: no such file or folder")
    if args.resume is not None:
        args.resume = find_checkpoint(args.resume)
    if args.out.exists() and not args.force:
        continuing = args.resume is not None and args.out.resolve() in args.resume.resolve().parents
        if not continuing:
            raise ValueError(f"--out {args.out} already exists (pass --force to overwrite, or --resume a checkpoint in it)")
        for name in ("ip-adapter.safetensors", "ip-adapter.bin"):
            if (args.out / name).exists():
                raise ValueError(f"{args.out / name} already exists: this run finished (pass --force to overwrite it)")
        resumed_at = read_state(args.resume)["step"]
        later = sorted(s for s in saved_steps(args.out) if s > resumed_at)
        if later:
            raise ValueError(f"{checkpoint_folder(args.out, later[0])} is later than --resume {args.resume} and would "
                             f"be overwritten: resume from the latest, or pass --force")
    pairs = read_pairs(args.data, args.data_root)
    check_images(pairs)
    return pairs


def whole_row(row: dict) -> bool:
    """A log row written to its end (the last one may be cut short by an interrupt)."""
    return all(row.get(field) not in (None, "") for field in LOG_FIELDS) and row["step"].isdigit()


class Log:
    """log.csv (and TensorBoard's event files when tensorboard is installed), rank 0 only. A
    resumed run keeps the rows up to its step and appends."""

    def __init__(self, out: Path, start_step: int, enabled: bool):
        self.file = self.tensorboard = None
        if not enabled:
            return
        path = out / "log.csv"
        kept = []
        if path.is_file() and start_step > 0:
            kept = [row for row in csv.DictReader(path.open()) if whole_row(row) and int(row["step"]) <= start_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, LOG_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        write_atomically(path, lambda tmp: Path(tmp).write_text(text.getvalue()), overwrite=True)
        self.file = path.open("a")
        self.writer = csv.DictWriter(self.file, LOG_FIELDS, lineterminator="\n")
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(out / "tensorboard"))

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        try:
            self.writer.writerow(row)
            self.file.flush()
        except OSError as exc:
            raise WriteError(f"{self.file.name}: not written ({one_line(exc)})") from None
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("loss", row["loss"], row["step"])
            self.tensorboard.add_scalar("samples_per_second", row["samples_per_second"], row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def recipe(args: argparse.Namespace, pairs: list, world_size: int) -> dict:
    return {"variant": args.variant, "resolution": args.resolution,
            "global_batch": args.batch_size * args.grad_accum * world_size, "seed": args.seed, "lr": args.lr,
            "weight_decay": args.weight_decay, "mixed_precision": args.mixed_precision, "pairs": len(pairs)}


def check_resumable(args: argparse.Namespace, pairs: list, world_size: int) -> None:
    saved, ours = read_state(args.resume)["recipe"], recipe(args, pairs, world_size)
    differing = [f"{k} {saved.get(k)} → {ours[k]}" for k in RECIPE if saved.get(k) != ours[k]]
    if differing:
        raise ValueError(f"--resume {args.resume}: this run's settings differ from the checkpoint's "
                         f"({'; '.join(differing)}); give the same ones, or start a new run with --init")


def train(args: argparse.Namespace, pairs: list, ranks: Processes) -> int:
    device, main_process = ranks.device, ranks.main
    dtype = PRECISIONS[args.mixed_precision]
    if args.resume is not None:
        check_resumable(args, pairs, ranks.world_size)
    progress = main_process and not args.no_progress

    encoder_file, encoder_config = read_image_encoder(args.image_encoder)  # mismatches fail before loading
    sd_file, sd_configs = read_sd15(args.model)  # its configs; the tensors stay mapped until built
    context_dim = sd_configs["unet"].context_dim
    spec = variant_spec(args.variant, encoder_config, context_dim)
    check_compatible(spec, encoder_config, f"--variant {args.variant} with --image-encoder {args.image_encoder}: ")
    if args.init is not None:
        init_file, init_spec = read_ip_adapter(args.init)
        if init_spec.variant != spec.variant:
            raise ValueError(f"--init {args.init} is a {init_spec.variant} adapter, not --variant {args.variant}")
        check_compatible(init_spec, encoder_config, f"--init {args.init} with --image-encoder {args.image_encoder}: ")
        check_context_width(init_spec, context_dim, f"--init {args.init} with --model {args.model}")
    sd = sd15_from_checkpoint(sd_file, sd_configs, device)
    unet = sd["unet"]
    vae, text_encoder = sd["vae"].to(dtype), sd["text_encoder"].to(dtype)
    image_encoder = image_encoder_from_checkpoint(encoder_file, encoder_config, device, dtype)
    if args.init is not None:
        adapter = ip_adapter_from_checkpoint(init_file, init_spec, device, widths=unet.cross_attention_widths(),
                                             context_dim=context_dim)
    else:
        torch.manual_seed(args.seed)  # the projection's PyTorch init
        with torch.device(device):
            adapter = new_adapter(spec, unet)
    adapter.float().train().requires_grad_(True)
    encoders = FrozenEncoders(vae, text_encoder, image_encoder, spec)

    optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    start_step, skipped = 0, 0
    if args.resume is not None:
        tensors, optimizer_state, state = load_checkpoint(args.resume)
        adapter.load_state_dict(tensors)
        optimizer.load_state_dict(optimizer_state["optimizer"])
        scaler.load_state_dict(optimizer_state["scaler"])
        start_step, skipped = state["step"], state["skipped_images"]
    model = AdapterLoss(adapter, unet, NoiseSchedule())
    if ranks.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        trained = model

    if args.cache is not None:
        cache = TrainingCache(args.cache, pairs, {
            "resolution": args.resolution, "model": file_fingerprint(args.model),
            "image_encoder": file_fingerprint(args.image_encoder), "encoder_output": spec.encoder_output,
            "precision": args.mixed_precision})
        cache.build(encoders, args.resolution, args.batch_size, ranks.rank, ranks.world_size, progress)
        dataset = CachedDataset(cache)
    else:
        dataset = PairDataset(pairs, args.resolution, encoder_config.image_size)
    accum, batch = args.grad_accum, args.batch_size
    sampler = RankBatches(len(pairs), batch, ranks.rank, ranks.world_size, args.seed, start_step * accum,
                          (args.steps - start_step) * accum)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.workers)
    dropped_features = encoders.dropped_image_features()
    latent_shape = (vae.cfg.latent_channels, args.resolution // 8, args.resolution // 8)
    global_batch = batch * ranks.world_size

    def save(step: int) -> None:
        if main_process:
            save_checkpoint(checkpoint_folder(args.out, step), adapter.state_dict(),
                            {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()},
                            {"step": step, "skipped_images": skipped, "recipe": recipe(args, pairs, ranks.world_size)},
                            overwrite=args.force)

    if main_process:
        args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out, start_step, main_process)
    bar = tqdm(total=args.steps, initial=start_step, desc="training", unit="step", disable=not progress)
    step, saved, step_loss, started = start_step, start_step, torch.zeros((), device=device), time.perf_counter()
    step_skipped = 0
    window = (started, start_step)
    try:
        for micro_index, items in enumerate(loader, start=start_step * accum):
            step, micro = divmod(micro_index, accum)
            if micro == 0:  # one draw for the step's samples: accumulating B twice draws what 2B does
                draws = StepDraws.draw(global_batch * accum, latent_shape, step_generator(args.seed, step))
            present = [j for j, item in enumerate(items) if item is not None]
            step_skipped += len(items) - len(present)  # counted over the processes once a step
            inputs = (None, None, None, None, None)
            if present:
                own = draws.take(torch.tensor([micro * global_batch + ranks.rank * batch + j for j in present]))
                items = [items[j] for j in present]
                texts = ["" if drop else item["text"] for drop, item in zip(own.drop_text.tolist(), items)]
                if args.cache is not None:
                    mean, std = (torch.stack([item[k] for item in items]).to(device) for k in ("mean", "std"))
                    features = torch.stack([item["features"] for item in items]).to(device)
                else:
                    mean, std = encoders.latent_moments(torch.stack([item["pixels"] for item in items]))
                    features = encoders.image_features(torch.stack([item["clip_pixels"] for item in items]))
                drop = own.drop_image.to(device).reshape((-1,) + (1,) * (features.ndim - 1))
                features = torch.where(drop, dropped_features.to(features.dtype), features)
                inputs = (encoders.scaled_latents(mean, std, own.latent_noise), encoders.text_states(texts, device),
                          features, own.noise.to(device), own.timesteps.to(device))
            last = micro == accum - 1
            sync = contextlib.nullcontext() if last or ranks.world_size == 1 else trained.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss = trained(*inputs)
                scaler.scale(loss / accum).backward()
            step_loss += loss.detach().float() / accum
            if not last:
                continue
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            skipped += ranks.total(step_skipped)
            step_skipped = 0
            loss_value = ranks.mean(step_loss)
            step_loss.zero_()
            now = time.perf_counter()
            speed = global_batch * accum * (step - window[1]) / (now - window[0])
            window = (now, step)
            log.write({"step": step, "loss": loss_value, "samples_per_second": round(speed, 3),
                       "elapsed_seconds": round(now - started, 3), "skipped_images": skipped})
            bar.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{speed:.2f}")
            bar.update(1)
            if args.save_every and step % args.save_every == 0:
                save(step)
                saved = step
    except KeyboardInterrupt:
        bar.close()
        log.close()
        if step > saved:
            save(step)
        if main_process:
            print(f"interrupted after step {step}: continue with --resume {checkpoint_folder(args.out, step)}",
                  file=sys.stderr)
        return 130
    bar.close()
    log.close()
    if step > saved or start_step == args.steps == 0:
        save(step)
    if skipped and main_process:
        print(f"skipped {skipped} damaged image(s) (counted once per read)", file=sys.stderr)
    if main_process:
        for path in save_official(adapter.state_dict(), args.out, overwrite=args.force):
            print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pairs = validate(args)
        return train(args, pairs, Processes.start(args.device))
    except (ValueError, TypeError, OSError, RuntimeError, KeyboardInterrupt) as exc:  # CheckpointError is a ValueError
        return failed(exc)
    finally:
        Processes.stop()
