"""Every reader of files made elsewhere, fed random and mutated bytes: each gives a one-line
``FileFormatError`` (``CheckpointError`` is one), never another exception, a hang or a blow-up.

The mutations start from real files this project writes (a converted safetensors file, the
official pickled adapter, a PNG from ``sample`` with its records, an embeds file, a LoRA, a
dataset), so that most examples get past the first check and reach the deeper ones. Hypothesis
runs derandomized, a bounded number of examples each, to fit the suite's budget.
"""
import io
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin
from safetensors.torch import save, save_file

from ipadapter_min import demo
from ipadapter_min.cli import rerun, sample
from ipadapter_min.models.configs import AdapterSpec
from ipadapter_min.formats.files import FileFormatError, read_metadata, read_state_dict
from ipadapter_min.formats.lora import read_lora
from ipadapter_min.formats.sd15 import declared_configs
from ipadapter_min.cli.image_files import open_image, open_mask
from ipadapter_min.cli.image_embeds import read_image_embeds, save_image_embeds
from ipadapter_min.loading.sd15 import build_sd15
from ipadapter_min.training.data import read_pairs

pytestmark = pytest.mark.skipif(not demo.installed(), reason="the demo weights are not installed")
FUZZ = settings(max_examples=60, derandomize=True, deadline=None, print_blob=False, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@st.composite
def mutated(draw, original: bytes):
    """``original`` with a few bytes overwritten, inserted or cut, or cut short."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


def header_heavy(original: bytes, header_bytes: int = 4096):
    """Mutations aimed at the start of a file (its header), where the parsing is, or anywhere."""
    return st.one_of(mutated(original[:header_bytes]).map(lambda head: head + original[header_bytes:]),
                     mutated(original), st.binary(max_size=512))


def refused_in_one_line(read, *args):
    """``read(*args)`` either works or raises a one-line FileFormatError."""
    try:
        read(*args)
    except FileFormatError as exc:
        assert "\n" not in str(exc), str(exc)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def written(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def small_safetensors() -> bytes:
    tensors = {"unet.a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
               "vae.b": torch.ones(5, dtype=torch.float16), "text_encoder.c": torch.zeros(2, 2, dtype=torch.int64)}
    return save(tensors, metadata={"format": "ipadapter_min.sd15", "unet_config": "{\"channels\": 32}"})


SAFETENSORS = small_safetensors()


@FUZZ
@given(data=header_heavy(SAFETENSORS))
def test_safetensors_header(folder, data):
    path = written(folder, "x.safetensors", data)
    refused_in_one_line(read_state_dict, path)
    refused_in_one_line(read_metadata, path)
    refused_in_one_line(declared_configs, path)


def test_safetensors_header_lengths_are_bounded(folder):
    """A header claiming more than the file (or than the format's 100 MB) is refused before reading."""
    path = folder / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2 ** 63) + b"{}")
    with pytest.raises(FileFormatError, match="header length"):
        read_state_dict(path)
    path.write_bytes(struct.pack("<Q", 8) + b"[" * 8)  # nested too deep is refused as any bad JSON is
    refused_in_one_line(read_state_dict, path)
    path.write_bytes(struct.pack("<Q", 200_000) + b"[" * 200_000)
    with pytest.raises(FileFormatError):
        read_state_dict(path)


def official_pickle() -> bytes:
    """A nested dict of tensors as the release's ip-adapter.bin is pickled (a zip)."""
    buffer = io.BytesIO()
    torch.save({"image_proj": {"proj.weight": torch.ones(4, 2)}, "ip_adapter": {"1.to_k_ip.weight": torch.ones(2, 2)}},
               buffer)
    return buffer.getvalue()


PICKLE = official_pickle()


@FUZZ
@given(data=st.one_of(mutated(PICKLE), st.binary(max_size=512)))
def test_pickle_path(folder, data):
    path = written(folder, "x.bin", data)
    refused_in_one_line(read_state_dict, path)


def test_a_pickle_that_runs_code_is_refused(folder):
    class Runs:
        def __reduce__(self):
            return (print, ("this ran",))

    path = folder / "evil.pt"
    torch.save({"x": Runs()}, path)
    with pytest.raises(FileFormatError, match="weights_only"):
        read_state_dict(path)


