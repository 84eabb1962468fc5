"""The attention benchmark runs on a machine without a GPU and says what it measured."""
import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

import kernel_spy
from ipadapter_min.benchmarks import attention as bench


@pytest.mark.slow  # a whole benchmark run
def test_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "-m", "ipadapter_min.benchmarks.attention", "--cpu-reps", "1", "--image-tokens", "4",
                             "--no-naive", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    cases = json.loads(out.read_text())["cases"]
    if not torch.cuda.is_available():
        assert "reference paths only" in result.stdout
        # without CUDA the kernel is not timed (its interpreter is no timing), and --no-naive held
        assert all(set(c["results"]) == {"two_sdpa"} and "speedup_fused_vs_two_sdpa" not in c for c in cases)
    # SD1.5 at 512×512: 5 cross-attention layers each at 64², 32², 16² latents (2 down + 3 up), 1 mid at 8²
    assert [(c["len_q"], c["head_dim"], c["layers"]) for c in cases] == [(4096, 40, 5), (1024, 80, 5), (256, 160, 5),
                                                                         (64, 160, 1)]
    with Image.open(out.with_suffix(".png")) as plot:  # matplotlib comes with the [test] extra
        assert plot.width > 500


# ----------------------------------------------------------------------------- the GPU half
# The fused timings, speedup, difference from two SDPA, per-UNet totals and tuning otherwise run
# only on a GPU. Here they run on small shapes (the kernel through the Triton interpreter on CPU)
# with a scripted timer: it runs the function it is given once, finds out what that was (which
# implementation, on which shape; for the kernel, the launch itself), and returns a time the test
# chose. Every expected number below follows from those chosen times by hand, not from the
# benchmark's own outputs.

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def launches(monkeypatch) -> kernel_spy.KernelLaunches:
    return kernel_spy.spy_on_kernel(monkeypatch)


class ScriptedTimer:
    """``timer(fn)`` for ``measure_case``: runs ``fn`` once; ``times(method, q, k_image)`` gives
    the µs to report. Also checks that timing "fused" launched the kernel once and the others
    never did."""

    def __init__(self, monkeypatch, launches, times):
        self.launches, self.times = launches, times
        self.timed, self.calls = [], []  # methods in timing order; (method, inputs, λ) per call
        for name, fn in list(bench.IMPLEMENTATIONS.items()):
            monkeypatch.setitem(bench.IMPLEMENTATIONS, name, self._recording(name, fn))

    def _recording(self, name, fn):
        def run(q, kt, vt, ki, vi, lam, *rest):
            self.calls.append((name, (q, kt, vt, ki, vi), lam))
            return fn(q, kt, vt, ki, vi, lam, *rest)
        return run

    def __call__(self, fn):
        n_calls, n_launches = len(self.calls), len(self.launches)
        fn()
        (call,) = self.calls[n_calls:]
        name, (q, _, _, ki, _), _ = call
        assert len(self.launches) - n_launches == (1 if name == "fused" else 0), name
        self.timed.append(name)
        return self.times(name, q, ki)


def reference64(q, kt, vt, ki, vi, lam):
    def attention(k, v):
        w = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        return w @ v.double()
    return attention(kt, vt) + lam * attention(ki, vi)


