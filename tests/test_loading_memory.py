"""Loading is lean: the memory a load adds is at most 1.1× the weights in the target dtype, for
every reader (safetensors, zip pickle), whatever dtype the file holds.

Each load runs in a fresh process that resets its peak-RSS counter (/proc/self/clear_refs) just
before loading, touches every parameter afterwards (memory-mapped weights count once resident),
and reports the growth of the peak. The model is SD1.5-shaped with a narrower UNet (~140 M
parameters) so that the weights dwarf the interpreter's own allocations; the text encoder and VAE
are tiny. (The original single file needs SD1.5's exact shapes; it goes through the same two
readers as the files here.) A control load that keeps the whole file in memory while casting must exceed the bound,
so the measurement can see the difference.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reference_models as ref
from ipadapter_min.formats.files import read_state_dict
from weights_convert.__main__ import main as convert_main

pytestmark = pytest.mark.slow  # each load measured in a fresh process

BOUND = 1.1  # the goal: peak growth ≤ 1.1 × weights in the target dtype

MEASURE = """
import json, sys, torch
from ipadapter_min.formats.files import read_state_dict
from ipadapter_min.loading.sd15 import load_sd15

def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

path, dtype, how = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
float(torch.ones(4096, dtype=dtype).sum())  # the first CPU ops' own allocations, before measuring
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak RSS := current RSS
before = status("VmRSS:")
if how == "load":
    params = [p for m in load_sd15(path, dtype=dtype).values() for p in m.parameters()]
else:  # control: the whole file stays mapped and touched while every tensor is cast
    source = read_state_dict(path)
    params = [v.to(dtype) for v in source.values()]
total = sum(float(p.sum()) for p in params)  # every page resident, no temporaries
weights = sum(p.numel() * p.element_size() for p in params)
print(json.dumps({"growth": status("VmHWM:") - before, "weights": weights}))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same weights as a diffusers folder (fp32 safetensors), a diffusers folder of fp16
    pickles (.bin) and converted files (fp32 and fp16 safetensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    root = tmp_path_factory.mktemp("memory")
    width = ref.text_kwargs(ref.TINY)["hidden_size"]
    unet = UNet2DConditionModel(block_out_channels=(128, 256, 512, 512), cross_attention_dim=width,
                                attention_head_dim=8, sample_size=16)
    folder = ref.save_diffusers_folder(root / "diffusers", unet, AutoencoderKL(**ref.vae_kwargs(ref.TINY)),
                                       CLIPTextModel(CLIPTextConfig(**ref.text_kwargs(ref.TINY))))
    del unet
    pickles = shutil.copytree(folder, root / "pickles")
    for weights in pickles.glob("*/*.safetensors"):
        torch.save({k: v.half() for k, v in read_state_dict(weights).items()}, weights.with_suffix(".bin"))
        weights.unlink()
    paths = {"diffusers": folder, "pickles": pickles, "converted32": root / "converted32.safetensors",
             "converted16": root / "converted16.safetensors"}
    assert convert_main(["sd15", str(folder), "-o", str(paths["converted32"])]) == 0
    assert convert_main(["sd15", str(folder), "-o", str(paths["converted16"]), "--dtype", "fp16"]) == 0
    return paths


def measure(path: Path, dtype: str, how: str = "load") -> float:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path), dtype, how], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    ratio = numbers["growth"] / numbers["weights"]
    print(f"{path.name} → {dtype} ({how}): peak growth {numbers['growth'] / 2**20:.0f} MiB for "
          f"{numbers['weights'] / 2**20:.0f} MiB of weights ({ratio:.2f}×)")
    return ratio


@pytest.mark.parametrize("name,dtype", [
    ("diffusers", "float32"), ("diffusers", "float16"), ("pickles", "float32"), ("pickles", "float16"),
    ("converted32", "float32"), ("converted16", "float32"), ("converted16", "float16"), ("converted32", "bfloat16"),
])
def test_load_needs_at_most_the_weights(files, name, dtype):
    assert measure(files[name], dtype) <= BOUND


def test_the_measurement_sees_a_wasteful_load(files):
    """Casting fp16 → fp32 while the whole file stays resident costs 1.5×: the bound catches it."""
    assert measure(files["converted16"], "float32", how="control") > 1.3
