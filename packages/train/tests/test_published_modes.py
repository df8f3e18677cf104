"""What a training run publishes (checkpoints, final/, recipe.json) is readable as any file the user writes."""

from __future__ import annotations

import os
import stat

from train_testing import train_recipe


def test_a_runs_folders_and_files_get_the_umasks_modes(tiny_args, tmp_path):
    # Regression: checkpoint folders were 0700 and model.safetensors, the RNG files and trainer_state.json 0600,
    # so a run's output could not be served or evaluated by another user.
    out = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        train_recipe(tiny_args(out, "checkpoint.every_steps=2"))
    finally:
        os.umask(previous)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert "final/model.safetensors" in modes and "checkpoints/step-00000004/trainer_state.json" in modes
    assert "checkpoints/step-00000004/rng-rank0.safetensors" in modes
    wrong = {
        name: oct(mode) for name, mode in modes.items() if mode != (0o755 if (out / name).is_dir() else 0o644)
    }
    assert wrong == {}
