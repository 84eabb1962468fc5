"""The attention benchmark runs on a machine without a GPU and says what it measured."""
import json
import subprocess
import sys

import torch
from PIL import Image


def test_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.attention", "--cpu-reps", "1", "--image-tokens", "4",
                             "--no-naive", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    if not torch.cuda.is_available():
        assert "reference paths only" in result.stdout
    cases = json.loads(out.read_text())["cases"]
    assert [(c["len_q"], c["head_dim"], c["layers"]) for c in cases] == [(4096, 40, 5), (1024, 80, 5), (256, 160, 5),
                                                                         (64, 160, 1)]
    with Image.open(out.with_suffix(".png")) as plot:  # matplotlib comes with the [test] extra
        assert plot.width > 500


def test_fused_reporting_runs_without_a_gpu():
    """The half of the benchmark that otherwise runs only on a GPU — fused timings, speedup,
    difference from two SDPA, per-UNet totals, tuning — driven on a small shape (the kernel
    through the Triton interpreter on CPU) with the CPU timer."""
    from benchmarks import attention as bench
    device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = ["fused", "two_sdpa"]
    timer = lambda fn: bench.time_cpu_us(fn, 1)  # noqa: E731
    row = bench.measure_case("fp32", 64, 2, 40, 4, methods, device, timer, 0.7, layers=5)
    assert row["max_abs_diff_fused_vs_two_sdpa"] < 1e-5  # fp32 kernel tolerance (test_kernel.py)
    assert row["speedup_fused_vs_two_sdpa"] == row["results"]["two_sdpa"]["us"] / row["results"]["fused"]["us"]
    assert "×" in bench.format_row(row, methods)
    (total,) = bench.per_unet_call([row], methods)
    assert total["us_per_unet_call"]["fused"] == 5 * row["results"]["fused"]["us"]
    inputs = bench.unet_layout_inputs(64, 2, 40, 4, torch.float32, device)
    tried = bench.tune(*inputs, 0.7, timer, grid=bench.TUNE_GRID[:3])
    assert len(tried) == 3 and all(r["us"] is not None for r in tried), tried
