"""How fast, and in how much memory, SD1.5 loads: ours from every format, beside diffusers
loading the same weights from its own folder.

    python -m ipadapter_min.benchmarks.loading        # makes full-size random weights once in --workdir
    python -m ipadapter_min.benchmarks.loading --folder path/to/stable-diffusion-v1-5 --repeats 5

Files measured (made from the diffusers folder the first time, then reused):

  diffusers folder    unet/, vae/, text_encoder/ as diffusers writes them (fp32 safetensors)
  converted fp32/fp16 ``python -m weights_convert sd15`` of that folder (with --dtype fp16)
  single file fp16    the original single-file layout (model.diffusion_model.*, ...), .safetensors
  ckpt fp16           the same as a pickle with a state_dict wrapper

Every load runs in a fresh process and is timed twice: ``load`` (the call returns; our
memory-mapped weights are not read yet) and ``+touch`` (every parameter summed once, so every
byte is in memory: the fair comparison). Peak memory is the growth of the process's peak RSS
over the load and touch, next to the size of the weights in the target dtype. Each figure is
the best of ``--repeats`` runs. The page cache is warm (the files were just written or read),
as for a user who loads the same model again.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ..formats.files import write_atomically

FORMATS = {  # label → (file name in the work folder, loader)
    "diffusers folder → fp32 (diffusers)": ("diffusers", "diffusers"),
    "diffusers folder → fp32 (ours)": ("diffusers", "ours"),
    "converted fp32 → fp32 (ours)": ("converted-fp32.safetensors", "ours"),
    "converted fp16 → fp16 (ours)": ("converted-fp16.safetensors", "ours-fp16"),
    "converted fp16 → fp32 (ours)": ("converted-fp16.safetensors", "ours"),
    "single file fp16 → fp32 (ours)": ("single-fp16.safetensors", "ours"),
    "ckpt fp16 → fp32 (ours)": ("single-fp16.ckpt", "ours"),
}

# Runs in a fresh interpreter: argv = path, loader. Prints {"load_s", "touch_s", "growth", "weights"}.
MEASURE = r"""
import json, sys, time, torch
path, loader = sys.argv[1], sys.argv[2]

def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

if loader == "diffusers":
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    def load():
        return [UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
                AutoencoderKL.from_pretrained(path, subfolder="vae"),
                CLIPTextModel.from_pretrained(path, subfolder="text_encoder")]
else:
    from ipadapter_min.loading.sd15 import load_sd15
    dtype = torch.float16 if loader == "ours-fp16" else torch.float32
    def load():
        return list(load_sd15(path, dtype=dtype).values())

float(torch.ones(4096).sum())
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
start = time.perf_counter()
models = load()
loaded = time.perf_counter()
params = [p for m in models for p in m.parameters()]
float(sum(p.sum() for p in params))
touched = time.perf_counter()
print(json.dumps({"load_s": loaded - start, "touch_s": touched - start, "growth": status("VmHWM:") - before,
                  "weights": sum(p.numel() * p.element_size() for p in params)}))
"""


def make_files(workdir: Path, folder: Path | None) -> Path:
    """The diffusers folder (random full-size SD1.5 weights unless ``folder`` is given) and the
    other formats made from it; existing files are reused."""
    import torch
    from safetensors.torch import save_file

    from ..formats.sd15 import SINGLE_FILE_PREFIXES, read_sd15

    workdir.mkdir(parents=True, exist_ok=True)
    if folder is None:
        folder = workdir / "diffusers"
        if not (folder / "unet").exists():
            make_random_diffusers_folder(folder)
    for name, extra in (("converted-fp32.safetensors", []), ("converted-fp16.safetensors", ["--dtype", "fp16"])):
        if not (workdir / name).exists():
            # the conversion command, as a user runs it (weights_convert imports this package)
            command = [sys.executable, "-m", "weights_convert", "sd15", str(folder), "-o", str(workdir / name), *extra]
            if subprocess.run(command).returncode != 0:
                raise SystemExit(2)  # the converter has said why
    if not (workdir / "single-fp16.ckpt").exists():
        ours_to_original = {ours: original for original, ours in reversed(SINGLE_FILE_PREFIXES)}
        checkpoint, _ = read_sd15(folder)
        single = {}
        for key, value in checkpoint.tensors.items():
            part = key.split(".")[0] + "."
            single[ours_to_original[part] + key[len(part):]] = value.half()
        save_file(single, workdir / "single-fp16.safetensors")
        torch.save({"state_dict": single}, workdir / "single-fp16.ckpt")
    return folder


def make_random_diffusers_folder(folder: Path) -> None:
    """SD1.5's architecture with random weights, written by diffusers and transformers themselves."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    print(f"writing random full-size SD1.5 weights to {folder} (once) ...", flush=True)
    UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).save_pretrained(folder / "unet")
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                  sample_size=512).save_pretrained(folder / "vae")
    text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    CLIPTextModel(text).save_pretrained(folder / "text_encoder")


def measure(path: Path, loader: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        result = subprocess.run([sys.executable, "-c", MEASURE, str(path), loader], capture_output=True, text=True)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            raise SystemExit(f"error: loading {path} with {loader} failed: {lines[-1] if lines else result.returncode}")
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return {key: min(run[key] for run in runs) for key in runs[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipadapter_min.benchmarks.loading", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="a diffusers SD1.5 folder (default: random weights in --workdir)")
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/loading-files"),
                        help="where the measured files are written (~13 GB; default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per format; the best is reported")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        print("error: this benchmark reads peak memory from /proc (Linux only)", file=sys.stderr)
        return 2
    try:
        import diffusers  # noqa: F401  (the comparison needs it: pip install -e ".[test]")
    except ImportError:
        print("error: diffusers is not installed; it comes with the [test] extra", file=sys.stderr)
        return 2
    folder = make_files(args.workdir, args.folder)
    rows = {}
    print(f"{'format':38} {'load s':>7} {'+touch s':>9} {'peak growth GB':>15} {'weights GB':>11} {'ratio':>6}")
    for label, (name, loader) in FORMATS.items():
        path = folder if name == "diffusers" else args.workdir / name
        row = rows[label] = measure(path, loader, args.repeats)
        print(f"{label:38} {row['load_s']:7.2f} {row['touch_s']:9.2f} {row['growth'] / 1e9:15.2f} "
              f"{row['weights'] / 1e9:11.2f} {row['growth'] / row['weights']:6.2f}", flush=True)
    if args.out:
        text = json.dumps(rows, indent=1)
        write_atomically(args.out, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
