"""End to end: SD1.5 text-to-image, ours against diffusers on the same weights, in one process.

    python -m ipadapter_min.benchmarks.pipeline            # CPU: 256 px, 4 steps, fp32; CUDA: 512 px, 30 steps, fp16
    python -m ipadapter_min.benchmarks.pipeline --compile  # also with torch.compile on the UNet, both sides
    python -m ipadapter_min.benchmarks.pipeline --size small --resolution 64 --steps 2 --loading-repeats 0  # quick

Weights: SD1.5's architecture (``--size full``; ``small``: a tenth of the width, one text layer)
with random weights, written once into ``--workdir``: by diffusers and transformers as a diffusers
folder where they are installed, else by our own classes as a converted file; and a base
IP-Adapter (4 tokens) with random weights in the official format. Both sides load these files.

Each configuration (without and with the adapter; eager, and with ``--compile`` compiled) is
timed on both sides alternately, ours, diffusers, ours, diffusers, ..., ``--repeats`` times after
one warm-up call each (which also compiles), the whole call from prompt to PIL image:

  s/image           median and best of the timed calls
  it/s              steps / median s per image (text encoder and VAE decode included)
  peak memory       growth over one call: torch.cuda.max_memory_allocated on CUDA, the process's
                    peak RSS (reset before each call) on the CPU; the weights are loaded before
  max pixel diff    ours vs diffusers' image for the same seed, in 1/255 (a fast wrong pipeline
                    cannot look good); on CUDA with the adapter also our fused kernel vs our
                    reference attention (two SDPA calls, as diffusers)

Both sides get the prompt's token ids from our tokenizer (diffusers is given them and runs its own
text encoder in the timed call; tokenizing takes about a millisecond) and the image prompt as
encoder features (diffusers' ``ip_adapter_image_embeds``): the image encoder is not timed.
Without open_clip (whose BPE vocabulary the tokenizer reads) a stand-in gives one id per
character. Without diffusers only our side runs, and the JSON says "diffusers: not installed".
Loading: ``ipadapter_min.benchmarks.loading``'s figures (a fresh process per format) for the same weights.

Results go to JSON (``--out``, default results-pipeline-<device>.json in the current folder),
rewritten after each stage so that a run cut short keeps what it measured, and to a plot next
to it if matplotlib is importable.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..formats.files import save_safetensors, write_atomically
from ..formats.ip_adapter import save_official
from ..formats.sd15 import sd15_metadata
from ..ip_adapter.adapter import IPAdapter
from ..kernels import decoupled_attention, decoupled_attention_reference
from ..loading.ip_adapter import load_ip_adapter
from ..loading.sd15 import load_sd15
from ..models.configs import AdapterSpec, TextEncoderConfig, UNetConfig, VAEConfig
from ..models.cpu_convolutions import pack_convolutions
from ..models.text_encoder import TextEncoder
from ..models.tokenizer import BOS_ID, EOS_ID, Tokenizer
from ..models.unet import UNet
from ..models.vae import VAE
from ..pipelines.image_prompt_input import ImagePromptInput
from ..pipelines.text_to_image import StableDiffusion
from . import loading

SIZES = {  # our configs; the diffusers folder is written from the same ones
    "full": dict(unet=UNetConfig(), vae=VAEConfig(), text_encoder=TextEncoderConfig()),
    "small": dict(unet=UNetConfig(channels=32, groups=8), vae=VAEConfig(channels=16, channel_mult=(1, 1, 2, 2),
                                                                           res_blocks=1, groups=8),
                  text_encoder=TextEncoderConfig(layers=1, mlp_width=64)),
}
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on mars", "blurry, low quality"
GUIDANCE, SEED, SCALE = 7.5, 0, 1.0
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- weights

def write_diffusers_folder(folder: Path, configs: dict) -> None:
    """Random weights (the libraries' own init), written by diffusers and transformers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    u, v, t = configs["unet"], configs["vae"], configs["text_encoder"]
    torch.manual_seed(0)
    UNet2DConditionModel(block_out_channels=tuple(u.channels * m for m in u.channel_mult), layers_per_block=u.res_blocks,
                         norm_num_groups=u.groups, cross_attention_dim=u.context_dim,
                         attention_head_dim=u.heads).save_pretrained(folder / "unet")
    levels = len(v.channel_mult)
    AutoencoderKL(block_out_channels=tuple(v.channels * m for m in v.channel_mult),
                  down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                  layers_per_block=v.res_blocks, latent_channels=v.latent_channels, norm_num_groups=v.groups,
                  sample_size=512).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(hidden_size=t.width, intermediate_size=t.mlp_width, num_hidden_layers=t.layers,
                                 num_attention_heads=t.heads, max_position_embeddings=t.max_positions,
                                 hidden_act="quick_gelu", projection_dim=t.width)).save_pretrained(folder / "text_encoder")


