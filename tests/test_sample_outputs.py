"""What the sample command leaves behind: A1111's ``parameters`` text (read back by an
independent parser), ``--from-png`` making the same bits again, ``--seed -1``, and comma-list
sweeps as labelled grids. On the shipped demo model (64×64, a few steps: about a second an image)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import a1111
from ipadapter_min import demo
from ipadapter_min.cli import rerun, sample
from ipadapter_min.cli.png_parameters import a1111_text

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not demo.installed(), reason="the demo weights are not installed")]


@pytest.fixture
def reference(tmp_path):
    """A reference image: a red disc on blue, as the demo world draws them."""
    image = Image.new("RGB", (64, 64), (30, 60, 200))
    image.paste((220, 30, 30), (16, 16, 48, 48))
    image.save(tmp_path / "ref.png")
    return tmp_path / "ref.png"


def run(*args: str) -> int:
    return sample.main([*args, "--steps", "3", "--no-progress"])


def pixels(path) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def test_parameters_are_read_by_a1111s_parser(reference, tmp_path):
    out = tmp_path / "a.png"
    assert run("--prompt", "a red circle", "--negative-prompt", "blurry, dark", "--sampler", "dpmpp-2m-karras",
               "--guidance", "5", "--seed", "7", "--clip-skip", "1", "--image", str(reference), "--scale", "0.6",
               "--out", str(out)) == 0
    settings = a1111.parse(Image.open(out).text["parameters"])
    assert settings["Prompt"] == "a red circle" and settings["Negative prompt"] == "blurry, dark"
    assert {k: settings[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Clip skip")} == {
        "Steps": "3", "Sampler": "DPM++ 2M Karras", "CFG scale": "5", "Seed": "7", "Size": "64x64",
        "Model": "ipadapter_min demo", "Clip skip": "2"}  # A1111's clip skip 2 is diffusers' 1
    assert settings["IP-Adapter"] == "ip_adapter" and settings["IP-Adapter scale"] == "0.6"
    assert settings["IP-Adapter image"] == "ref.png"


def test_quoted_values_survive_the_parser():
    written = a1111_text("a cat\non two lines", "", {"Steps": 3, "Sampler": "Euler a", "Seed": 1,
                                                      "IP-Adapter scale": json.dumps({"down": {"block_2": [0.0, 1.0]}}),
                                                      "LoRA": "a:0.5 b:1"})
    settings = a1111.parse(written)
    assert settings["Prompt"] == "a cat\non two lines" and settings["LoRA"] == "a:0.5 b:1"
    assert json.loads(settings["IP-Adapter scale"]) == {"down": {"block_2": [0.0, 1.0]}}


def test_from_png_makes_the_same_bits_from_anywhere(reference, tmp_path, monkeypatch):
    """Relative paths in the command line are recorded absolute; a sampler that adds noise at
    every step (euler-a) and an image prompt included."""
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert run("--prompt", "a star", "--image", "../ref.png", "--scale", "0.5", "--sampler", "euler-a",
               "--seed", "11", "--out", "first.png") == 0
    monkeypatch.chdir(tmp_path / "elsewhere")
    first = tmp_path / "here" / "first.png"
    assert sample.main(["--from-png", str(first), "--out", "again.png", "--no-progress"]) == 0
    assert pixels("again.png") == pixels(first)
    assert sample.main(["--from-png", str(first), "--out", "again2.png", "--no-progress"]) == 0
    assert open("again.png", "rb").read() == open("again2.png", "rb").read()  # metadata included
    assert sample.main(["--from-png", str(first), "--seed", "12", "--out", "other.png", "--no-progress"]) == 0
    assert pixels("other.png") != pixels(first)  # the options given with it override the recorded ones
    assert a1111.parse(Image.open("other.png").text["parameters"])["Seed"] == "12"


def test_from_png_refuses_a_png_without_a_record(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert sample.main(["--from-png", str(tmp_path / "plain.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plain.png" in err and "no ipadapter_min record" in err


def test_random_seed_is_printed_recorded_and_repeatable(tmp_path, capsys):
    assert run("--prompt", "a square", "--seed", "-1", "--out", str(tmp_path / "a.png")) == 0
    printed = int(capsys.readouterr().out.split("seed: ")[1].split()[0])
    written = Image.open(tmp_path / "a.png")
    assert a1111.parse(written.text["parameters"])["Seed"] == str(printed)
    assert ["--seed", str(printed)] == [t for t in json.loads(written.text[rerun.CHUNK])["argv"]
                                        if t in ("--seed", str(printed))]
    assert run("--prompt", "a square", "--seed", str(printed), "--out", str(tmp_path / "b.png")) == 0
    assert pixels(tmp_path / "a.png") == pixels(tmp_path / "b.png")


def test_scale_and_seed_lists_make_a_labelled_grid(reference, tmp_path):
    out = tmp_path / "sweep.png"
    assert run("--image", str(reference), "--scale", "0,1", "--seed", "1,2", "--out", str(out)) == 0
    cells = {(s, seed): tmp_path / f"sweep-scale{s}-seed{seed}.png" for seed in (1, 2) for s in ("0", "1")}
    assert all(path.exists() for path in cells.values())
    assert run("--image", str(reference), "--scale", "0", "--seed", "2", "--out", str(tmp_path / "single.png")) == 0
    assert pixels(cells["0", 2]) == pixels(tmp_path / "single.png")  # each cell is the image of its values
    assert pixels(cells["0", 2]) != pixels(cells["1", 2]) != pixels(cells["1", 1])

    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
    cell = 128  # 64×64 images, enlarged 2× so that labels fit
    top = grid.shape[0] - 2 * cell
    left = grid.shape[1] - 2 * cell
    assert top > 10 and left > cell  # a label band above, the reference and the row labels on the left
    for (s, seed), path in cells.items():
        x, y = ("0", "1").index(s), (1, 2).index(seed)
        shown = grid[top + y * cell:top + (y + 1) * cell, left + x * cell:left + (x + 1) * cell]
        expected = np.asarray(Image.open(path).convert("RGB").resize((cell, cell), Image.NEAREST)).astype(int)
        assert np.array_equal(shown, expected)
    corner = grid[top:top + cell, :cell]
    assert np.abs(corner[cell // 2, cell // 2] - (220, 30, 30)).max() < 10  # the reference's red disc
    assert np.abs(corner[4, 4] - (30, 60, 200)).max() < 10
    assert (grid[:top, left:] < 128).any() and (grid[top:, cell:left] < 128).any()  # column and row labels

    assert sample.main(["--from-png", str(out), "--out", str(tmp_path / "again" / "sweep.png"), "--no-progress"]) == 0
    assert pixels(tmp_path / "again" / "sweep.png") == pixels(out)


def test_sampler_and_guidance_lists(tmp_path):
    out = tmp_path / "s.png"
    assert run("--prompt", "a cross", "--sampler", "ddim,euler", "--guidance", "1,7.5", "--out", str(out)) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["s.png"] + [f"s-sampler{a}-guidance{b}.png" for a in ("ddim", "euler") for b in ("1", "7.5")])
    settings = a1111.parse(Image.open(tmp_path / "s-samplereuler-guidance1.png").text["parameters"])
    assert settings["Sampler"] == "Euler" and settings["CFG scale"] == "1"


@pytest.mark.parametrize("extra,message", [
    (["--seed", "1,2", "--guidance", "3,4", "--sampler", "ddim,euler"], "at most two"),
    (["--seed", "1,2", "--num-images", "2"], "--num-images"),
    (["--seed", "1,2", "--eta", "0.5", "--sampler", "ddim,euler"], "--eta applies to --sampler ddim only"),
    (["--seed", "-2"], "--seed must be in [0, 2**64) or -1"),
    (["--seed", "1,1"], "two images of the sweep would both be"),
])
def test_bad_lists_are_refused_before_loading(tmp_path, capsys, extra, message):
    assert sample.main(["--prompt", "a", "--out", str(tmp_path / "x.png"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra,message", [
    (["--sampler", "ddim,dpm"], "not a sampler: choose from ddim"),
    (["--scale", "0,x"], "numbers separated by commas, or a JSON dict, got '0,x'"),
    (["--threads", "0"], "argument --threads: 0 is outside [1, 4096]"),
    (["--guidance", "nan"], "argument --guidance: nan is not a finite number"),
    (["--guidance", "7,inf"], "argument --guidance: inf is not a finite number"),
    (["--width", "100000"], "argument --width: 100000 is outside [8, 16384]"),
    (["--height", "500"], "argument --height: 500 is not a multiple of 8"),
    (["--num-images", "0"], "argument --num-images: 0 is outside [1, 100000]"),
    (["--start", "nan"], "argument --start: nan is not a finite number"),
    (["--control-scale=-inf"], "argument --control-scale: -inf is not a finite number"),
])
def test_bad_values_are_argparse_errors_in_one_line(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit:
        sample.main(["--prompt", "a", "--out", str(tmp_path / "x.png"), *extra])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and err.count("\n") == 1, err


def test_dtype_defaults_to_fp16_on_cuda_only(monkeypatch, tmp_path):
    def dtype(*extra):
        command = sample.parse([*extra, "--out", str(tmp_path / "a.png")])
        sample.check(command)
        return command.args.dtype

    assert dtype("--device", "cpu") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dtype("--device", "cuda") == "fp16" and dtype("--device", "cuda", "--dtype", "fp32") == "fp32"
    assert "fp16 on CUDA, fp32 on the CPU" in " ".join(sample.build_parser().format_help().split())


def test_demo_model_runs_on_one_thread_unless_told(monkeypatch, tmp_path):
    """Its layers are too small to share between threads; the caller's setting is left as it was."""
    seen = []
    monkeypatch.setattr(sample, "generate",
                        lambda *args: seen.append(torch.get_num_threads()) or [Image.new("RGB", (8, 8))])
    before = torch.get_num_threads()
    for i, extra in enumerate([[], ["--threads", "3"]]):
        assert sample.main(["--prompt", "a red circle", "--out", str(tmp_path / f"{i}.png"), *extra]) == 0
    assert seen == [1, 3] and torch.get_num_threads() == before


