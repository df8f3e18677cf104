"""Each package's wheel installs and imports alone in an empty virtual environment: per-package pip installs
really work, and each package declares every dependency it imports (a missing one fails here, not for a user).

What every environment needs besides the package under test is installed once and shared through a .pth file (a
line naming a folder puts that folder on sys.path, where pip and imports find what it holds, as if installed in
the environment itself): the pinned torch, and for train, export and serve, bidir-core with what it pulled in. So
each environment holds what `pip install torch==2.13.0 ./packages/core ./packages/NAME` gives it, and its pip
install resolves what that package alone declares; unpacking torch four times and core's dependencies three times
over would test nothing more."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> its console scripts, each run with --help in the fresh environment
PACKAGES = {
    "core": ["bidir-convert", "bidir-eval"],
    "train": ["bidir-train", "bidir-mine", "bidir-rescore", "bidir-synth"],
    "export": ["export-onnx", "export-trt"],
    "serve": ["batch-embed"],
}
# The environments see nothing of this one: not its PYTHONPATH either (a source checkout on it would stand in for
# the wheels under test).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(*argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, env=ENV, **kwargs)


def _environment(path: Path, *shared: Path) -> tuple[Path, Path]:
    """A fresh virtual environment that also reads the `shared` site-packages folders; returns its python and its
    own site-packages."""
    venv.create(path, with_pip=True)
    python = path / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run(python, "-c", code, capture_output=True, text=True).stdout.strip())
    if shared:
        (site / "shared.pth").write_text("".join(f"{s}\n" for s in shared))
    return python, site


def _install(python: Path, *args) -> None:
    constraints = ROOT / "constraints.txt"
    _run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", constraints, *args)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    folders = [ROOT / "packages" / name for name in PACKAGES]
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, *folders)
    return out


@pytest.fixture(scope="module")
def torch_site(tmp_path_factory) -> Path:
    """The pinned CPU torch (an unpinned torch is the CUDA build), the READMEs' first requirement beside every
    package, alone in an environment: its site-packages."""
    python, site = _environment(tmp_path_factory.mktemp("torch") / "venv")
    _install(python, "torch==2.13.0")
    return site


@pytest.fixture(scope="module")
def core_env(tmp_path_factory, wheels, torch_site) -> tuple[Path, Path]:
    """bidir-core's wheel installed alone (beside the pinned torch): the environment test_wheel_installs_alone[core]
    checks, whose site-packages the other packages' environments read. Returns the environment and that folder."""
    env = tmp_path_factory.mktemp("core") / "venv"
    python, site = _environment(env, torch_site)
    _install(python, next(wheels.glob("bidir_core-*.whl")))
    return env, site


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_wheel_installs_alone(name, wheels, torch_site, core_env, tmp_path):
    env, core_site = core_env
    python = env / "bin" / "python"
    if name != "core":
        env = tmp_path / "venv"
        python, _ = _environment(env, core_site, torch_site)
        _install(python, next(wheels.glob(f"bidir_{name}-*.whl")))  # pip finds bidir-core and torch there
    _run(python, "-c", f"import bidir_{name}, bidir_core; print(bidir_{name}.__version__)")
    if name == "train":
        _run(python, "-m", "bidir_train", "--help", capture_output=True)
    for script in PACKAGES[name]:
        _run(env / "bin" / script, "--help", capture_output=True)
    installed = _run(python, "-m", "pip", "list", capture_output=True, text=True).stdout
    others = {f"bidir-{n}" for n in PACKAGES} - {"bidir-core", f"bidir-{name}"}
    assert not [line for line in installed.splitlines() if line.split(" ")[0] in others]
