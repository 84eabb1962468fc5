"""Loading and converting SD1.5 checkpoints: formats, refusals, and the command-line errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import a1111
from ipadapter_min.cli import output_options, sample
from ipadapter_min.loading.sd15 import load_sd15
from weights_convert.__main__ import main as convert_main
from ipadapter_min.formats.files import CheckpointError, read_state_dict
from ipadapter_min.formats.sd15 import read_sd15


def copy_folder(tiny, tmp_path):
    return shutil.copytree(tiny.folder, tmp_path / "sd")


def edit_unet(folder, edit):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


@pytest.mark.slow  # commands in subprocesses
def test_runtime_imports_no_oracle():
    """The runtime package and the converter never import diffusers, transformers or accelerate."""
    code = ("import sys, ipadapter_min.sample, ipadapter_min.pipelines.text_to_image, weights_convert.__main__, ipadapter_min.kernels; "
            "import ipadapter_min.pipelines.image_prompts, weights_convert.convert; "
            "bad = [m for m in ('diffusers', 'transformers', 'accelerate') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_text_encoder_keys_with_and_without_text_model_prefix(tiny, tmp_path):
    folder = copy_folder(tiny, tmp_path)
    path = folder / "text_encoder" / "model.safetensors"
    state = load_file(path)
    prefixed = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in state.items()}
    prefixed["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(prefixed, path)
    reloaded = load_sd15(folder)["text_encoder"].state_dict()
    original = load_sd15(tiny.folder)["text_encoder"].state_dict()
    assert all(torch.equal(reloaded[k], original[k]) for k in original)


def test_pickled_bin_folder_loads(tiny, tmp_path):
    folder = copy_folder(tiny, tmp_path)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(path), folder / "unet" / "diffusion_pytorch_model.bin")
    path.unlink()
    assert torch.equal(load_sd15(folder)["unet"].out[2].weight, load_sd15(tiny.folder)["unet"].out[2].weight)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("conv_in.weight"), "missing key 'unet.input_blocks.0.0.weight'"),
    (lambda s: s.update(extra=torch.zeros(1)), "key 'extra' is unexpected"),
    (lambda s: s.update({"conv_in.weight": torch.zeros(32, 9, 3, 3)}), "has shape [32, 9, 3, 3], expected [32, 4, 3, 3]"),
])
def test_bad_keys_are_named(tiny, tmp_path, edit, message):
    folder = copy_folder(tiny, tmp_path)
    edit_unet(folder, edit)
    with pytest.raises(CheckpointError) as info:
        load_sd15(folder)
    assert message in str(info.value) and "\n" not in str(info.value)
    if "missing" not in message:
        assert "diffusion_pytorch_model.safetensors" in str(info.value)


@pytest.mark.parametrize("key,what", [
    ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", "SDXL"),
    ("cond_stage_model.model.token_embedding.weight", "Stable Diffusion 2"),
])
def test_other_model_families_are_refused(tmp_path, key, what):
    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(2, 2), "model.diffusion_model.out.2.bias": torch.zeros(4)}, path)
    with pytest.raises(CheckpointError, match=what):
        load_sd15(path)


@pytest.mark.parametrize("change,what", [({"cross_attention_dim": 1024}, "Stable Diffusion 2"),
                                         ({"addition_embed_type": "text_time"}, "SDXL"),
                                         ({"in_channels": 8}, "other variants are not supported"),
                                         ({"block_out_channels": None}, "not a usable SD1.x config")])
def test_other_diffusers_folders_are_refused(tiny, tmp_path, change, what):
    folder = copy_folder(tiny, tmp_path)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(CheckpointError, match=what):
        load_sd15(folder)


@pytest.mark.parametrize("channels", [4, 9, 8])
def test_single_file_unet_input_channels_come_from_its_first_convolution(tmp_path, channels):
    """sd-v1-5-inpainting is told from SD1.5 by its first convolution's 9 inputs; instruct-pix2pix (8) is refused."""
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, channels, 3, 3)}, path)
    if channels == 8:
        with pytest.raises(CheckpointError, match="takes 8 input channels"):
            read_sd15(path)
    else:
        assert read_sd15(path)[1]["unet"].in_channels == channels


