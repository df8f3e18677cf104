"""The torch and onnxruntime backends give BiEncoder.encode's embeddings from token rows (the torch backend packs
them itself: nothing pads for it); auto picks by artifact.

Tolerance 1e-4: both run the same fp32 model on CPU; onnxruntime fuses and reorders ops (differences ~1e-6), and
anything near 1e-4 would mean a wrong pooling, mask or normalization rather than rounding.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from batch_testing import numbered_texts, write_jsonl
from server_testing import call, serving

# imported so that the no-padding test below finds every module of batch-embed and the server in sys.modules
import bidir_serve.batch.engine  # noqa: F401
import bidir_serve.server.app  # noqa: F401
from bidir_core import BidirError
from bidir_core.batching import pad_batch
from bidir_core.encoder import BiEncoder
from bidir_core.packed import PackedBatch, pack_padded
from bidir_core.tokenization import tokenize
from bidir_serve import BatchEmbedConfig, embed_corpus
from bidir_serve.backends import Padded, load_backend, model_kind
from bidir_serve.backends.base import CPU_MAX_PADDING
from bidir_serve.backends.onnxruntime import OnnxRuntimeBackend
from bidir_serve.batch_embed import main

ATOL = 1e-4


def _embed_all(backend, texts, batch_size=7):
    ids, _ = tokenize(backend.tokenizer, texts, backend.config.max_length)
    out = []
    for i in range(0, len(ids), batch_size):  # input order: rows of very different lengths share a batch
        rows = ids[i : i + batch_size]
        emb = backend.embed(backend.prepare(rows))
        assert isinstance(emb, np.ndarray) and emb.dtype == np.float32 and emb.shape[0] == len(rows)
        out.append(emb)
    return np.concatenate(out)


@pytest.mark.parametrize("dim", [None, 16])
def test_torch_backend_matches_encode(tiny_checkpoint, encoder, texts, dim):
    backend = load_backend(tiny_checkpoint, "torch", dim=dim, device="cpu")
    assert backend.name == "torch" and backend.precision == "fp32" and backend.dim == (dim or 64)
    with pytest.warns(UserWarning, match="truncated"):
        expected = encoder.encode(texts, dim=dim)
    np.testing.assert_allclose(_embed_all(backend, texts), expected, atol=ATOL, rtol=0)


def test_torch_backend_packed_equals_padded(tiny_checkpoint, encoder, texts):
    """The backend's packed batches (no padding: the stream a right or left padded batch unpads to) give the padded
    forward's embeddings."""
    packed = load_backend(tiny_checkpoint, "torch", device="cpu")
    assert packed.packed  # the CPU default
    padded = load_backend(tiny_checkpoint, "torch", device="cpu")
    padded.packed = False
    with pytest.warns(UserWarning, match="truncated"):
        expected = encoder.encode(texts, packed=False)
    np.testing.assert_allclose(_embed_all(padded, texts), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_embed_all(packed, texts), expected, atol=1e-5, rtol=0)
    ids, _ = tokenize(packed.tokenizer, texts[:5], packed.config.max_length)
    prepared = packed.prepare(ids)
    assert isinstance(prepared, PackedBatch) and prepared.num_tokens == sum(map(len, ids))
    for side in ("right", "left"):
        unpadded = pack_padded(*pad_batch(ids, packed.tokenizer.pad_token_id, padding_side=side))
        assert prepared.lengths == unpadded.lengths
        for name in ("input_ids", "cu_seqlens", "position_ids"):
            assert torch.equal(getattr(prepared, name), getattr(unpadded, name))
    np.testing.assert_allclose(packed.embed(prepared), expected[:5], atol=1e-5, rtol=0)
    right = padded.prepare(ids)  # (5, T) right-padded with the pad id
    assert isinstance(right, Padded)
    want = pad_batch(ids, packed.tokenizer.pad_token_id)
    assert torch.equal(right.input_ids, want[0]) and torch.equal(right.attention_mask, want[1])


def test_torch_backend_receives_token_rows_never_a_padded_batch(
    tiny_checkpoint, texts, tmp_path, monkeypatch
):
    """batch-embed and the server hand the torch backend token rows; on CPU it packs them, so its encoder only ever
    sees packed batches and nothing pads for it."""
    seen = []
    forward = BiEncoder.forward

    def spy(self, inputs, *args, **kwargs):
        seen.append(type(inputs))
        return forward(self, inputs, *args, **kwargs)

    def no_padding(*args, **kwargs):
        raise AssertionError("a batch for the torch backend was padded")

    monkeypatch.setattr(BiEncoder, "forward", spy)
    for name, module in list(sys.modules.items()):  # every name pad_batch is bound to in bidir_serve
        if name.startswith("bidir_serve") and hasattr(module, "pad_batch"):
            monkeypatch.setattr(module, "pad_batch", no_padding)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    with pytest.warns(UserWarning, match="truncated"):
        cfg = BatchEmbedConfig(str(tiny_checkpoint), str(inp), str(tmp_path / "out"), device="cpu", window=16)
        assert embed_corpus(cfg).complete
    batches = len(seen)
    assert batches >= 4
    with serving(tiny_checkpoint, device="cpu") as r:
        status, _ = call(r.url, "POST", "/v1/embeddings", {"input": [[1, 5, 6], [1, 22, 31, 40, 9], [3]]})
        assert status == 200
    assert len(seen) >= batches + 2  # the warm-up and the request
    assert set(seen) == {PackedBatch}