def write_converted_file(path: Path, configs: dict) -> None:
    """Random weights (PyTorch's default init) from our own classes, as a converted file."""
    torch.manual_seed(0)
    tensors = {}
    for part, model in (("unet", UNet), ("vae", VAE), ("text_encoder", TextEncoder)):
        tensors.update({f"{part}.{k}": v for k, v in model(configs[part]).state_dict().items()})
    save_safetensors(tensors, path, sd15_metadata(configs))


def make_weights(workdir: Path, configs: dict, with_diffusers: bool) -> tuple[Path, Path]:
    """(SD1.5 weights, IP-Adapter file) in ``workdir``, written the first time."""
    workdir.mkdir(parents=True, exist_ok=True)
    folder, converted = workdir / "diffusers", workdir / "converted-fp32.safetensors"
    if with_diffusers and not (folder / "unet").exists():
        print(f"writing random SD1.5 weights with diffusers to {folder} (once) ...", flush=True)
        write_diffusers_folder(folder, configs)
    if not (folder / "unet").exists() and not converted.exists():
        print(f"writing random SD1.5 weights with our classes to {converted} (once) ...", flush=True)
        write_converted_file(converted, configs)
    adapter = workdir / "ip-adapter.safetensors"
    if not adapter.exists():
        with torch.device("meta"):
            widths = UNet(configs["unet"]).cross_attention_widths()
        torch.manual_seed(1)
        save_official(IPAdapter(AdapterSpec.on_embedding(1024), widths).state_dict(), workdir, overwrite=True)
    return (folder if (folder / "unet").exists() else converted), adapter


# ----------------------------------------------------------------------------- the two sides

class CharTokenizer(Tokenizer):
    """Stands in for our tokenizer without open_clip's vocabulary: one id per character, laid out as
    CLIP's (BOS, ids, EOS, EOS padding to 77), so the text encoder does the same work."""

    def __init__(self, max_length: int = 77):
        self.max_length, self.bos_id, self.eos_id, self.pad_id = max_length, BOS_ID, EOS_ID, EOS_ID

    def encode(self, text: str) -> list[int]:
        return [ord(c) % BOS_ID for c in text]


def make_tokenizer() -> tuple[Tokenizer, str]:
    try:
        return Tokenizer(), "ours (open_clip's BPE vocabulary)"
    except FileNotFoundError:
        return CharTokenizer(), "stand-in, one id per character (open_clip not installed)"


class Ours:
    def __init__(self, weights: Path, adapter: Path, device, dtype, tokenizer: Tokenizer, packing: bool = True):
        models = load_sd15(weights, device=device, dtype=dtype)
        self.sd = StableDiffusion(models["unet"], models["vae"], models["text_encoder"], tokenizer)
        if packing:  # the sample command's --packed-convolutions (fp32 on the CPU; a no-op elsewhere)
            pack_convolutions(self.sd.unet)
            pack_convolutions(self.sd.vae)
        self.adapter = load_ip_adapter(adapter, device, dtype, self.sd.unet.cross_attention_widths())
        self.eager_unet = self.sd.unet

    def compile(self, compiled: bool) -> None:
        self.sd.unet = torch.compile(self.eager_unet) if compiled else self.eager_unet

    @torch.no_grad()
    def __call__(self, features, resolution, steps, attention=decoupled_attention):
        hook = None
        if features is not None:
            hook = ImagePromptInput(self.adapter, features=features, scale=SCALE).hook(resolution, resolution, attention)
        return self.sd(PROMPT, NEGATIVE, steps=steps, guidance=GUIDANCE, seed=SEED, width=resolution,
                       height=resolution, hook=hook, progress=False)[0]

    def weight_bytes(self) -> int:
        models = (self.eager_unet, self.sd.vae, self.sd.text_encoder)
        return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


