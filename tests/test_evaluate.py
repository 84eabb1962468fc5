"""CLIP-I / CLIP-T (clip_score) against transformers' CLIPModel on the same random weights, and
``python -m ipadapter_min.evaluate`` end to end on SD1.5's structure at a tenth of the width.

Tolerances: embeddings and cosines within 1e-5 of transformers (both fp32; measured ~2e-7);
the CSV's cosines within 1e-5 of a recomputation from the written PNGs; summary means equal
the CSV means to 1e-9 (the same floats, summed in another order)."""
from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ipadapter_min.cli import evaluate, sample
from ipadapter_min.training.clip_score import CLIPScorer, model_config
from ipadapter_min.models.configs import ImageEncoderConfig
from ipadapter_min.formats.files import CheckpointError
from ipadapter_min.formats.image_encoder import LAYER_RENAMES, transformers_to_open_clip
from ipadapter_min.formats.ip_adapter import detect_variant, save_official
from ipadapter_min.models.clip_preprocess import preprocess
from ipadapter_min.ip_adapter.adapter import IPAdapter
from ipadapter_min.ip_adapter.layers import CROSS_ATTENTION_WIDTHS
from ipadapter_min.training.data import read_coco
from reference_models import projection_shapes, randomize_, sample_images

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH, EMBED, LAYERS, IMAGE_SIZE, PATCH = 32, 16, 2, 32, 8
CAPTIONS = ["a red bicycle leaning on a wall", "two cats asleep on a sofa"]


def tiny_clip():
    """transformers' CLIPModel, tiny, random weights; QuickGELU and EOS pooling as OpenAI's CLIP."""
    from transformers import CLIPConfig, CLIPModel
    common = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=2,
                  hidden_act="quick_gelu")
    text = dict(common, vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    vision = dict(common, patch_size=PATCH, image_size=IMAGE_SIZE)
    return randomize_(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED)), 3).eval()


