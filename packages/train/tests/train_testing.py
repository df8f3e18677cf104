"""Helpers for the bidir-train tests: a recipe run in this process, the same under torchrun, its losses, and a free
port for a process group."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from bidir_train import load_recipe, train


def train_recipe(args: list[str]) -> dict:
    """train() on the recipe args[0] with the overrides args[1:], in this process; returns its summary."""
    return train(load_recipe(args[0], args[1:]))


def torchrun_train(nproc: int, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun -m bidir_train --config *args` on nproc CPU ranks (one thread each); with check, exit 0 is asserted
    (the failure shows the end of stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "bidir_train", "--config", *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def loss_curve(out: Path) -> list[float]:
    """The per-step losses of the run in out, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a test's own process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
