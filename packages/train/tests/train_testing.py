"""Helpers for the bidir-train tests: a run's recipe arguments, the run in this process or under torchrun, its
losses and final weights, and a free port for a process group."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from bidir_train import load_recipe, train

RESUMABLE = ("schedule.max_steps=4", "checkpoint.every_steps=1")
"""4 steps and a checkpoint after each: a run the resume tests stop, damage and restart."""


def recipe_args(model, data, out, *extra: str, recipe: str = "tiny") -> list[str]:
    """The arguments of a run of `recipe` on model folder `model` and data.train `data`, writing into `out`, with the
    overrides `extra`: what train_recipe and torchrun_train take."""
    return [recipe, f"model.path={model}", f"data.train={data}", f"logging.output_dir={out}", *extra]


def train_recipe(args: list[str]) -> dict:
    """train() on the recipe args[0] with the overrides args[1:], in this process; returns its summary."""
    return train(load_recipe(args[0], args[1:]))


def stopped_run(model, data, out, step: int, *extra: str) -> list[str]:
    """A RESUMABLE run into `out`, stopped after `step` (its checkpoint written); returns the arguments that resume
    it."""
    args = recipe_args(model, data, out, *RESUMABLE, *extra)
    train_recipe([*args, f"schedule.stop_at_step={step}"])
    return args


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


def assert_same_final(a: Path, b: Path, atol: float | None = None) -> None:
    """The final/model.safetensors of runs a and b hold the same tensors: bit for bit (atol None), or within atol."""
    wa, wb = (load_file(out / "final" / "model.safetensors") for out in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:
        if atol is None:
            assert torch.equal(wa[key], wb[key]), key
        else:
            torch.testing.assert_close(
                wb[key], wa[key], rtol=0, atol=atol, msg=lambda m, key=key: f"{key}: {m}"
            )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a test's own process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
