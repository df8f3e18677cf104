"""The model on CUDA: same results as on CPU (fp32), close in bf16, and no NaN from padding-only rows."""

from __future__ import annotations

import pytest
import torch

from bidir_core import EncoderConfig
from bidir_core.batching import pad_batch
from bidir_core.testing import tiny_encoder

pytestmark = pytest.mark.gpu

TEXTS = ["a short one", "the quick brown fox jumps over the lazy dog, twice over", "embeddings", ""]


def _batch(padding_side: str):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (40, 17, 5)] + [
        []
    ]  # last: padding only
    return pad_batch(rows, pad_id=0, padding_side=padding_side)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_cuda_fp32_matches_cpu(padding_side, monkeypatch):
    # CUDA matmuls may use TF32 when allowed; 1e-4 covers fp32 kernels with a different reduction order.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    encoder = tiny_encoder()
    ids, mask = _batch(padding_side)
    with torch.no_grad():
        cpu = encoder(ids, mask)
        gpu = encoder.to("cuda")(ids.cuda(), mask.cuda()).cpu()
    assert torch.isfinite(gpu).all()
    assert torch.allclose(gpu, cpu, atol=1e-4)


@pytest.mark.parametrize("pooling", ["avg", "cls", "last", "weighted_avg"])
def test_cuda_bf16_close_to_fp32(pooling):
    encoder = tiny_encoder(EncoderConfig(pooling=pooling))
    want = encoder.encode(TEXTS[:3])
    encoder = encoder.to(device="cuda", dtype=torch.bfloat16)
    got = encoder.encode(TEXTS[:3])
    # bf16 keeps ~3 significant digits; on normalized vectors cosine >= 0.99 is the parity that matters.
    assert (got * want).sum(axis=1).min() > 0.99


def test_cuda_encode_batch_invariance_bf16():
    encoder = tiny_encoder().to(device="cuda", dtype=torch.bfloat16)
    together = encoder.encode(TEXTS[:3], batch_size=3)
    for i, text in enumerate(TEXTS[:3]):
        alone = encoder.encode([text])[0]
        assert float(alone @ together[i]) > 0.999


def test_bidir_eval_runs_on_the_gpu_by_default(tmp_path):
    import json

    from bidir_core.eval_cli import main

    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = ["sort a list in place", "open a file for reading", "parse json text", "start a new thread"]
    rows = [json.dumps({"_id": f"d{i}", "title": "", "text": t}) for i, t in enumerate(docs)]
    (folder / "corpus.jsonl").write_text("\n".join(rows) + "\n")
    rows = [json.dumps({"_id": f"q{i}", "text": t}) for i, t in enumerate(["how to sort", "read a file"])]
    (folder / "queries.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\n")
    checkpoint = tiny_encoder().save_pretrained(tmp_path / "tiny")
    reports = {}
    for device in ([], ["--device", "cpu"]):
        out = tmp_path / f"r{len(device)}.json"
        argv = [str(checkpoint), "--retrieval", str(folder), "--json", str(out), "--no-progress", *device]
        assert main(argv) == 0
        reports[device[-1] if device else "default"] = json.loads(out.read_text())
    assert reports["default"]["device"] == "cuda" and reports["cpu"]["device"] == "cpu"
    assert reports["default"]["metrics"] == pytest.approx(reports["cpu"]["metrics"], abs=1e-6)
