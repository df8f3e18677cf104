"""Each package's wheel installs and imports alone in an empty virtual environment: per-package pip installs
really work, and each package declares every dependency it imports (a missing one fails here, not for a user)."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> its console scripts, each run with --help in the fresh environment
PACKAGES = {
    "core": ["bidir-convert", "bidir-eval"],
    "train": ["bidir-train", "bidir-mine"],
    "export": ["export-onnx", "export-trt"],
    "serve": ["batch-embed"],
}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    for name in PACKAGES:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, ROOT / "packages" / name],
            check=True,
        )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_wheel_installs_alone(name, wheels, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    wanted = [next(wheels.glob("bidir_core-*.whl"))]
    if name != "core":
        wanted.append(next(wheels.glob(f"bidir_{name}-*.whl")))
    pip = [
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        "-c",
        ROOT / "constraints.txt",
    ]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel; an unpinned torch is the CUDA build
    subprocess.run([*pip, *wanted], check=True)
    subprocess.run(
        [python, "-c", f"import bidir_{name}, bidir_core; print(bidir_{name}.__version__)"], check=True
    )
    if name == "train":
        subprocess.run([python, "-m", "bidir_train", "--help"], check=True, capture_output=True)
    for script in PACKAGES[name]:
        subprocess.run([env / "bin" / script, "--help"], check=True, capture_output=True)
    installed = subprocess.run(
        [python, "-m", "pip", "list"], capture_output=True, text=True, check=True
    ).stdout
    others = {f"bidir-{n}" for n in PACKAGES} - {"bidir-core", f"bidir-{name}"}
    assert not [line for line in installed.splitlines() if line.split(" ")[0] in others]
