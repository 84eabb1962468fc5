"""The end-to-end benchmark (benchmarks/pipeline.py) and the GPU check script, on the CPU: tiny
runs that must say what they measured, with ours and diffusers' images alike."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ipadapter_min.benchmarks import pipeline as bench

pytestmark = pytest.mark.slow  # end-to-end benchmark runs, in subprocesses

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = ["--size", "small", "--resolution", "64", "--steps", "2", "--repeats", "1"]


def check_timings(run: dict, sides: set[str]) -> None:
    assert set(run["sides"]) == sides
    for name, r in run["sides"].items():
        assert 0 < r["best_s"] <= r["s_per_image"] and r["first_call_s"] > 0, name
        assert r["it_per_s"] == pytest.approx(2 / r["s_per_image"]), name  # 2 steps
        assert r["peak_memory_growth_bytes"] >= 0, name  # Linux: read from /proc
        assert r["image_std"] > 5, name  # a real image, not a flat one that any pipeline matches


def test_ours_against_diffusers_on_cpu(tmp_path, one_thread):
    out = tmp_path / "pipeline.json"
    result = bench.main([*SMALL_RUN, "--loading-repeats", "0", "--workdir", str(tmp_path / "weights"),
                         "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert (result["size"], result["resolution"], result["steps"], result["dtype"]) == ("small", 64, 2, "fp32")
    assert result["diffusers"] != "not installed" and result["loading"] == "skipped (--loading-repeats 0)"
    assert [(r["adapter"], r["compiled"]) for r in result["runs"]] == [(False, False), (True, False)]
    for run in result["runs"]:
        check_timings(run, {"ours", "diffusers"})
        assert run["max_pixel_diff_vs_diffusers"] <= 2
        assert run["speedup_vs_diffusers"] > 0
    assert (tmp_path / "weights" / "small" / "diffusers" / "unet").is_dir()
    with Image.open(out.with_suffix(".png")) as plot:
        assert plot.width > 300


def test_without_diffusers_transformers_and_open_clip(tmp_path):
    """As on a bare GPU machine: our side only, from weights our classes write, with the stand-in
    tokenizer; the loading figures for the formats that need no diffusers."""
    out = tmp_path / "pipeline.json"
    argv = [*SMALL_RUN, "--loading-repeats", "1", "--workdir", str(tmp_path / "weights"), "--out", str(out),
            "--no-plot"]
    code = ("import sys\n"
            "for name in ('diffusers', 'transformers', 'open_clip'):\n"
            "    sys.modules[name] = None  # import fails and find_spec says not installed\n"
            "from ipadapter_min.benchmarks.pipeline import main\n"
            f"main({argv!r})\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["diffusers"] == "not installed" and result["tokenizer"].startswith("stand-in")
    assert result["weights"].endswith("converted-fp32.safetensors")
    assert set(result["loading"]) == {"converted fp32 → fp32 (ours)", "converted fp16 → fp16 (ours)",
                                      "converted fp16 → fp32 (ours)"}  # single files: full size only
    assert all(r["touch_s"] > 0 and r["weights"] > 0 for r in result["loading"].values())
    for run in result["runs"]:
        check_timings(run, {"ours"})
        assert "max_pixel_diff_vs_diffusers" not in run


def test_gpu_check_script_parses_and_selects_the_cuda_tests(tmp_path):
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    run = subprocess.run(["bash", str(script), "--collect-only", str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ids = [line for line in run.stdout.splitlines() if "::" in line]
    names = {i.split("::")[1].split("[")[0] for i in ids}
    assert {"test_cuda_kernel_at_every_sd15_shape", "test_cuda_unet_step_fused_matches_reference_attention",
            "test_cuda_dispatch_uses_the_fused_kernel", "test_bf16_matches_fp64_reference",
            "test_sd15_head_dims_and_token_counts", "test_the_compiled_unet_runs_the_fused_operator_on_a_gpu",
            "test_a_denoising_step_replays_as_a_cuda_graph"} <= names
    assert sum("test_cuda_kernel_at_every_sd15_shape[" in i for i in ids) == 4 * 3 * 3  # shapes × tokens × dtypes
    lambda_zero = [i for i in ids if i.startswith("tests/test_lambda_zero.py")]
    assert lambda_zero and all("cuda" in i for i in lambda_zero)  # its CUDA parametrizations, not the CPU ones
    assert "test_default_configs_fit_every_gpu_arch" not in names  # CPU: compiles for the GPU archs