def made_png() -> bytes:
    """A PNG as ``sample`` writes it: A1111's text and the command-line record."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 8x8")
    info.add_text(rerun.CHUNK, rerun.record(["--prompt", "a red circle", "--steps", "3", "--seed", "1"]))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


PNG = made_png()


@FUZZ
@given(data=st.one_of(mutated(PNG), st.binary(max_size=256)))
def test_png_text_chunks_and_the_record(folder, data):
    path = written(folder, "x.png", data)
    refused_in_one_line(rerun.read, path)
    refused_in_one_line(open_image, path)


ARGV_TOKENS = st.one_of(st.sampled_from(["--prompt", "--out", "--force", "--steps", "--image", "--model", "--lora",
                                         "--seed", "--scale", "--from-png", "--save-embeds", "--guidance",
                                         "--width", "--ip-adapter", "--num-images"]),
                        st.text(max_size=12), st.sampled_from(["3", "nan", "-1", "1e9", "a.png", "--x=1"]))


@FUZZ
@given(record=st.one_of(st.lists(ARGV_TOKENS, max_size=12).map(lambda argv: json.dumps({"argv": argv})),
                        st.text(max_size=64), st.recursive(st.none() | st.integers() | st.text(max_size=4),
                                                           lambda c: st.lists(c) | st.dictionaries(st.text(max_size=4), c),
                                                           max_leaves=8).map(json.dumps)))
def test_the_from_png_record(folder, record, capsys):
    """Whatever the record says: the command line is parsed or refused in one line, and what it
    would write is only what the user typed (here: nothing but --out)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(rerun.CHUNK, record)
    path = folder / "shared.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    out = folder / "mine.png"
    try:
        command = sample.parse(["--from-png", str(path), "--out", str(out)])
    except FileFormatError as exc:
        assert "\n" not in str(exc)
    except ValueError as exc:  # the command line's own checks (a bad --seed, --lora weight…)
        assert "\n" not in str(exc)
    except SystemExit as exit:  # argparse's errors: one line too (after the note of what was not taken)
        errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("--from-png")]
        assert exit.code == 2 and len(errors) == 1 and errors[0].startswith("error: "), errors
    else:
        assert command.args.out == out and not command.args.force
        assert all(g.save_embeds is None for g in command.groups)
    capsys.readouterr()


@FUZZ
@given(data=st.one_of(mutated(json.dumps([{"image_file": "a.png", "text": "a red circle"},
                                          {"image_file": "b.png", "text": "a star"}]).encode()),
                      st.binary(max_size=128),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                                   lambda c: st.lists(c, max_size=4) | st.dictionaries(
                                       st.sampled_from(["image_file", "text", "x"]), c, max_size=3),
                                   max_leaves=10).map(lambda v: json.dumps(v).encode())))
def test_json_datasets(folder, data):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    path = written(folder, "pairs.json", data)
    refused_in_one_line(read_pairs, path)


@pytest.fixture(scope="module")
def demo_targets():
    """The demo model's UNet and text-encoder weight shapes, which a LoRA is checked against."""
    from ipadapter_min.formats.sd15 import read_sd15
    checkpoint, configs = read_sd15(demo.WEIGHTS)
    models = build_sd15(checkpoint, configs)
    shapes = {f"{part}.{k}": v.shape for part in ("unet", "text_encoder") for k, v in models[part].state_dict().items()}
    return shapes, configs["unet"]


def demo_lora() -> bytes:
    """A kohya-ss LoRA of one of the demo's layers (its first attention: 32 wide), with peft-style metadata."""
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{q}.lora_down.weight": torch.ones(2, 32), f"{q}.lora_up.weight": torch.ones(32, 2),
               f"{q}.alpha": torch.tensor(1.0)}
    metadata = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.alpha_pattern": {"to_q": 2}})}
    return save(tensors, metadata=metadata)


