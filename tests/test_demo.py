"""The demo world: its data, the resumable stage loop, and a smoke run of every training stage
(a few steps each) whose weights ``sample`` then loads, with and without an image prompt."""
from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from ipadapter_min import demo
from ipadapter_min.cli import sample
from ipadapter_min.demo import __main__ as demo_cli
from ipadapter_min.demo.stage import run_stage, schedule
from ipadapter_min.demo.world import ATTRIBUTES, POSITION_WORDS, full_caption, render, scenes, training_caption
from ipadapter_min.models.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_world_is_deterministic_and_captions_name_the_attributes():
    first, again = scenes(50, seed=3), scenes(50, seed=3)
    assert first == again and first != scenes(50, seed=4)
    assert render(first[0], 7).tobytes() == render(first[0], 7).tobytes()
    assert render(first[0], 7).tobytes() != render(first[0], 8).tobytes()  # jitter
    for scene in first:
        words = full_caption(scene)
        assert all(scene.attribute(a) in words for a in ("color", "shape", "size", "background"))
        assert POSITION_WORDS[scene.position] in words and scene.color != scene.background
    rng = random.Random(0)
    captions = [training_caption(s, rng) for s in scenes(2000, seed=5)]
    empty = sum(c == "" for c in captions) / len(captions)
    assert 0.07 < empty < 0.13  # 10% empty: the unconditional branch for guidance
    assert all(len(Tokenizer().encode(c)) < 30 for c in captions)
    assert {len(v) for v in ATTRIBUTES.values()} == {12, 8, 3, 5}


def test_stage_resumes_bit_for_bit(tmp_path):
    """Stopped after 3 of 6 steps and run again: the weights of 6 straight steps."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 3)

    def loss_of(model):
        return lambda step: model(torch.randn(8, 4, generator=torch.Generator().manual_seed(step))).pow(2).mean()

    straight = make()
    run_stage("t", tmp_path / "a", {"m": straight}, loss_of(straight), 6, schedule(1e-2, 6, warmup=2), progress=False)
    first = make()
    run_stage("t", tmp_path / "b", {"m": first}, loss_of(first), 3, schedule(1e-2, 6, warmup=2), save_every=3,
              progress=False)
    resumed = make()
    run_stage("t", tmp_path / "b", {"m": resumed}, loss_of(resumed), 6, schedule(1e-2, 6, warmup=2), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    assert not torch.equal(make().weight, resumed.weight)
    assert (tmp_path / "b" / "log.csv").read_text().count("\n") == 7  # header + 6 steps, none twice


@pytest.mark.slow  # trains every demo stage
def test_smoke_run_of_every_stage_gives_weights_sample_loads(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    assert demo_cli.main(["train", "--out", str(out), "--smoke", "--no-progress"]) == 0
    weights = out / "weights"
    names = sorted(p.name for p in weights.iterdir())
    assert names == ["clip_text_projection.safetensors", "image_encoder.safetensors", "ip_adapter.safetensors",
                     "judge.safetensors", "text_encoder.safetensors", "unet.safetensors", "vae.safetensors"]
    table = load_file(weights / "text_encoder.safetensors")["text_encoder.embeddings.token_embedding.weight"]
    assert 30 < int((table.abs().sum(1) > 0).sum()) < 60  # only the world's words keep their rows
    reference = out / "adapter" / "data" / "000001.png"
    common = ["--model", str(weights), "--width", "64", "--height", "64", "--steps", "4", "--seed", "0", "--no-progress"]
    assert sample.main([*common, "--prompt", "a red circle", "--out", str(tmp_path / "text.png")]) == 0
    assert sample.main([*common, "--ip-adapter", str(weights / "ip_adapter.safetensors"), "--image-encoder",
                        str(weights / "image_encoder.safetensors"), "--image", str(reference),
                        "--out", str(tmp_path / "image.png")]) == 0
    assert (tmp_path / "text.png").is_file() and (tmp_path / "image.png").is_file()

    # the UNet's snapshot, a learning curve's point
    snapshot = out / "unet" / "snapshots" / "unet-3.safetensors"
    assert demo_cli.main(["evaluate", "--weights", str(weights), "--unet", str(snapshot), "--text-only",
                          "--references", "2", "--steps", "2", "--no-progress", "--json", str(tmp_path / "curve.json")]) == 0
    import json
    assert set(json.loads((tmp_path / "curve.json").read_text())) == {"references", "steps", "guidance", "text_to_image"}

    # the judged evaluation runs end to end (its figures mean nothing after a smoke run)
    assert demo_cli.main(["evaluate", "--weights", str(weights), "--references", "2", "--steps", "2", "--no-progress",
                          "--pictures", str(tmp_path / "pictures"), "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["image_prompt"]) == {"lambda 0.0", "lambda 0.5", "lambda 1.0"}
    assert set(report["clip_scores"]["lambda 1.0"]) == {"clip_i", "clip_t"}
    assert {p.name for p in (tmp_path / "pictures").iterdir()} == {"demo-lambda-sweep.png", "demo-text-and-image.png"}

    # without --model, sample takes the demo weights (here: the smoke run's) at 64×64, and for
    # --image alone the demo's adapter and encoder
    monkeypatch.setattr(demo, "WEIGHTS", weights)
    monkeypatch.setattr(demo, "ADAPTER", weights / "ip_adapter.safetensors")
    monkeypatch.setattr(demo, "IMAGE_ENCODER", weights / "image_encoder.safetensors")
    assert sample.main(["--prompt", "a red circle", "--steps", "4", "--seed", "0", "--no-progress",
                        "--out", str(tmp_path / "default.png")]) == 0
    assert sample.main(["--image", str(reference), "--steps", "4", "--no-progress",
                        "--out", str(tmp_path / "default-image.png")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "default.png").size == (64, 64)
    assert Image.open(tmp_path / "default.png").tobytes() == Image.open(tmp_path / "text.png").tobytes()
    monkeypatch.setattr(demo, "WEIGHTS", tmp_path / "nowhere")
    assert sample.main(["--prompt", "x", "--out", str(tmp_path / "none.png")]) == 2


def test_evaluate_refuses_a_unet_file_that_is_not_one(capsys):
    vae = demo.WEIGHTS / "vae.safetensors"
    assert demo_cli.main(["evaluate", "--unet", str(vae), "--text-only", "--references", "1", "--steps", "1",
                          "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(vae) in err, err