def test_legacy_pickle_format_loads(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"x": torch.ones(2)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(path)["x"], torch.ones(2))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": print}, path)
    with pytest.raises(CheckpointError, match="weights_only") as info:
        read_state_dict(path)
    text = str(info.value)
    assert "\x1b" not in text and "\n" not in text, repr(text)  # torch's own message is bold and multi-line


def test_garbage_and_unknown_files_are_refused(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_sd15(tmp_path / "bad.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        load_sd15(tmp_path / "model.onnx")
    with pytest.raises(CheckpointError, match="no such file"):
        load_sd15(tmp_path / "missing.safetensors")


def test_convert_refuses_to_overwrite_and_roundtrips(tiny, tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    assert convert_main(["sd15", str(tiny.folder), "-o", str(out), "--dtype", "fp16"]) == 0
    stamp = out.stat().st_mtime_ns
    assert convert_main(["sd15", str(tiny.folder), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.stat().st_mtime_ns == stamp
    converted = load_sd15(out)["unet"].state_dict()
    original = load_sd15(tiny.folder)["unet"].state_dict()
    assert all(torch.equal(converted[k], original[k].half().float()) for k in original)
    assert convert_main(["sd15", str(tiny.folder), "-o", str(out), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]  # no temporary files left
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a private temporary one
    (tmp_path / "folder.safetensors").mkdir()
    assert convert_main(["sd15", str(tiny.folder), "-o", str(tmp_path / "folder.safetensors"), "--force"]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_convert_reports_bad_source(tmp_path, capsys):
    assert convert_main(["sd15", str(tmp_path / "nope"), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no such file" in err and err.count("\n") == 1


@pytest.mark.parametrize("extra,message", [
    (["--width", "500"], "argument --width: 500 is not a multiple of 8"),
    (["--steps", "0"], "argument --steps: 0 is outside [1,"),
    (["--out", "x.jpg"], "must name a .png"),
])
def test_sample_rejects_bad_arguments(tiny, tmp_path, capsys, extra, message):
    try:
        code = sample.main(["--model", str(tiny.folder), "--out", str(tmp_path / "o.png"), *extra])
    except SystemExit as exit:  # argparse's own errors, one line too
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_sample_refuses_missing_model_and_existing_output(tiny, tmp_path, capsys):
    assert sample.main(["--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    out = tmp_path / "o.png"
    out.write_bytes(b"precious")
    assert sample.main(["--model", str(tiny.folder), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"precious"


def test_sample_writes_images_with_parameters(tiny, tmp_path):
    from PIL import Image
    out = tmp_path / "cat.png"
    args = ["--model", str(tiny.folder), "--prompt", "a cat", "--steps", "2", "--width", "32", "--height", "32",
            "--num-images", "2", "--seed", "5", "--out", str(out), "--no-progress"]
    assert sample.main(args) == 0
    first = Image.open(tmp_path / "cat-0.png")
    settings = a1111.parse(first.text["parameters"])
    assert first.size == (32, 32) and settings["Prompt"] == "a cat" and settings["Seed"] == "5"
    assert settings["Batch size"] == "2" and settings["Batch pos"] == "0"
    assert (tmp_path / "cat-1.png").exists() and not out.exists()


def test_sample_defaults_and_help_say_what_the_code_does(tmp_path):
    """The CLI's defaults are the library's (StableDiffusion.__call__, IPAdapterPipeline.__call__,
    ImagePromptInput) and the README's ("30 steps, guidance 7.5, 512×512"); the defaults and limits
    that our help strings state in words are the ones the code applies; every option has help of its own and the
    help renders (a stray % in a help string would crash --help)."""
    import inspect
    import re
    from pathlib import Path

    from ipadapter_min.pipelines.image_prompt_input import ImagePromptInput
    from ipadapter_min.pipelines.image_prompts import IPAdapterPipeline
    from ipadapter_min.pipelines.text_to_image import DEFAULT_SIZE, StableDiffusion, check_size

    def defaults(fn):
        return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}

    parser = sample.build_parser()

    def checked(argv):
        """The arguments after the checks, which fill in what depends on the model (the size: 512,
        or the demo model's 64); comma-list options at their (one) value."""
        command = sample.parse(argv)
        sample.check(command)
        return command.args

    for name in ("m", "a.bin", "enc"):
        (tmp_path / name).write_bytes(b"x")
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "r.png")
    args = checked(["--model", str(tmp_path / "m"), "--out", str(tmp_path / "o.png"), "--device", "cpu"])
    sd = defaults(StableDiffusion.__call__)
    for name in ("negative_prompt", "steps", "guidance", "seed", "num_images", "clip_skip", "strength", "mask_crop"):
        assert getattr(args, name) == sd[name], f"--{name.replace('_', '-')} {getattr(args, name)!r} vs {sd[name]!r}"
    assert sd["width"] is sd["height"] is None and args.width == args.height == DEFAULT_SIZE  # without an init image
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    claim = re.search(r"Defaults follow the reference: .*?(\d+) steps, guidance ([\d.]+), (\d+)×(\d+)", readme)
    assert claim, "README no longer states the defaults"
    assert (args.steps, args.guidance, args.width, args.height) == (30, 7.5, 512, 512) == (
        int(claim[1]), float(claim[2]), int(claim[3]), int(claim[4]))

    # The image-prompt options have no argparse default (so that validate can tell they were given
    # without an image prompt); the checks fill them in, and the help states λ's in words.
    ip_args = checked(["--model", str(tmp_path / "m"), "--ip-adapter", str(tmp_path / "a.bin"),
                       "--image-encoder", str(tmp_path / "enc"), "--image", str(tmp_path / "r.png"),
                       "--out", str(tmp_path / "o.png"), "--device", "cpu"])
    ip = defaults(IPAdapterPipeline.__call__)
    assert (ip_args.scale, ip_args.image_combine, not ip_args.no_crop, ip_args.reference_attention) == (
        ip["scale"], defaults(ImagePromptInput)["combine"], ip["crop"], ip["reference_attention"])
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings and a.dest != "help"}
    assert f"default {ip['scale']}" in helps["--scale"]

    # Limits the help states: sizes "a multiple of 8", several images "written as OUT-0.png, OUT-1.png".
    assert "a multiple of 8" in helps["--width"] and "a multiple of 8" in helps["--height"]
    check_size(520, 504)
    for bad in ((516, 512), (512, 500)):
        with pytest.raises(ValueError, match="multiple of 8"):
            check_size(*bad)
    assert "OUT-0.png, OUT-1.png" in helps["--num-images"]
    assert output_options.output_paths(Path("d/OUT.png"), 2) == [Path("d/OUT-0.png"), Path("d/OUT-1.png")]

    for flag, text in helps.items():  # our own words for every option: not missing, not the flag's name again
        assert text and text.strip().lower() != flag.strip("-").replace("-", " "), flag
    parser.format_help()  # raises where a help string does not %-format (ArgumentDefaultsHelpFormatter)


@pytest.mark.parametrize("extra,message", [
    (["--ip-adapter", "a.bin"], "an image prompt needs --image, --image-encoder too"),
    (["--ip-adapter", "{d}/missing.bin", "--image-encoder", "{d}", "--image", "{d}/r.png"], "--ip-adapter"),
    (["--ip-adapter", "{d}/a.bin", "--image-encoder", "{d}", "--image", "{d}/none.png"], "--image"),
    (["--scale", "lots"], "expected a number, numbers separated by commas, or a JSON dict"),
    (["--scale", "0.5"], "--scale applies to an image prompt"),
    (["--no-crop"], "--no-crop applies to an image prompt"),
    (["--reference-attention"], "--reference-attention applies to an image prompt"),
    (["--steps", "1000"], "--steps must be in [1, 999]"),
])
def test_sample_rejects_bad_image_prompt_arguments(tiny, tmp_path, capsys, extra, message):
    (tmp_path / "a.bin").write_bytes(b"x")
    (tmp_path / "r.png").write_bytes(b"x")
    extra = [e.format(d=tmp_path) for e in extra]
    try:
        code = sample.main(["--model", str(tiny.folder), "--out", str(tmp_path / "o.png"), *extra])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2 and message in capsys.readouterr().err


def test_sample_refuses_adapter_with_the_wrong_encoder(tiny, tmp_path, capsys):
    """A ViT-H adapter (1024-wide embedding) with a different image encoder: one clear line."""
    import reference_models as ref
    from ipadapter_min.models.image_encoder import ImageEncoderConfig
    ref.random_hf_model(ImageEncoderConfig.tiny()).save_pretrained(tmp_path / "encoder")
    ref.write_official(ref.official_state("base"), tmp_path / "ip-adapter_sd15.bin")
    from PIL import Image
    Image.new("RGB", (64, 48), "red").save(tmp_path / "ref.png")
    capsys.readouterr()
    code = sample.main(["--model", str(tiny.folder), "--out", str(tmp_path / "o.png"), "--ip-adapter",
                        str(tmp_path / "ip-adapter_sd15.bin"), "--image-encoder", str(tmp_path / "encoder"),
                        "--image", str(tmp_path / "ref.png")])
    err = capsys.readouterr().err
    assert code == 2 and "needs a ViT-H/14 image encoder" in err and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


def test_loading_runs_no_random_initialisation(tiny, monkeypatch):
    """Models are built on the meta device: no parameter is ever initialised on a real device."""
    real_init = []

    def spy(name, original):
        def wrapped(tensor, *args, **kwargs):
            if tensor.device.type != "meta":
                real_init.append(name)
            return original(tensor, *args, **kwargs)
        return wrapped

    for name in ("uniform_", "normal_", "kaiming_uniform_", "zeros_", "ones_"):
        monkeypatch.setattr(torch.nn.init, name, spy(name, getattr(torch.nn.init, name)))
    load_sd15(tiny.folder)
    assert real_init == []
    with torch.device("cpu"):  # the spy does see a real initialisation
        torch.nn.Linear(2, 2)
    assert real_init


def test_safetensors_reader_handles_misaligned_and_bad_offsets(tmp_path):
    """Another writer may put an fp32 tensor at an odd offset (after 3 bytes of uint8): it is read
    right all the same. Offsets that do not fit the shape, or run past the file, are refused."""
    import struct
    values = torch.tensor([1.5, -2.25, 3.0])

    def write(name: str, entries: dict, data: bytes):
        header = json.dumps(entries).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(header)) + header + data)
        return tmp_path / name

    data = bytes([7, 8, 9]) + values.numpy().tobytes()
    good = write("odd.safetensors", {"u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                                     "f": {"dtype": "F32", "shape": [3], "data_offsets": [3, 15]}}, data)
    state = read_state_dict(good)
    assert torch.equal(state["f"], values) and state["u"].tolist() == [7, 8, 9]
    for offsets in ([3, 14], [3, 19]):
        bad = write("bad.safetensors", {"f": {"dtype": "F32", "shape": [3], "data_offsets": offsets}}, data)
        with pytest.raises(CheckpointError, match="data offsets"):
            read_state_dict(bad)


def test_memory_mapped_weights_hold_one_file_descriptor_a_file(tiny):
    """Weights stay memory-mapped after loading; that must not cost a descriptor per tensor
    (hundreds for SD1.5, past the usual limit of 1024 open files)."""
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = fds()
    models = load_sd15(tiny.folder)  # three safetensors files, ~100 tensors
    assert sum(1 for m in models.values() for _ in m.parameters()) > 50
    assert fds() - before <= 3


def test_each_model_is_built_once(tiny, monkeypatch):
    """One build per model: its keys and shapes are checked against the build that gets the tensors."""
    import ipadapter_min.loading.sd15 as loading
    built = []
    for name, model_cls in loading.SD15_MODELS.items():
        monkeypatch.setitem(loading.SD15_MODELS, name,
                            lambda cfg, name=name, model_cls=model_cls: built.append(name) or model_cls(cfg))
    models = load_sd15(tiny.folder)
    assert sorted(built) == ["text_encoder", "unet", "vae"]
    assert all(p.device.type == "cpu" for m in models.values() for p in m.parameters())


def test_sample_checks_a_per_block_scale_before_loading(tmp_path, capsys):
    for name in ("a.bin", "r.png"):
        (tmp_path / name).write_bytes(b"x")  # never read: the scale is refused first
    assert sample.main(["--model", str(tmp_path), "--ip-adapter", str(tmp_path / "a.bin"), "--image-encoder",
                        str(tmp_path), "--image", str(tmp_path / "r.png"), "--scale", '{"up": {"block_0": 1.0}}']) == 2
    assert "'up.block_0' is not an SD1.5 block with attention layers" in capsys.readouterr().err


def test_repeated_image_flags_add_up():
    args = sample.build_parser().parse_args(["--model", "m", "--image", "a.png", "b.png", "--image", "c.png"])
    assert [p.name for p in args.image] == ["a.png", "b.png", "c.png"]
