"""``python -m ipadapter_min.train`` end to end on a small SD1.5-structured model (every
cross-attention layer, a tenth of the width) at 64 px: the files it writes, bit-exact resume,
Ctrl-C, --cache, DDP under torchrun against one process, mixed precision against fp32, the
reference's transforms, and one-line errors for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ipadapter_min.cli import train as train_module
from ipadapter_min.loading.ip_adapter import load_image_encoder, load_ip_adapter
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.training.recipe import FrozenEncoders, variant_spec
from ipadapter_min.training.data import PairDataset, RankBatches, read_pairs, vae_pixels
from reference_models import sample_images

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Six images of various shapes and sizes with captions, as the official JSON."""
    folder = tmp_path_factory.mktemp("train_data")
    entries = []
    for i, image in enumerate(sample_images()):
        image.save(folder / f"{i}.png")
        entries.append({"image_file": f"{i}.png", "text": f"a pattern of waves number {i}"})
    (folder / "data.json").write_text(json.dumps(entries))
    return folder / "data.json"


@pytest.fixture(scope="module")
def base_args(small, small_vit_h_folder, data):
    return ["--model", str(small.folder), "--image-encoder", str(small_vit_h_folder), "--data", str(data),
            "--resolution", "64", "--batch-size", "2", "--seed", "3", "--no-progress"]


def run(args: list[str], out: Path, *extra: str) -> int:
    return train_module.main([*args, "--out", str(out), *extra])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "ip-adapter.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# Adam's first updates are about ±lr wherever |gradient| ≫ its eps, whatever the gradient's size,
# so runs that differ only in summation order (another batch split, another process count) still
# differ by a fraction of lr = 1e-4 in weights whose gradient is near zero. Runs that saw other
# samples or draws differ by several lr (4e-4 measured).
SAME_UP_TO_ROUNDING = 2e-5


def losses(out: Path) -> list[float]:
    return [float(r["loss"]) for r in log_rows(out)]


def assert_same_run(ours: Path, reference: Path, what: str) -> None:
    """The same samples and draws (logged losses equal to fp32 rounding) and the same weights up to
    Adam's amplification of rounding (SAME_UP_TO_ROUNDING)."""
    loss_err = max(abs(a - b) / b for a, b in zip(losses(ours), losses(reference), strict=True))
    difference = max_difference(weights(ours), weights(reference))
    print(f"{what}: losses rel ≤ {loss_err:.1e}; max abs weight difference {difference:.1e}")
    assert loss_err <= 1e-6
    assert difference <= SAME_UP_TO_ROUNDING


def log_rows(out: Path) -> list[dict]:
    import csv
    return list(csv.DictReader((out / "log.csv").open()))