def test_measure_case_reports_the_timed_numbers(monkeypatch, launches):
    times = {"fused": 20.0, "two_sdpa": 50.0, "naive": 80.0}
    timer = ScriptedTimer(monkeypatch, launches, lambda name, q, ki: times[name])
    methods = ["fused", "two_sdpa", "naive"]
    row = bench.measure_case("fp32", 64, 2, 40, 4, methods, DEVICE, timer, 0.7, peak=2.0, layers=5)
    assert timer.timed == methods
    # every implementation got the same inputs, at the stated shape and λ
    inputs = timer.calls[0][1]
    assert all(all(a is b for a, b in zip(other, inputs)) and lam == 0.7 for _, other, lam in timer.calls)
    q, kt, vt, ki, vi = inputs
    assert [tuple(t.shape) for t in inputs] == [(2, 2, 64, 40), (2, 2, 77, 40), (2, 2, 77, 40),
                                                (2, 2, 4, 40), (2, 2, 4, 40)]
    # the memory floor, counted here tensor by tensor: read Q, K_t, V_t, K_i, V_i, write O (Q's size)
    moved = sum(t.numel() * t.element_size() for t in inputs) + q.numel() * q.element_size()
    assert moved == 185_600 and row["floor_bytes"] == moved
    # 185,600 B in 20 / 50 / 80 µs: 9.28 / 3.712 / 2.32 GB/s, of 2 TB/s: 0.464 / 0.1856 / 0.116 %
    expected = {"fused": (20.0, 9.28, 0.464), "two_sdpa": (50.0, 3.712, 0.1856), "naive": (80.0, 2.32, 0.116)}
    for m, (us, gbps, pct) in expected.items():
        r = row["results"][m]
        assert (r["us"], r["gb_per_s"], r["pct_peak"]) == (us, pytest.approx(gbps), pytest.approx(pct)), m
    assert row["speedup_fused_vs_two_sdpa"] == pytest.approx(2.5)  # 50 µs / 20 µs
    line = bench.format_row(row, methods)
    assert "2.50×" in line and "20.0" in line and "9.3" in line and "0.5%" in line, line

    # without a known peak and without the kernel: no percentage, no speedup
    row = bench.measure_case("fp32", 64, 2, 40, 4, ["two_sdpa"], DEVICE, timer, 0.7, peak=None)
    assert row["results"]["two_sdpa"]["pct_peak"] == "unknown"
    assert "speedup_fused_vs_two_sdpa" not in row and "max_abs_diff_fused_vs_two_sdpa" not in row


def test_reported_difference_is_fused_vs_two_sdpa(monkeypatch, launches):
    """max |fused − two_sdpa|: small for the real kernel (both within the fp32 tolerance of an
    fp64 reference), and equal to an error planted in either side."""
    timer = lambda fn: 1.0  # noqa: E731  (the difference is computed outside the timer)
    shape = (32, 2, 40, 16)  # len_q, heads, head dim, image tokens
    inputs = bench.unet_layout_inputs(*shape, torch.float32, DEVICE)  # the benchmark's inputs (seed 0)
    ref = reference64(*inputs, 0.7)
    tol = 1e-5 + 1e-5 * ref.abs().max().item()  # fp32 tolerance (tests/test_kernel.py)
    for name in ("fused", "two_sdpa"):
        out = getattr(bench, name)(*inputs, 0.7)
        assert (out.double() - ref).abs().max().item() <= tol, name
    # λ = 0.7 on one side and 1 on the other would differ by 0.3·|image branch|, far above 2·tol
    assert 0.3 * (ref - reference64(*inputs, 0.0)).abs().max().item() > 100 * tol

    row = bench.measure_case("fp32", *shape, ["fused", "two_sdpa"], DEVICE, timer, 0.7)
    assert row["max_abs_diff_fused_vs_two_sdpa"] <= 2 * tol

    def planted(fn, delta):
        def wrong(*args, **kwargs):
            out = fn(*args, **kwargs).clone()
            out[1, 1, 5, 7] += delta
            return out
        return wrong

    for side, delta in (("fused", 0.25), ("two_sdpa", -0.5)):
        with monkeypatch.context() as m:
            m.setattr(bench, side, planted(getattr(bench, side), delta))
            row = bench.measure_case("fp32", *shape, ["fused", "two_sdpa"], DEVICE, timer, 0.7)
        assert abs(row["max_abs_diff_fused_vs_two_sdpa"] - abs(delta)) <= 2 * tol, (side, row)