class Diffusers:
    def __init__(self, folder: Path, adapter: Path, device, dtype, tokenizer: Tokenizer):
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from diffusers.utils import logging as diffusers_logging
        from transformers import CLIPTextModel

        diffusers_logging.set_verbosity_error()
        # SD1.5's scheduler_config.json, as DDIM (our default sampler)
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                  steps_offset=1, timestep_spacing="leading")
        self.pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(folder / "vae"), text_encoder=CLIPTextModel.from_pretrained(
                folder / "text_encoder"), unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
            tokenizer=None, scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
            requires_safety_checker=False).to(device, dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.adapter, self.tokenizer, self.device = adapter, tokenizer, device
        self.eager_unet = self.pipe.unet

    def load_adapter(self) -> None:
        self.pipe.unet = self.eager_unet
        self.pipe.load_ip_adapter(str(self.adapter.parent), subfolder="", weight_name=self.adapter.name,
                                  image_encoder_folder=None)
        self.pipe.set_ip_adapter_scale(SCALE)
        self.eager_unet = self.pipe.unet

    def compile(self, compiled: bool) -> None:
        self.pipe.unet = torch.compile(self.eager_unet) if compiled else self.eager_unet

    @torch.no_grad()
    def __call__(self, features, resolution, steps):
        cond, uncond = (self.pipe.text_encoder(self.tokenizer([text]).to(self.device))[0] for text in (PROMPT, NEGATIVE))
        image_prompt = {} if features is None else {"ip_adapter_image_embeds": [features]}
        return self.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
                         guidance_scale=GUIDANCE, width=resolution, height=resolution,
                         generator=torch.Generator("cpu").manual_seed(SEED), **image_prompt).images[0]

    def weight_bytes(self) -> int:
        models = (self.eager_unet, self.pipe.vae, self.pipe.text_encoder)
        return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


# ----------------------------------------------------------------------------- measuring