@pytest.fixture(scope="module")
def four_steps(base_args, tmp_path_factory) -> Path:
    """The uninterrupted run the others are compared with: 4 steps, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert run(base_args, out, "--steps", "4", "--save-every", "2") == 0
    return out


def test_writes_release_files_checkpoints_and_log(four_steps, small, base_args, tmp_path):
    out = four_steps
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "ip-adapter.bin",
                                                     "ip-adapter.safetensors", "log.csv"]
    rows = log_rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and all(float(r["loss"]) > 0 for r in rows)
    unet = load_sd15(small.folder)["unet"]
    trained = load_ip_adapter(out / "ip-adapter.bin", widths=unet.cross_attention_widths())
    assert trained.spec.variant == "base"
    # --steps 0 writes the initial adapter: image key/value projections copied from the text ones
    assert run(base_args, tmp_path / "init", "--steps", "0") == 0
    initial = load_ip_adapter(tmp_path / "init" / "ip-adapter.safetensors", widths=unet.cross_attention_widths())
    for layer, attn in zip(initial.ip_layers, unet.cross_attention_layers(), strict=True):
        assert torch.equal(layer.to_k_ip.weight, attn.to_k.weight) and torch.equal(layer.to_v_ip.weight, attn.to_v.weight)
    # training moved every trained tensor away from the initial adapter
    moved = {k: (v - initial.state_dict()[k]).abs().max().item() for k, v in trained.state_dict().items()}
    assert min(moved.values()) > 0, min(moved, key=moved.get)
    # the checkpoint's copy of the final weights is the final file's
    assert max_difference(weights(out / "checkpoint-4"), weights(out)) == 0


def test_resume_goes_on_bit_for_bit(four_steps, base_args, tmp_path):
    """Stop after 2 steps, resume to 4: the same weights, optimizer state and log as the straight run."""
    out = tmp_path / "resumed"
    assert run(base_args, out, "--steps", "2", "--save-every", "2") == 0
    (out / "ip-adapter.safetensors").unlink()  # what a run stopped at step 2 of 4 would have
    (out / "ip-adapter.bin").unlink()
    assert run(base_args, out, "--steps", "4", "--save-every", "2", "--resume", str(out)) == 0
    assert max_difference(weights(out), weights(four_steps)) == 0
    ours = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    theirs = torch.load(four_steps / "checkpoint-4" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(ours[i][k], theirs[i][k]) for i in theirs for k in theirs[i])
    assert [r["loss"] for r in log_rows(out)] == [r["loss"] for r in log_rows(four_steps)]


def test_ctrl_c_saves_a_checkpoint_to_resume_from(four_steps, base_args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "interrupted"
    draw, calls = train_module.StepDraws.draw, []

    def interrupt_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # micro-steps 0..2 done: steps 1..3 complete
            raise KeyboardInterrupt
        return draw(*args, **kwargs)

    monkeypatch.setattr(train_module.StepDraws, "draw", interrupt_at_step_3)
    assert run(base_args, out, "--steps", "4", "--save-every", "2") == 130
    assert "continue with --resume" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-3", "log.csv"]
    monkeypatch.setattr(train_module.StepDraws, "draw", draw)
    # resuming from an earlier checkpoint would overwrite checkpoint-3: refused before any work
    assert run(base_args, out, "--steps", "4", "--save-every", "2", "--resume", str(out / "checkpoint-2")) == 2
    assert "checkpoint-3 is later than --resume" in capsys.readouterr().err
    assert run(base_args, out, "--steps", "4", "--save-every", "2", "--resume", str(out)) == 0  # the latest: 3
    assert max_difference(weights(out), weights(four_steps)) == 0


def test_gradient_accumulation_matches_a_bigger_batch(base_args, tmp_path):
    """--batch-size 1 --grad-accum 2 is --batch-size 2: the same samples and draws, loss averaged."""
    big = tmp_path / "big"
    accumulated = tmp_path / "accumulated"
    assert run(base_args, big, "--steps", "2") == 0
    assert run([*base_args, "--batch-size", "1", "--grad-accum", "2"], accumulated, "--steps", "2") == 0
    assert_same_run(accumulated, big, "batch 1 × 2 accumulated vs batch 2")


def test_cache_trains_the_same_adapter(four_steps, base_args, tmp_path, capsys):
    """--cache holds the VAE's mean and std and the image features: every step still draws its
    own latent sample, so the result is training from images (up to rounding: the encoders see
    other batch groupings when caching)."""
    import time
    out, cache = tmp_path / "cached", tmp_path / "cache"
    start = time.perf_counter()
    assert run(base_args, out, "--steps", "4", "--save-every", "2", "--cache", str(cache)) == 0
    first = time.perf_counter() - start
    assert len(list(cache.glob("*.safetensors"))) == 6 and (cache / "cache.json").is_file()
    assert_same_run(out, four_steps, "cached vs from images")
    steps_cached = [float(r["samples_per_second"]) for r in log_rows(out)]
    steps_images = [float(r["samples_per_second"]) for r in log_rows(four_steps)]
    print(f"samples/s cached {sum(steps_cached) / 4:.2f} vs from images {sum(steps_images) / 4:.2f} "
          f"(the run with caching took {first:.1f} s)")
    # a second run reuses the cache; a cache made for other inputs is refused
    assert run(base_args, tmp_path / "again", "--steps", "1", "--cache", str(cache)) == 0
    assert run([*base_args, "--resolution", "32"], tmp_path / "other", "--steps", "1", "--cache", str(cache)) == 2
    assert "was made for other inputs (differs in: resolution)" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_follows_fp32(precision, four_steps, base_args, tmp_path):
    """Frozen encoders in half precision, the UNet under autocast: the first step's loss within
    half precision's reach of fp32's (bf16 keeps 8 bits: ~0.4% per rounding; measured below 1%)."""
    out = tmp_path / precision
    assert run(base_args, out, "--steps", "1", "--mixed-precision", precision) == 0
    half, full = float(log_rows(out)[0]["loss"]), float(log_rows(four_steps)[0]["loss"])
    print(f"{precision} first-step loss {half:.5f} vs fp32 {full:.5f} (rel {abs(half - full) / full:.1e})")
    assert abs(half - full) <= 0.02 * full
    assert all(torch.isfinite(v).all() for v in weights(out).values())


def test_plus_and_full_face_train_with_pixel_space_drops(small, small_vit_h_folder, base_args, tmp_path):
    """plus / full-face drop an image as tutorial_train_plus.py does: the encoder's features of a
    zero pixel tensor, not zero features."""
    encoder = load_image_encoder(small_vit_h_folder)
    for variant in ("plus", "full-face"):
        frozen = FrozenEncoders(None, None, encoder, variant_spec(variant, encoder.config))
        assert torch.equal(frozen.dropped_image_features(), encoder.penultimate(torch.zeros(1, 3, 224, 224)))
        assert run(base_args, tmp_path / variant, "--steps", "1", "--variant", variant) == 0
        unet = load_sd15(small.folder)["unet"]
        assert load_ip_adapter(tmp_path / variant / "ip-adapter.bin", widths=unet.cross_attention_widths()
                               ).spec.variant == ("plus" if variant == "plus" else "full-face")


def test_damaged_image_mid_run_is_skipped_and_counted(base_args, data, tmp_path, capsys):
    """A file whose header reads but whose pixels do not: found when read, skipped, reported."""
    folder = tmp_path / "data"
    folder.mkdir()
    entries = json.loads(data.read_text())
    for entry in entries:
        (folder / entry["image_file"]).write_bytes((data.parent / entry["image_file"]).read_bytes())
    damaged = folder / entries[0]["image_file"]
    damaged.write_bytes(damaged.read_bytes()[:200])  # header intact, pixel data cut
    (folder / "data.json").write_text(json.dumps(entries))
    args = [a if a != str(data) else str(folder / "data.json") for a in base_args]
    assert run(args, tmp_path / "out", "--steps", "3") == 0  # 6 samples: each image once
    assert "skipped 1 damaged image" in capsys.readouterr().err
    assert log_rows(tmp_path / "out")[-1]["skipped_images"] == "1"


def test_vae_transform_matches_torchvision():
    """The reference's Resize(R, bilinear) → CenterCrop(R) → ToTensor → Normalize([0.5], [0.5])."""
    from torchvision import transforms
    reference = transforms.Compose([transforms.Resize(64, interpolation=transforms.InterpolationMode.BILINEAR),
                                    transforms.CenterCrop(64), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    for image in sample_images():
        ours, theirs = vae_pixels(image, 64), reference(image)
        assert ours.shape == theirs.shape == (3, 64, 64)
        assert (ours - theirs).abs().max() <= 1e-6, image.size


def test_folder_of_captioned_images(data, tmp_path):
    for i, image in enumerate(sample_images()[:3]):
        image.save(tmp_path / f"img{i}.jpg")
        (tmp_path / f"img{i}.txt").write_text(f"caption {i}\n")
    pairs = read_pairs(tmp_path)
    assert [(p.image.name, p.text) for p in pairs] == [(f"img{i}.jpg", f"caption {i}") for i in range(3)]
    assert PairDataset(pairs, 64)[1]["pixels"].shape == (3, 64, 64)
    (tmp_path / "img1.txt").unlink()
    with pytest.raises(ValueError, match="image img1.jpg has no caption file img1.txt"):
        read_pairs(tmp_path)


def test_sampler_shards_the_same_global_batches():
    """Two processes with batch B read, step by step, what one process with batch 2B reads."""
    one = list(RankBatches(7, 4, 0, 1, seed=5, start_micro_step=0, micro_steps=5))
    two = [list(RankBatches(7, 2, r, 2, seed=5, start_micro_step=0, micro_steps=5)) for r in range(2)]
    assert [a + b for a, b in zip(*two)] == one
    assert sorted(sum(one, [])[:7]) == list(range(7))  # an epoch is a permutation
    assert list(RankBatches(7, 4, 0, 1, seed=5, start_micro_step=2, micro_steps=3)) == one[2:]


@pytest.mark.slow  # torchrun, two processes
def test_two_processes_under_torchrun_match_one(four_steps, base_args, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, batch 1 each) against one process with batch 2: DDP
    averages the two gradients where one process averages two samples' losses: the same run up
    to summation order."""
    out = tmp_path / "ddp"
    one = tmp_path / "one"
    assert run(base_args, one, "--steps", "2") == 0
    args = [a if a != "2" else "1" for a in base_args]  # --batch-size 1 per process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29517", "-m", "ipadapter_min.train", *args, "--steps", "2",
                             "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(out, one, "2 processes × batch 1 vs 1 process × batch 2")
    assert [r["step"] for r in log_rows(out)] == ["1", "2"]


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.append({"text": "no file"}), 'entry 6 has no "image_file" string'),
    (lambda d: d.append({"image_file": "missing.png", "text": "x"}), "entry 6: image .*missing.png not found"),
    (lambda d: d.append({"image_file": "not_an_image.png", "text": "x"}), "not_an_image.png is not a readable image"),
])
def test_bad_data_gets_one_line_errors(edit, expected, base_args, data, tmp_path, capsys):
    entries = json.loads(data.read_text())
    edit(entries)
    (data.parent / "not_an_image.png").write_text("hello")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(entries))
    args = [a if a != str(data) else str(bad) for a in base_args]
    assert run([*args, "--data-root", str(data.parent)], tmp_path / "out", "--steps", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    import re
    assert re.search(expected, err), err
    assert not (tmp_path / "out").exists()


def test_bad_options_get_one_line_errors(base_args, small, four_steps, tmp_path, capsys):
    cases = [
        ([*base_args, "--resolution", "60"], "argument --resolution: 60 is not a multiple of 8"),
        (base_args, f"--out {four_steps} already exists"),
        ([*base_args, "--init", str(four_steps / "ip-adapter.bin"), "--variant", "plus"],
         "is a base adapter, not --variant plus"),
        ([*base_args, "--resume", str(four_steps), "--seed", "4"], "settings differ from the checkpoint's (seed 3 → 4)"),
    ]
    for args, expected in cases:
        out = four_steps if expected.startswith("--out") else tmp_path / "out"
        try:
            code = run(args, out, "--steps", "5")
        except SystemExit as exit:  # argparse's own errors, one line too
            code = exit.code
        assert code == 2, expected
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    # an image encoder of other widths than the variant's
    tiny_encoder = tmp_path / "tiny_encoder"
    from ipadapter_min.models.configs import ImageEncoderConfig
    from reference_models import random_hf_model
    random_hf_model(ImageEncoderConfig.tiny()).save_pretrained(tiny_encoder)
    args = [a if a != base_args[3] else str(tiny_encoder) for a in base_args]
    assert run([*args, "--variant", "plus"], tmp_path / "out", "--steps", "1") == 2
    assert "--variant plus with --image-encoder" in capsys.readouterr().err