@FUZZ
@given(data=st.data())
def test_lora_key_maps(folder, demo_targets, data):
    shapes, cfg = demo_targets
    keys = st.one_of(st.text(max_size=40), st.sampled_from([
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"]))
    values = st.sampled_from([torch.ones(2, 32), torch.ones(32, 2), torch.tensor(float("nan")), torch.zeros(0, 32),
                              torch.ones(2, 32, 1, 1), torch.tensor([1.0, 2.0]), torch.ones(3, dtype=torch.int64)])
    tensors = data.draw(st.dictionaries(keys, values, max_size=4))
    metadata = data.draw(st.one_of(st.just({}), st.fixed_dictionaries({"lora_adapter_metadata": st.one_of(
        st.text(max_size=20), st.sampled_from(['{"unet.lora_alpha": "x"}', '{"unet.alpha_pattern": {"(a+)+$": 2}}',
                                               '{"unet.lora_alpha": NaN}', '[1]', '{"unet.alpha_pattern": []}']))})))
    path = folder / "lora.safetensors"
    save_file({k: v.clone() for k, v in tensors.items()}, path, metadata=metadata)
    refused_in_one_line(read_lora, path, shapes, cfg)
    path.write_bytes(data.draw(header_heavy(demo_lora())))
    refused_in_one_line(read_lora, path, shapes, cfg)


SPEC = AdapterSpec("base", "custom 32-wide", "embedding", 32, 4, 128)


@pytest.fixture(scope="module")
def embeds_file(folder) -> bytes:
    path = folder / "made.safetensors"
    save_image_embeds(path, torch.zeros(2, 1, 32), SPEC, "custom")
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_embeds_files(folder, embeds_file, data):
    path = folder / "embeds.safetensors"
    path.write_bytes(data.draw(header_heavy(embeds_file)))
    refused_in_one_line(read_image_embeds, path, SPEC)
    adapter = data.draw(st.one_of(st.text(max_size=30), st.sampled_from(['{"variant": 1}', "[]", '{"encoder": "x"}'])))
    save_file({"image_embeds": torch.zeros(2, 1, 32)}, path,
              metadata={"format": "ipadapter_min.image_embeds", "adapter": adapter})
    refused_in_one_line(read_image_embeds, path, SPEC)


def picture_files() -> dict[str, bytes]:
    """Real pictures in the odd modes people send: CMYK, 16-bit, palette with transparency, …"""
    files = {}
    for name, image, format in [
        ("rgb.png", Image.new("RGB", (16, 12), "red"), "PNG"),
        ("cmyk.jpg", Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG"),
        ("gray16.png", Image.new("I;16", (16, 12), 40000), "PNG"),
        ("palette.png", Image.new("P", (16, 12), 3), "PNG"),
        ("la.png", Image.new("LA", (16, 12), (100, 50)), "PNG"),
        ("anim.gif", Image.new("P", (16, 12), 1), "GIF"),
        ("tiff.tif", Image.new("RGBA", (16, 12), (1, 2, 3, 4)), "TIFF"),
        ("webp.webp", Image.new("RGB", (16, 12), "blue"), "WEBP"),
    ]:
        buffer = io.BytesIO()
        extra = {"transparency": 3} if name == "palette.png" else {}
        image.save(buffer, format=format, **extra)
        files[name] = buffer.getvalue()
    return files


PICTURES = picture_files()


@pytest.mark.parametrize("name", sorted(PICTURES))
def test_odd_picture_modes_are_read(folder, name):
    path = folder / name
    path.write_bytes(PICTURES[name])
    assert open_image(path).mode == "RGB" and open_mask(path).mode == "RGB"


@FUZZ
@given(data=st.one_of(*[mutated(b) for b in PICTURES.values()], st.binary(max_size=256)))
def test_image_files(folder, data):
    path = written(folder, "picture", data)
    refused_in_one_line(open_image, path)
    refused_in_one_line(open_mask, path)


def test_a_decompression_bomb_is_refused_before_decoding(folder):
    """A PNG whose header claims 100000 × 100000 pixels: refused from the header, in a moment."""
    import zlib
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path = folder / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))
    with pytest.raises(FileFormatError, match="10000000000 pixels is more than"):
        open_image(path)


STATE = json.dumps({"step": 12, "skipped_images": 0, "recipe": {"variant": "base", "seed": 3}}, indent=1).encode()


@FUZZ
@given(data=st.one_of(mutated(STATE), st.binary(max_size=64)))
def test_training_state_files(folder, data):
    """A checkpoint to --resume may come from elsewhere: its counters set where training goes on."""
    from ipadapter_min.training.checkpoint import STATE_FILE, read_state
    written(folder, STATE_FILE, data)
    refused_in_one_line(read_state, folder)
