"""Shared fixtures (bidir_core.pytest_plugin): an isolated model cache, hardware markers, the embedded default."""

from __future__ import annotations

from bidir_core.pytest_plugin import *  # noqa: F403 (the cache, hardware skips, embedded default: see there)
