"""The attention benchmark runs on a machine without a GPU and says what it measured."""
import json
import subprocess
import sys

import torch


def test_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.attention", "--cpu-reps", "1", "--image-tokens", "4",
                             "--no-naive", "--no-plot", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    if not torch.cuda.is_available():
        assert "reference paths only" in result.stdout
    assert json.loads(out.read_text())