class PeakMemory:
    """Peak memory growth over one call: CUDA's allocator statistics; on the CPU (Linux) the
    process's peak RSS, reset before the call, once freed heap memory has gone back to the system
    (glibc's malloc_trim): else a call re-using what an earlier call freed would count none of it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.clear_refs = Path("/proc/self/clear_refs")
        self.readable = self.cuda or self.clear_refs.exists()
        self.malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)

    @staticmethod
    def _status(field: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        elif self.readable:
            gc.collect()
            if self.malloc_trim is not None:
                self.malloc_trim(0)
            self.clear_refs.write_text("5")  # the peak RSS (VmHWM) becomes the current RSS
            self.before = self._status("VmRSS:")

    def growth(self) -> int | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.before
        return self._status("VmHWM:") - self.before if self.readable else None


def measure_call(fn, device: torch.device) -> tuple[float, int | None, np.ndarray]:
    """(seconds, peak memory growth in bytes or None where it cannot be read, the image)."""
    memory = PeakMemory(device)
    memory.start()
    start = time.perf_counter()
    image = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, memory.growth(), np.asarray(image).astype(np.int16)


def alternate(sides: dict, repeats: int, device: torch.device) -> dict:
    """One warm-up call of each side, then ``repeats`` rounds of one call each, in turn."""
    first = {name: measure_call(fn, device) for name, fn in sides.items()}
    runs = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            runs[name].append(measure_call(fn, device))
    results = {}
    for name, timed in runs.items():
        seconds = [s for s, _, _ in timed]
        peaks = [p for _, p, _ in timed if p is not None]
        results[name] = dict(s_per_image=statistics.median(seconds), best_s=min(seconds), times_s=seconds,
                             first_call_s=first[name][0], peak_memory_growth_bytes=max(peaks) if peaks else None,
                             image=timed[-1][2])
    return results


def measure_config(sides: dict, adapter: bool, compiled: bool, features, args, device) -> dict:
    calls = {name: (lambda side=side: side(features if adapter else None, args.resolution, args.steps))
             for name, side in sides.items()}
    results = alternate(calls, args.repeats, device)
    row = dict(adapter=adapter, compiled=compiled, sides=results)
    for r in results.values():
        r["it_per_s"] = args.steps / r["s_per_image"]
        r["image_std"] = float(r["image"].std())  # a flat image would hide any difference
    if "diffusers" in results:
        row["max_pixel_diff_vs_diffusers"] = int(np.abs(results["ours"]["image"] - results["diffusers"]["image"]).max())
        row["speedup_vs_diffusers"] = results["diffusers"]["s_per_image"] / results["ours"]["s_per_image"]
    if adapter and not compiled and device.type == "cuda":
        reference = sides["ours"](features, args.resolution, args.steps, attention=decoupled_attention_reference)
        row["max_pixel_diff_fused_vs_reference_attention"] = int(
            np.abs(results["ours"]["image"] - np.asarray(reference).astype(np.int16)).max())
    for r in results.values():
        del r["image"]
    return row


def format_row(row: dict) -> str:
    name = ("adapter" if row["adapter"] else "text only") + (", compiled" if row["compiled"] else "")
    cells = []
    for side in ("ours", "diffusers"):
        r = row["sides"].get(side)
        if r is None:
            cells.append(f"{'—':>26}")
            continue
        peak = "n/a" if r["peak_memory_growth_bytes"] is None else f"{r['peak_memory_growth_bytes'] / 2**20:.0f}"
        cells.append(f"{r['s_per_image']:8.3f} {r['it_per_s']:7.2f} {peak:>9}")
    line = f"{name:20} | " + " | ".join(cells)
    if "speedup_vs_diffusers" in row:
        line += f" | {row['speedup_vs_diffusers']:5.2f}×  {row['max_pixel_diff_vs_diffusers']:3d}"
    if "max_pixel_diff_fused_vs_reference_attention" in row:
        line += f" | fused vs reference attention {row['max_pixel_diff_fused_vs_reference_attention']}"
    return line


def loading_figures(weights: Path, workdir: Path, repeats: int, with_diffusers: bool, full_size: bool) -> dict:
    """benchmarks.loading's measurement (a fresh process per format) of these weights in every
    format it has: the rows for diffusers' folder need that folder, the diffusers row diffusers, and
    the single files (which hold no configs: SD1.5's are assumed) full-size weights."""
    loading.make_files(workdir, weights)
    rows = {}
    for label, (name, loader) in loading.FORMATS.items():
        if ((name == "diffusers" and not weights.is_dir()) or (loader == "diffusers" and not with_diffusers)
                or (name.startswith("single-") and not full_size)):
            continue
        rows[label] = loading.measure(weights if name == "diffusers" else workdir / name, loader, repeats)
        r = rows[label]
        print(f"  {label:38} load {r['load_s']:6.2f} s, +touch {r['touch_s']:6.2f} s, "
              f"peak growth {r['growth'] / 1e9:5.2f} GB", flush=True)
    return rows


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ipadapter_min.benchmarks.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="model size (default: full)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: 512 on CUDA, 256 on the CPU)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: 30 on CUDA, 4 on the CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--repeats", type=int, help="timed calls per side and configuration (default: 3 on CUDA, 2 on the CPU)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--compile", action="store_true", help="also time both sides with torch.compile on the UNet")
    p.add_argument("--eager-convolutions", action="store_true",
                   help="ours without ipadapter_min.models.cpu_convolutions (the sample command's --packed-convolutions; CPU fp32 only)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/ipadapter_min_pipeline_bench"),
                   help="where the random weights are written, one folder per --size (default: %(default)s)")
    p.add_argument("--loading-repeats", type=int, default=2,
                   help="fresh processes per format for the loading figures, best reported; 0 skips them (default 2)")
    p.add_argument("--out", type=Path, help="JSON output (default: results-pipeline-<device>.json in the current folder)")
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    args.device = args.device or ("cuda" if cuda else "cpu")
    if cuda and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    for name, default in (("resolution", 512 if cuda else 256), ("steps", 30 if cuda else 4),
                          ("dtype", "fp16" if cuda else "fp32"), ("repeats", 3 if cuda else 2)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.resolution <= 0 or args.resolution % 8:
        p.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.steps < 1 or args.repeats < 1 or args.loading_repeats < 0:
        p.error("--steps and --repeats must be at least 1, --loading-repeats at least 0")
    return args


def diffusers_version() -> str | None:
    try:
        import diffusers
        import transformers  # noqa: F401  (its text encoder)
    except ImportError:
        return None
    return diffusers.__version__


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent)
    except OSError:  # no git
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cuda = device.type == "cuda"
    device_name = (torch.cuda.get_device_name(device) if cuda
                   else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    version = diffusers_version()
    tokenizer, tokenizer_note = make_tokenizer()
    slug = re.sub(r"[^a-z0-9]+", "-", ("cpu" if not cuda else device_name).lower()).strip("-")
    out = args.out or Path(f"results-pipeline-{slug}.json")  # in the current folder, not inside the package
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir / args.size
    t_start = time.perf_counter()

    print(f"device: {device_name}; torch {torch.__version__}; diffusers {version or 'not installed'}")
    print(f"SD1.5 {args.size} size, random weights; {args.resolution}×{args.resolution}, {args.steps} DDIM steps, "
          f"CFG {GUIDANCE}, {args.dtype}, 1 image; adapter: base (4 tokens), λ = {SCALE}")
    print(f"per configuration: 1 warm-up + {args.repeats} timed calls per side, alternating; tokenizer: {tokenizer_note}")
    if not cuda:
        print("NO CUDA DEVICE: CPU seconds per image (by default at 256 px, 4 steps, fp32); the GPU figures "
              "(it/s at 512², fp16) need a GPU.")
    result = dict(
        benchmark="SD1.5 text-to-image end to end, ours vs diffusers, same weights, one process",
        date=_dt.datetime.now().isoformat(timespec="seconds"), commit=git_commit(),
        command=" ".join(["python -m ipadapter_min.benchmarks.pipeline", *(sys.argv[1:] if argv is None else argv)]),
        device=device_name, cuda=cuda, torch=torch.__version__, python=sys.version.split()[0],
        diffusers=version or "not installed", size=args.size, resolution=args.resolution, steps=args.steps,
        dtype=args.dtype, guidance=GUIDANCE, sampler="ddim", seed=SEED, adapter="base, 4 tokens, random weights",
        scale=SCALE, repeats=args.repeats, tokenizer=tokenizer_note,
        ours_convolutions="eager" if args.eager_convolutions else "ipadapter_min.models.cpu_convolutions (CPU fp32)",
        notes=["s_per_image: the whole call, prompt to PIL image; median of the timed calls after one warm-up",
               "it_per_s: steps / s_per_image (text encoder and VAE decode included)",
               "peak_memory_growth_bytes: over one call, weights loaded before (CUDA: max_memory_allocated; "
               "CPU: peak RSS reset before each call)",
               "diffusers gets our token ids and runs its own text encoder in the timed call; the image prompt "
               "is given as encoder features to both (ip_adapter_image_embeds): the image encoder is not timed"],
        runs=[], loading=None)

    def write():
        result["wall_s"] = time.perf_counter() - t_start
        text = json.dumps(result, indent=1)
        write_atomically(out, lambda tmp: Path(tmp).write_text(text), overwrite=True)

    weights, adapter = make_weights(workdir, SIZES[args.size], version is not None)
    result["weights"] = str(weights)
    if not Path("/proc/self/clear_refs").exists():
        result["loading"] = "skipped: benchmarks.loading reads peak memory from /proc/self/clear_refs (Linux)"
    elif args.loading_repeats:
        print(f"\nloading ({loading.__name__}, best of {args.loading_repeats} fresh processes per format):")
        result["loading"] = loading_figures(weights, workdir, args.loading_repeats, version is not None,
                                            args.size == "full")
    else:
        result["loading"] = "skipped (--loading-repeats 0)"
    write()

    sides = {"ours": Ours(weights, adapter, device, dtype, tokenizer, packing=not args.eager_convolutions)}
    if version is not None:
        sides["diffusers"] = Diffusers(weights, adapter, device, dtype, tokenizer)
    result["weight_bytes"] = {name: side.weight_bytes() for name, side in sides.items()}
    g = torch.Generator().manual_seed(SEED + 1)
    features = torch.randn(2, 1, 1024, generator=g).to(device, dtype)  # (negative, positive) image embeddings

    columns = f"{'s/img':>8} {'it/s':>7} {'peak MiB':>9}"
    header = f"{'configuration':20} | {columns} | {columns} | speedup max|Δpx|"
    print(f"\n{'':20} | {'ours':^26} | {'diffusers':^26} |\n{header}\n{'-' * len(header)}")
    for use_adapter in (False, True):
        if use_adapter and "diffusers" in sides:
            sides["diffusers"].load_adapter()
        for compiled in (False, True) if args.compile else (False,):
            if compiled:
                torch._dynamo.reset()  # each compiled configuration pays its own compile in its first call
            for side in sides.values():
                side.compile(compiled)
            row = measure_config(sides, use_adapter, compiled, features, args, device)
            result["runs"].append(row)
            print(format_row(row), flush=True)
            write()
    print(f"\nwrote {out}")
    if not args.no_plot:
        _plot(result, out.with_suffix(".png"))
    return result


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot")
        return
    runs, loads = result["runs"], result["loading"] if isinstance(result["loading"], dict) else {}
    fig, axes = plt.subplots(1, 2 if loads else 1, figsize=(12 if loads else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    labels = [("adapter" if r["adapter"] else "text only") + ("\ncompiled" if r["compiled"] else "") for r in runs]
    names = list(runs[0]["sides"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(runs))]
        ax.bar(xs, [r["sides"][name]["s_per_image"] for r in runs], width, label=name)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(labels)
    ax.set_ylabel("s per image (median)")
    ax.set_title(f"{result['resolution']}², {result['steps']} steps, {result['dtype']} — {result['device']}", fontsize=8)
    ax.legend()
    if loads:
        ax = axes[0][1]
        ax.barh(list(loads), [r["touch_s"] for r in loads.values()])
        ax.set_xlabel("s to load, every weight touched (best)")
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png"), overwrite=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