def test_per_unet_call_sums_layers_per_dtype_and_image_tokens(monkeypatch, launches):
    # µs (fused, two_sdpa) per (dtype, len_q, image tokens); len_q 32 stands for a 5-layer shape,
    # 16 for a 1-layer one
    times = {("fp32", 32, 4): (20.0, 50.0), ("fp32", 16, 4): (30.0, 10.0),
             ("fp32", 32, 16): (40.0, 60.0), ("fp32", 16, 16): (100.0, 450.0),
             ("fp16", 16, 4): (7.0, 21.0)}
    dtype_names = {torch.float32: "fp32", torch.float16: "fp16"}
    timer = ScriptedTimer(monkeypatch, launches, lambda name, q, ki: times[
        dtype_names[q.dtype], q.shape[2], ki.shape[2]][["fused", "two_sdpa"].index(name)])
    methods = ["fused", "two_sdpa"]
    rows = [bench.measure_case(dt, lq, 1, 16, li, methods, DEVICE, timer, 1.0, layers={32: 5, 16: 1}[lq])
            for (dt, lq, li) in times]
    assert bench.per_unet_call(rows, methods) == [
        # 5·20 + 30 = 130 and 5·50 + 10 = 260 µs
        dict(dtype="fp32", image_tokens=4, us_per_unet_call={"fused": 130.0, "two_sdpa": 260.0},
             speedup_fused_vs_two_sdpa=pytest.approx(2.0)),
        # 5·40 + 100 = 300 and 5·60 + 450 = 750 µs
        dict(dtype="fp32", image_tokens=16, us_per_unet_call={"fused": 300.0, "two_sdpa": 750.0},
             speedup_fused_vs_two_sdpa=pytest.approx(2.5)),
        dict(dtype="fp16", image_tokens=4, us_per_unet_call={"fused": 7.0, "two_sdpa": 21.0},
             speedup_fused_vs_two_sdpa=pytest.approx(3.0)),
    ]


def test_tune_ranks_configs_by_their_time_and_records_what_ran(launches):
    grid = [dict(block_m=16, block_n_text=16, num_warps=4, num_stages=1),
            dict(block_m=32, block_n_text=32, num_warps=8, num_stages=2),
            dict(block_m=64, block_n_text=16, num_warps=4, num_stages=3),
            dict(block_m=128, block_n_text=32, num_warps=8, num_stages=1)]
    us_by_block_m = {16: 90.0, 32: 30.0, 128: 60.0}  # block_m 64 fails, as a config too big for a GPU would

    def timer(fn):
        n = len(launches)
        fn()
        (launch,) = launches.launches[n:]
        block_m = launch.kwargs["BLOCK_M"]
        if block_m not in us_by_block_m:
            raise RuntimeError("out of resources")
        return us_by_block_m[block_m]

    inputs = bench.unet_layout_inputs(64, 1, 40, 4, torch.float32, DEVICE)
    tried = bench.tune(*inputs, 0.7, timer, grid=grid)
    assert [(r["config"]["block_m"], r["us"]) for r in tried] == [(32, 30.0), (128, 60.0), (16, 90.0), (64, None)]
    assert tried[-1]["error"] == "RuntimeError" and all("error" not in r for r in tried[:-1])
    # each config as launched: the grid's block/warp/stage values, and as recorded in the result
    assert len(launches) == len(grid)
    by_block_m = {r["config"]["block_m"]: r["config"] for r in tried}
    for g, launch in zip(grid, launches.launches):
        k = launch.kwargs
        assert (k["BLOCK_M"], k["BLOCK_NT"], k["num_warps"], k["num_stages"]) == tuple(g.values())
        assert k["BLOCK_NI"] == 16  # 4 image tokens: one block of the smallest size tl.dot takes
        assert by_block_m[k["BLOCK_M"]] == dict(block_m=k["BLOCK_M"], block_n_text=k["BLOCK_NT"],
                                                block_n_image=k["BLOCK_NI"], num_warps=k["num_warps"],
                                                num_stages=k["num_stages"])