def test_long_prompt_flag_reaches_the_pipeline(tmp_path, caplog):
    prompt = " ".join(["a small green cross on the right"] * 12)  # 84 tokens
    assert run("--prompt", prompt, "--out", str(tmp_path / "cut.png")) == 0
    assert 'dropped "the right a small green cross on the right"' in caplog.text  # tokens 76-84
    assert run("--prompt", prompt, "--long-prompt", "chunk", "--out", str(tmp_path / "chunked.png")) == 0
    assert pixels(tmp_path / "cut.png") != pixels(tmp_path / "chunked.png")
    assert a1111.parse(Image.open(tmp_path / "chunked.png").text["parameters"])["Long prompt"] == "chunk"


def test_shortened_flags_are_refused(tmp_path, capsys):
    """A shortened --from would be taken for --from-png by argparse and never expanded, and a
    shortened path flag would escape the record's absolute paths."""
    with pytest.raises(SystemExit):
        sample.main(["--from", str(tmp_path / "x.png")])
    assert "unrecognized arguments: --from" in capsys.readouterr().err


def hostile_png(path, argv: list[str]) -> None:
    """A PNG as anyone can make one: any record at all in the ipadapter_min chunk."""
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text(rerun.CHUNK, rerun.record(argv))
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


def test_a_shared_png_cannot_choose_what_is_written(tmp_path, monkeypatch, capsys):
    """Its record asks to overwrite a file the user never named, to save embeddings and to set the
    threads; only the image's description is taken, and the victim keeps its bytes."""
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"the user's own file")
    hostile_png(tmp_path / "shared.png", [
        "--prompt", "a red \x1b[2Jcircle\nrm -rf ~", "--steps", "3", "--seed", "5", "--out", str(victim), "--force",
        "--save-embeds", str(tmp_path / "embeds.safetensors"), "--threads", "7", "--out=" + str(victim),
        "--from-png", str(tmp_path / "shared.png"), "stray"])
    assert sample.main(["--from-png", "shared.png", "--out", "mine.png", "--no-progress"]) == 0
    assert victim.read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png", "shared.png", "victim.png"]
    out, err = capsys.readouterr()
    [running] = [line for line in out.splitlines() if line.startswith("running: ")]
    assert "victim" not in running and "--threads" not in running and "\x1b" not in running
    assert running.endswith("--steps=3 --seed=5 --out mine.png --no-progress")
    assert "$'--prompt=a red \\x1b[2Jcircle\\nrm -rf ~'" in running  # the record's control characters shown, not obeyed
    assert "not taken from its record" in err and "--out --force --save-embeds --threads --from-png stray" in err
    assert "\x1b" not in err
    # the same record, given no --out: the command's default, never the record's
    assert sample.main(["--from-png", "shared.png", "--no-progress"]) == 0
    assert (tmp_path / "out.png").is_file() and victim.read_bytes() == b"the user's own file"


