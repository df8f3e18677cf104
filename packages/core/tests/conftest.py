"""Shared fixtures: those of bidir_core.pytest_plugin (an isolated model cache, hardware markers, the embedded
default), a tiny encoder, and model sources written once that a test may copy and damage."""

from __future__ import annotations

import shutil

import pytest

from bidir_core.pytest_plugin import *  # noqa: F403 (the cache, hardware skips, embedded default: see there)
from bidir_core.testing import tiny_encoder, write_hf_llama


@pytest.fixture(scope="module")
def encoder():
    return tiny_encoder()


@pytest.fixture(scope="session")
def hf_source(tmp_path_factory):
    """A stock LlamaForCausalLM folder (config.json, model.safetensors, tokenizer), written once."""
    return write_hf_llama(tmp_path_factory.mktemp("sources") / "hf")


@pytest.fixture
def hf_copy(hf_source, tmp_path):
    """A private copy of the source folder that a test may damage."""
    return shutil.copytree(hf_source, tmp_path / "model")


@pytest.fixture(scope="session")
def bidir_source(tmp_path_factory):
    """A bidir checkpoint (with bidir.json), written once."""
    return tiny_encoder().save_pretrained(tmp_path_factory.mktemp("sources") / "bidir")


@pytest.fixture
def bidir_copy(bidir_source, tmp_path):
    return shutil.copytree(bidir_source, tmp_path / "bidir")