def open_clip_state(model) -> dict[str, torch.Tensor]:
    """transformers CLIPModel weights → open_clip.CLIP's state-dict keys: the vision tower through
    the project's image-encoder key map, the text tower renamed the same way."""
    hf = model.state_dict()
    vision = {k: v for k, v in hf.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
    config = ImageEncoderConfig(width=WIDTH, layers=LAYERS, heads=2, mlp_width=4 * WIDTH, patch_size=PATCH,
                                image_size=IMAGE_SIZE, proj_dim=EMBED, act="quick_gelu")
    state = transformers_to_open_clip(vision, config, "tiny CLIPModel")
    state.update({"token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
                  "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
                  "ln_final.weight": hf["text_model.final_layer_norm.weight"],
                  "ln_final.bias": hf["text_model.final_layer_norm.bias"],
                  "text_projection": hf["text_projection.weight"].t().contiguous(),
                  "logit_scale": hf["logit_scale"]})
    for i in range(LAYERS):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            state[f"{dst}attn.in_proj_{kind}"] = torch.cat([hf[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for hf_name, oc_name in LAYER_RENAMES:
                state[f"{dst}{oc_name}.{kind}"] = hf[f"{src}{hf_name}.{kind}"]
    return {k: v.contiguous() for k, v in state.items()}


OPEN_CLIP_CONFIG = {"embed_dim": EMBED, "quick_gelu": True,
                    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": LAYERS, "width": WIDTH, "patch_size": PATCH,
                                   "head_width": WIDTH // 2},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": WIDTH, "heads": 2,
                                 "layers": LAYERS}}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(transformers model, open_clip_pytorch_model.bin, config JSON) with the same weights."""
    folder = tmp_path_factory.mktemp("clip")
    model = tiny_clip()
    torch.save(open_clip_state(model), folder / "open_clip_pytorch_model.bin")
    (folder / "tiny.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    return model, folder / "open_clip_pytorch_model.bin", folder / "tiny.json"


def distinct_images() -> list[Image.Image]:
    """Images whose embeddings differ clearly even under random weights (which map most images
    close together): a structured one, noise, and two flat colours."""
    noise = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    return [sample_images()[0], Image.fromarray(noise), Image.new("RGB", (50, 40), (200, 30, 30)),
            Image.new("RGB", (40, 50), (20, 30, 230))]


@torch.no_grad()
def hf_image_embeddings(model, images) -> torch.Tensor:
    pixels = preprocess(list(images), size=IMAGE_SIZE)
    return F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)


@torch.no_grad()
def hf_text_embeddings(model, token_ids) -> torch.Tensor:
    return F.normalize(model.get_text_features(input_ids=token_ids).pooler_output, dim=-1)


def test_scores_match_transformers(clip):
    model, weights, config = clip
    scorer = CLIPScorer.from_file(weights, config)
    images = distinct_images()
    want_image = hf_image_embeddings(model, images)
    want_text = hf_text_embeddings(model, scorer.tokenizer(CAPTIONS + ["", "a"]))  # the same tokens
    got_image, got_text = scorer.embed_images(images), scorer.embed_texts(CAPTIONS + ["", "a"])
    assert (got_image - want_image).abs().max() <= 1e-5
    assert (got_text - want_text).abs().max() <= 1e-5

    clip_i = scorer.clip_i(images[:2], images[2:4])
    clip_t = scorer.clip_t(images[:2], CAPTIONS)
    assert torch.allclose(clip_i, (want_image[:2] * want_image[2:4]).sum(-1), atol=1e-5)
    assert torch.allclose(clip_t, (want_image[:2] * want_text[:2]).sum(-1), atol=1e-5)
    # One prompt image (or caption) for all generations broadcasts.
    assert torch.allclose(scorer.clip_i(images[:2], images[2:3]), (want_image[:2] * want_image[2]).sum(-1), atol=1e-5)
    # The scores follow the inputs: other prompt images or captions give other cosines.
    assert (scorer.clip_i(images[:2], images[1:3]) - clip_i).abs().min() > 1e-3
    assert (scorer.clip_t(images[:2], CAPTIONS[::-1]) - clip_t).abs().min() > 1e-3
    assert torch.allclose(scorer.clip_i(images[:1], images[:1]), torch.ones(1), atol=1e-6)


def test_refuses_a_checkpoint_that_does_not_fit(clip, tmp_path):
    _, weights, config = clip
    state = torch.load(weights, weights_only=True)
    state["ln_final.weight"] = state["ln_final.weight"][:-1]
    torch.save(state, tmp_path / "bad_shape.bin")
    with pytest.raises(CheckpointError, match=r"bad_shape\.bin: key 'ln_final\.weight' has shape \[31\]"):
        CLIPScorer.from_file(tmp_path / "bad_shape.bin", config)
    del state["token_embedding.weight"]
    state["ln_final.weight"] = state["ln_final.bias"]
    torch.save(state, tmp_path / "missing.bin")
    with pytest.raises(CheckpointError, match=r"missing\.bin: missing key 'token_embedding\.weight'"):
        CLIPScorer.from_file(tmp_path / "missing.bin", config)
    with pytest.raises(CheckpointError, match=r"has shape \[1024, 3, 14, 14\]|has shape .* expected"):
        CLIPScorer.from_file(weights, "ViT-B-16")  # the tiny weights under another architecture


def test_architecture_by_name_json_or_config_beside_the_weights(tmp_path):
    weights = tmp_path / "open_clip_pytorch_model.bin"
    assert model_config(None, weights)[1] == "ViT-L-14"
    assert model_config("ViT-L-14-quickgelu", weights)[0]["quick_gelu"] is True
    beside = tmp_path / "open_clip_config.json"
    beside.write_text(json.dumps({"model_cfg": OPEN_CLIP_CONFIG, "preprocess_cfg": {"mean": [0.5] * 3}}))
    with pytest.raises(ValueError, match="mean"):  # another normalization than OpenAI's is refused
        model_config(None, weights)
    beside.write_text(json.dumps({"model_cfg": OPEN_CLIP_CONFIG}))
    assert model_config(None, weights) == (OPEN_CLIP_CONFIG, str(beside))
    with pytest.raises(ValueError, match="'ViT-Q-99' is neither an open_clip architecture"):
        model_config("ViT-Q-99", weights)


# ------------------------------------------------------------------------------------------------
# The command line, end to end


@pytest.fixture(scope="module")
def setup(small, small_vit_h_folder, clip, tmp_path_factory):
    """Files for one evaluation: a random base IP-Adapter for the small UNet, two prompt images
    and their captions as a training-format JSON, and the tiny CLIP."""
    folder = tmp_path_factory.mktemp("evaluate")
    widths = [w // 10 for w in CROSS_ATTENTION_WIDTHS]  # ref.SMALL: SD1.5 at a tenth of the width
    adapter = randomize_(IPAdapter(detect_variant(projection_shapes("base")), widths), 5)
    adapter_file, _ = save_official(adapter.state_dict(), folder / "adapter")
    vit_g = randomize_(IPAdapter(detect_variant(projection_shapes("vit-g")), widths), 5)
    vit_g_file, _ = save_official(vit_g.state_dict(), folder / "vit_g")
    for name, image in zip(("a.png", "b.png"), distinct_images()[:2]):
        image.save(folder / name)
    data = folder / "pairs.json"
    data.write_text(json.dumps([{"image_file": "a.png", "text": CAPTIONS[0]},
                                {"image_file": "b.png", "text": CAPTIONS[1]}]))
    _, weights, config = clip
    common = ["--model", str(small.folder), "--ip-adapter", str(adapter_file), "--image-encoder",
              str(small_vit_h_folder), "--clip", str(weights), "--clip-model", str(config), "--resolution", "64",
              "--steps", "2", "--num-images", "2", "--device", "cpu", "--no-progress"]
    return {"folder": folder, "data": data, "common": common, "vit_g": vit_g_file}


@pytest.fixture(scope="module")
def run(setup):
    out = setup["folder"] / "out"
    assert evaluate.main([*setup["common"], "--data", str(setup["data"]), "--out", str(out)]) == 0
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return out, rows, json.loads((out / "summary.json").read_text())


def test_cli_writes_scores_images_summary_and_sheet(run, clip, small):
    out, rows, summary = run
    assert [(int(r["pair"]), int(r["generation"])) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["caption"] for r in rows] == [CAPTIONS[0]] * 2 + [CAPTIONS[1]] * 2
    assert [int(r["seed"]) for r in rows] == [evaluate.generation_seed(0, i, g) for i in (0, 1) for g in (0, 1)]
    images = [Image.open(out / r["image"]).convert("RGB") for r in rows]
    assert all(image.size == (64, 64) for image in images)
    assert len({image.tobytes() for image in images}) == 4  # every seed its own image

    # The CSV's cosines are those of the written images, recomputed with transformers (and its
    # tokenizer, padding with EOS where open_clip pads with 0: the same EOS-pooled embedding).
    model = clip[0]
    generated = hf_image_embeddings(model, images)
    reference = hf_image_embeddings(model, [Image.open(r["prompt_image"]) for r in rows])
    tokens = small.tokenizer([r["caption"] for r in rows], padding="max_length", max_length=77, return_tensors="pt")
    text = hf_text_embeddings(model, tokens.input_ids)
    clip_i, clip_t = [float(r["clip_i"]) for r in rows], [float(r["clip_t"]) for r in rows]
    assert np.allclose(clip_i, (generated * reference).sum(-1).numpy(), atol=1e-5, rtol=0)
    assert np.allclose(clip_t, (generated * text).sum(-1).numpy(), atol=1e-5, rtol=0)
    assert len(set(clip_i)) == 4 and len(set(clip_t)) == 4

    for metric, values in (("clip_i", clip_i), ("clip_t", clip_t)):
        stats = summary[metric]
        assert stats["mean"] == pytest.approx(statistics.fmean(values), abs=1e-9)
        half = 1.96 * statistics.stdev(values) / len(values) ** 0.5
        assert stats["ci95"] == pytest.approx([stats["mean"] - half, stats["mean"] + half], abs=1e-9)
    assert summary["counts"] == {"pairs": 2, "images": 4}
    settings = summary["settings"]
    assert (settings["num_images"], settings["steps"], settings["resolution"], settings["text_prompt"],
            settings["scale"], settings["adapter_variant"]) == (2, 2, 64, "empty", 1.0, "base")
    assert "1.96" in summary["interval"]
    assert Image.open(out / "contact_sheet.png").size == (3 * evaluate.THUMBNAIL, 2 * (evaluate.THUMBNAIL + 16))


def test_sample_remakes_an_image_from_its_seed(run, setup, tmp_path):
    """The help's promise: python -m ipadapter_min.sample --seed S remakes image S."""
    out, rows, _ = run
    row = rows[3]
    common = dict(zip(setup["common"][::2], setup["common"][1::2]))
    args = ["--model", common["--model"], "--ip-adapter", common["--ip-adapter"], "--image-encoder",
            common["--image-encoder"], "--image", row["prompt_image"], "--prompt", "", "--scale", "1.0",
            "--steps", "2", "--width", "64", "--height", "64", "--seed", row["seed"], "--device", "cpu",
            "--out", str(tmp_path / "again.png"), "--no-progress"]
    assert sample.main(args) == 0
    again = np.asarray(Image.open(tmp_path / "again.png").convert("RGB"))
    assert np.array_equal(again, np.asarray(Image.open(out / row["image"]).convert("RGB")))


@pytest.mark.parametrize("change,message", [
    ("existing-out", "already exists (pass --force"),
    ("missing-image", "entry 1: image"),
    ("bad-entry", "entry 0 has no \"image_file\" string"),
    ("bad-json", "not a JSON file"),
    ("k0", "argument --num-images: 0 is outside [1, 100000]"),
    ("resolution", "argument --resolution: 60 is not a multiple of 8"),
    ("coco-without-images", "--coco-captions and --coco-images go together"),
    ("bad-clip", "has shape [31]"),
    ("mismatch", "needs a ViT-bigG/14 image encoder"),
])
def test_cli_errors_are_one_line(setup, clip, tmp_path, capsys, change, message):
    data, out, args = tmp_path / "pairs.json", tmp_path / "out", list(setup["common"])
    entries = json.loads(setup["data"].read_text())
    for entry in entries:
        entry["image_file"] = str(setup["folder"] / entry["image_file"])
    if change == "existing-out":
        out.mkdir()
    elif change == "missing-image":
        entries[1]["image_file"] = str(tmp_path / "nope.png")
    elif change == "bad-entry":
        entries[0] = {"text": "no image"}
    elif change == "k0":
        args += ["--num-images", "0"]
    elif change == "resolution":
        args += ["--resolution", "60"]
    elif change == "bad-clip":
        state = torch.load(clip[1], weights_only=True)
        state["ln_final.weight"] = state["ln_final.weight"][:-1]
        torch.save(state, tmp_path / "clip.bin")
        args[args.index("--clip") + 1] = str(tmp_path / "clip.bin")
    elif change == "mismatch":
        args[args.index("--ip-adapter") + 1] = str(setup["vit_g"])
    data.write_text("[{" if change == "bad-json" else json.dumps(entries))
    source = ["--coco-captions", str(data)] if change == "coco-without-images" else ["--data", str(data)]
    try:
        code = evaluate.main([*args, *source, "--out", str(out)])
    except SystemExit as exit:  # argparse's own errors, one line too
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert change == "existing-out" or not out.exists()


def test_coco_captions_first_caption_in_image_id_order(tmp_path):
    (tmp_path / "2.jpg").write_bytes(b"")
    (tmp_path / "1.jpg").write_bytes(b"")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({
        "images": [{"id": 2, "file_name": "2.jpg"}, {"id": 1, "file_name": "1.jpg"}, {"id": 3, "file_name": "3.jpg"}],
        "annotations": [{"image_id": 2, "caption": "first of two "}, {"image_id": 1, "caption": "one"},
                        {"image_id": 2, "caption": "second of two"}]}))
    pairs = read_coco(captions, tmp_path)
    assert [(p.image.name, p.text) for p in pairs] == [("1.jpg", "one"), ("2.jpg", "first of two")]
    captions.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        read_coco(captions, tmp_path)


@pytest.mark.slow  # torchrun, two processes
def test_torchrun_two_processes_give_the_one_process_scores(run, setup, tmp_path):
    """Pairs sharded over 2 CPU processes (gloo): the same rows and summary as one process."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ipadapter_min.evaluate", *setup["common"], "--data", str(setup["data"]), "--out", str(out)]
    # Its own process group, so that a hang kills the workers too, not only torchrun.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, output[-3000:]
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    one_out, one_rows, one_summary = run
    keys = ("pair", "generation", "seed", "image", "caption")
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in one_rows]
    assert np.allclose([float(r["clip_i"]) for r in rows], [float(r["clip_i"]) for r in one_rows], atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clip_i"]["mean"] == pytest.approx(one_summary["clip_i"]["mean"], abs=1e-5)
    assert summary["clip_t"]["mean"] == pytest.approx(one_summary["clip_t"]["mean"], abs=1e-5)
    assert summary["settings"]["processes"] == 2 and summary["counts"] == one_summary["counts"]
