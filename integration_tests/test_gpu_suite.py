"""benchmarks/gpu_suite.sh runs on a machine without CUDA (so it is tested before a GPU is at hand): it exits 0
and its summary names every row, saying which were skipped and why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run the suite itself")
def test_gpu_suite_runs_without_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", ROOT / "benchmarks" / "gpu_suite.sh"], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.split("== summary")[-1]
    for row in (
        "gpu/tensorrt tests",
        "inference 64x512 bf16",
        "train step 1B seq 512",
        "inference mixed corpus packed vs padded",
        "TensorRT vs torch bf16",
    ):
        assert row in summary
    assert "0 failed" in summary and summary.count("skipped (no") == 4