@pytest.mark.parametrize("with_dims", [False, True])
@pytest.mark.parametrize("dim", [None, 16])
def test_onnxruntime_backend_matches_encode(onnx_export, encoder, texts, with_dims, dim):
    folder = onnx_export(with_dims)
    backend = load_backend(folder, "onnxruntime", dim=dim, device="cpu")
    assert backend.name == "onnxruntime" and backend.dim == (dim or 64)
    with pytest.warns(UserWarning, match="truncated"):
        expected = encoder.encode(texts, dim=dim)
    got = _embed_all(backend, texts)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_padded_backend_on_cpu_gets_batches_of_like_lengths(
    onnx_export, tiny_checkpoint, texts, tmp_path, monkeypatch
):
    """A backend that pads bounds its batches' padding on CPU (CPU_MAX_PADDING), and batch-embed and the server both
    cut their batches by it; a packing backend has nothing to bound."""
    folder = onnx_export(False)
    backend = load_backend(folder, "onnxruntime", device="cpu")
    assert backend.max_padding == CPU_MAX_PADDING
    torch_backend = load_backend(tiny_checkpoint, "torch", device="cpu")
    assert torch_backend.max_padding is None  # packs on CPU
    torch_backend.packed = False
    assert torch_backend.max_padding == CPU_MAX_PADDING
    batches = []
    prepare = OnnxRuntimeBackend.prepare

    def spy(self, rows):
        batches.append([len(r) for r in rows])
        return prepare(self, rows)

    monkeypatch.setattr(OnnxRuntimeBackend, "prepare", spy)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts * 3)))
    with pytest.warns(UserWarning, match="truncated"):
        assert embed_corpus(
            BatchEmbedConfig(str(folder), str(inp), str(tmp_path / "out"), device="cpu")
        ).complete
    with serving(folder, device="cpu") as r:
        # one request whose rows, as one batch, would be 47 % padding
        rows = [[1] + [7] * n for n in (2, 40, 3, 38, 5, 36)]
        status, _ = call(r.url, "POST", "/v1/embeddings", {"input": rows})
        assert status == 200
    assert [41, 39, 37, 6] in batches and any(len(b) > 4 for b in batches)
    for b in batches:
        assert sum(b) >= (1 - CPU_MAX_PADDING) * len(b) * max(b), b


def test_auto_rule(tiny_checkpoint, onnx_export):
    assert model_kind(tiny_checkpoint).kind == "checkpoint"
    assert load_backend(tiny_checkpoint).name == "torch"
    assert load_backend(onnx_export(False)).name == "onnxruntime"
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    auto = load_backend(tiny_checkpoint)
    assert auto.device.type == expected_device
    assert auto.precision == ("bf16" if expected_device == "cuda" else "fp32")


def test_truncated_onnx_model_is_one_line(onnx_export, tmp_path, capsys):
    folder = shutil.copytree(onnx_export(), tmp_path / "onnx")
    model = folder / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    inp = write_jsonl(tmp_path / "in.jsonl", numbered_texts(3))
    assert (
        main(["--model", str(folder), "--input", str(inp), "--output", str(tmp_path / "o"), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.onnx: onnxruntime cannot load it" in err


def test_backend_artifact_mismatch(tiny_checkpoint, onnx_export):
    with pytest.raises(
        BidirError, match="the torch backend needs a checkpoint, this is an ONNX export folder"
    ):
        load_backend(onnx_export(False), "torch")
    with pytest.raises(
        BidirError, match="the onnxruntime backend needs an ONNX export folder, this is a checkpoint"
    ):
        load_backend(tiny_checkpoint, "onnxruntime")
    missing = tiny_checkpoint.parent / "engines" / "1b"  # e.g. an engine that was never built
    with pytest.raises(
        BidirError, match=r"engines/1b: no such folder \(the tensorrt backend needs a TensorRT engine"
    ):
        load_backend(missing, "tensorrt")
    with pytest.raises(BidirError, match="dim=65 is larger than the model's embedding size 64"):
        load_backend(tiny_checkpoint, "torch", dim=65)
    with pytest.raises(BidirError, match="backend must be one of"):
        load_backend(tiny_checkpoint, "tflite")


@pytest.mark.gpu
def test_torch_backend_cuda(tiny_checkpoint, encoder, texts, tmp_path):
    """On CUDA: fp32 equals the CPU encoder (1e-4: different kernels, same math); the default bf16 stays within
    cosine 0.99 (bf16 keeps ~3 significant digits); batch-embed's pinned, non-blocking path gives the same rows."""
    import json

    from bidir_core.embeddings_artifact import read_embeddings
    from bidir_serve import BatchEmbedConfig, embed_corpus

    with pytest.warns(UserWarning, match="truncated"):
        expected = encoder.encode(texts)
    fp32 = load_backend(tiny_checkpoint, "torch", device="cuda", precision="fp32")
    assert fp32.prepare([[1, 5, 9], [1, 22]]).input_ids.is_pinned()
    np.testing.assert_allclose(_embed_all(fp32, texts), expected, atol=ATOL, rtol=0)
    bf16 = load_backend(tiny_checkpoint, device="cuda")
    assert bf16.precision == "bf16"
    got = _embed_all(bf16, texts)
    assert (np.sum(got * expected, axis=1) >= 0.99).all()
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    with pytest.warns(UserWarning, match="truncated"):
        cfg = BatchEmbedConfig(
            str(tiny_checkpoint), str(inp), str(tmp_path / "out"), device="cuda", precision="fp32"
        )
        embed_corpus(cfg)
    with pytest.warns(UserWarning, match="truncated"):
        docs = encoder.encode_documents(texts)
    np.testing.assert_allclose(read_embeddings(tmp_path / "out").embeddings(), docs, atol=ATOL, rtol=0)
