"""The demo judge: it learns every attribute from fresh renders, and its file round-trips exactly."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from ipadapter_min.demo.judge import (Judge, accuracy, judge_pixels, load_judge, predict, save_judge,
                                      train_judge)
from ipadapter_min.demo.world import ATTRIBUTES, render, scenes
from ipadapter_min.formats.files import CheckpointError, read_metadata, read_state_dict, save_safetensors

STEPS = 120
# Measured after 120 steps (batch 64, seeds 0 and 1) on these 300 held-out renders: color 0.96-0.97,
# background 1.0, shape 0.29-0.33, size 0.93-0.94, position 1.0. Chance is 1/12, 1/12, 1/8, 1/3, 1/5:
# the thresholds are well above chance and well below the measured figures.
THRESHOLDS = {"color": 0.6, "background": 0.6, "shape": 0.2, "size": 0.6, "position": 0.6}


@pytest.fixture(scope="module")
def judge(one_thread, tmp_path_factory):
    return train_judge(STEPS, tmp_path_factory.mktemp("judge"), batch_size=64, seed=0, progress=False)


@pytest.fixture(scope="module")
def held_out():
    held = scenes(300, seed=12345)
    return held, [render(scene, seed=1000 + i) for i, scene in enumerate(held)]


@pytest.fixture(scope="module")
def little_judge(one_thread, tmp_path_factory):
    """A judge after 3 steps, for what does not need it to judge well (arguments, files)."""
    return train_judge(3, tmp_path_factory.mktemp("little_judge"), batch_size=8, seed=0, progress=False)


@pytest.fixture(scope="module")
def few():
    held = scenes(20, seed=12345)
    return held, [render(scene, seed=1000 + i) for i, scene in enumerate(held)]


@pytest.mark.slow  # trains the judge
def test_learns_every_attribute(judge, held_out):
    scores = accuracy(judge, *held_out)
    assert all(scores[name] >= THRESHOLDS[name] for name in ATTRIBUTES), scores


def test_training_is_deterministic_and_logs(one_thread, tmp_path):
    a = train_judge(3, tmp_path / "a", batch_size=8, seed=1, progress=False)
    b = train_judge(3, tmp_path / "b", batch_size=8, seed=1, progress=False)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert (tmp_path / "a" / "log.csv").read_text().count("\n") == 4  # header + 3 steps


def test_bad_arguments_are_refused(little_judge, few):
    with pytest.raises(ValueError, match="at least one training step"):
        train_judge(0, Path("unused"), progress=False)
    with pytest.raises(ValueError, match="as many scenes as images"):
        accuracy(little_judge, few[0][:3], few[1][:2])


def test_predict_reads_values(little_judge, few):
    readings = predict(little_judge, few[1][:5])
    assert len(readings) == 5
    assert all(reading[name] in ATTRIBUTES[name] for reading in readings for name in ATTRIBUTES)


def test_pixels_are_in_unit_range_and_size_is_checked():
    pixels = judge_pixels([Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("L", (64, 64), 0)])
    assert pixels.shape == (2, 3, 64, 64) and pixels.dtype == torch.float32
    assert pixels[0, 0].eq(1).all() and pixels[0, 1:].eq(0).all() and pixels[1].eq(0).all()
    with pytest.raises(ValueError, match="64×64"):
        judge_pixels([Image.new("RGB", (32, 32))])


def test_save_load_round_trip_is_exact(little_judge, few, tmp_path):
    path = tmp_path / "judge.safetensors"
    save_judge(little_judge, path)
    loaded = load_judge(path)
    assert little_judge.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in little_judge.state_dict().items())
    assert predict(loaded, few[1]) == predict(little_judge, few[1])
    with pytest.raises(FileExistsError):
        save_judge(little_judge, path)


LOAD_ERRORS = {
    "not a judge": "not a judge file",
    "other attributes": "other attribute values",
    "unexpected": "key 'extra' is unexpected",
    "mis-shaped": r"key 'heads.color.bias' has shape \[3\], expected \[12\]",
    "missing": r"missing key 'heads.size.weight' for the judge \(1 missing in all\)",
}


@pytest.mark.parametrize("case", LOAD_ERRORS)
def test_load_errors_are_one_line(tmp_path, case):
    good = tmp_path / "good.safetensors"
    save_judge(Judge(), good)
    tensors, metadata = {k: v.clone() for k, v in read_state_dict(good).items()}, read_metadata(good)
    if case == "not a judge":
        metadata["format"] = "something else"
    elif case == "other attributes":
        metadata["attributes"] = "{}"
    elif case == "unexpected":
        tensors["extra"] = torch.zeros(1)
    elif case == "mis-shaped":
        tensors["heads.color.bias"] = torch.zeros(3)
    else:
        del tensors["heads.size.weight"]
    path = tmp_path / "bad.safetensors"
    save_safetensors(tensors, path, metadata)
    with pytest.raises(CheckpointError, match=LOAD_ERRORS[case]) as error:
        load_judge(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_load_refuses_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "judge.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_judge(path)