def test_a_recorded_file_that_is_missing_names_its_option(reference, tmp_path, capsys):
    hostile_png(tmp_path / "shared.png", ["--prompt", "", "--image", str(tmp_path / "gone.png"), "--steps", "3"])
    out = tmp_path / "o.png"
    assert sample.main(["--from-png", str(tmp_path / "shared.png"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"its record reads --image {tmp_path / 'gone.png'}, which is not here" in err
    assert "give --image FILE to supply it" in err and not out.exists()
    # the option given with --from-png supplies the missing file
    assert sample.main(["--from-png", str(tmp_path / "shared.png"), "--image", str(reference), "--out", str(out),
                        "--no-progress"]) == 0
    assert a1111.parse(Image.open(out).text["parameters"])["IP-Adapter image"] == "ref.png"


def test_a_record_giving_an_option_without_its_value_is_refused(tmp_path, capsys):
    """Else the user's first option would become its value."""
    hostile_png(tmp_path / "shared.png", ["--steps", "3", "--prompt"])
    assert sample.main(["--from-png", str(tmp_path / "shared.png"), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "its record gives --prompt without its value" in err and err.count("\n") == 1


def test_a_generation_that_cannot_fit_is_refused_at_once(tmp_path, capsys, monkeypatch):
    """16384² on the demo model: the VAE decoder alone would need ~288 GiB. Refused before any
    loading, in well under a second, with both figures."""
    import time
    from ipadapter_min.pipelines import generation_memory
    start = time.perf_counter()
    assert sample.main(["--width", "16384", "--height", "16384", "--out", str(tmp_path / "o.png")]) == 2
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert seconds < 0.5 and err.count("\n") == 1 and "16384×16384, 1 image at a time" in err, (seconds, err)
    assert "GiB of activations, and cpu has" in err and not list(tmp_path.iterdir())
    # the same check refuses a small image when the device has less free than it needs
    monkeypatch.setattr(generation_memory, "free_bytes", lambda device: 2 ** 20)
    assert sample.main(["--num-images", "4", "--out", str(tmp_path / "o.png")]) == 2
    assert ("64×64, 4 images at a time: the generation needs about 18 MiB of activations, and cpu has 1 MiB free"
            in capsys.readouterr().err)
