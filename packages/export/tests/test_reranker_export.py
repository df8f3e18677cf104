"""export-onnx of a reranker: the graph scores pairs as CrossEncoder does (pooling, head and temperature inside),
on batch and sequence sizes the export never saw, padded on either side; the manifest carries the reranker's
settings and template; --verify-only re-checks it; embedder-only options are refused in one line. A token-logit
reranker (bidir-convert --reranker --yes-token: last pooling, causal attention) exports too, and scores as the
causal LM's logit(yes) - logit(no).

Tolerance 1e-5 in fp32: onnxruntime CPU and PyTorch run the same fp32 math (the export's own check measured
~5e-7 on the tiny reranker); fp16 is held to the export's rule, which it records.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from export_testing import RERANKER_CONFIG, SMALL_VERIFY

from bidir_core.artifacts import read_manifest
from bidir_core.batching import pad_batch
from bidir_core.convert import main as convert_main
from bidir_core.cross_encoder import CrossEncoder
from bidir_core.testing import tiny_tokenizer, write_hf_model
from bidir_export import export_onnx
from bidir_export.cli import onnx_main, trt_main
from bidir_export.verification import VERIFICATION_PAIRS

ATOL = 1e-5
PAIRS = [
    ("how do i sort a list", "return a new sorted list from the items in iterable"),
    ("fox", "the quick brown fox jumps over the lazy dog " * 6),  # longer than max_length 64: cut
    ("a", "b"),
    ("bidirectional attention", "every token sees the past and the future"),
    ("dense retrieval", "embeddings for semantic search"),
]


def _ort_scores(folder, input_ids, attention_mask) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (scores,) = session.run(
        ["scores"], {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    )
    assert scores.dtype == np.float32 and scores.shape == (input_ids.shape[0],)
    return scores


@pytest.mark.parametrize("side", ["right", "left"])
def test_onnx_scores_equal_predict(reranker_export, tiny_reranker, side):
    folder = reranker_export("fp32")
    ce = CrossEncoder.from_pretrained(tiny_reranker).eval()
    with pytest.warns(UserWarning, match="truncated"):
        want = ce.predict(PAIRS)
    ids, _ = ce.tokenize_pairs(PAIRS)
    for start, stop in [(0, 5), (0, 1), (2, 4)]:  # 5 x 64, 1 x n, 2 x n: shapes the verification did not use
        input_ids, mask = pad_batch(ids[start:stop], ce.tokenizer.pad_token_id, side)
        got = _ort_scores(folder, input_ids, mask)
        np.testing.assert_allclose(got, want[start:stop], atol=ATOL, rtol=0)


def test_manifest_says_reranker_and_carries_the_template(reranker_export, tiny_reranker):
    folder = reranker_export("fp32")
    manifest = read_manifest(folder, "onnx")
    assert manifest.kind == "reranker" and manifest.encoder is None and manifest.reranker == RERANKER_CONFIG
    assert manifest.output == "scores" and manifest.inputs == ("input_ids", "attention_mask")
    assert manifest.hidden_size == 64 and manifest.source == str(tiny_reranker.absolute())
    raw = json.loads((folder / "manifest.json").read_text())
    assert raw["model_kind"] == "reranker" and raw["reranker"]["template"] == RERANKER_CONFIG.template
    result = manifest.verification
    assert result.passed and result.min_cosine is None and "max |s - s64| / max |s64|" in result.tolerance
    assert result.shapes[:2] == ((1, 1), (1, result.shapes[1][1])) and result.shapes[-1] == SMALL_VERIFY
    assert (folder / "tokenizer.json").is_file()


def test_fp16_export_verifies_by_the_rule(reranker_export, tiny_reranker):
    folder = reranker_export("fp16")
    result = read_manifest(folder, "onnx").verification
    assert result.passed and 0 < result.error <= result.bound
    ce = CrossEncoder.from_pretrained(tiny_reranker).eval()
    input_ids, mask = pad_batch(ce.tokenize_pairs(PAIRS)[0], 0)
    with torch.no_grad():
        want = ce(input_ids, mask).numpy()
    got = _ort_scores(folder, input_ids, mask)
    assert np.abs(got - want).max() <= result.bound * np.abs(want).max()
    assert np.abs(got - want).max() > 0  # really reduced precision


def test_verify_only_works_for_a_reranker(reranker_export, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(reranker_export("fp32"), tmp_path / "onnx")
    assert onnx_main(["--verify-only", str(folder), "--verify-shape", "2x24"]) == 0
    assert "verification passed" in capsys.readouterr().err
    assert read_manifest(folder).verification.shapes[-1] == (2, 24)


@pytest.mark.parametrize("main", [onnx_main, trt_main], ids=["export-onnx", "export-trt"])
def test_with_dims_is_refused_for_a_reranker_in_one_line(main, tiny_reranker, tmp_path, capsys):
    profile = ["--min", "1x1", "--opt", "2x8", "--max", "4x16"] if main is trt_main else []
    assert main([str(tiny_reranker), str(tmp_path / "out"), "--with-dims", *profile]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a reranker" in err and "--with-dims" in err and "embedder" in err
    assert not (tmp_path / "out").exists()


def test_yes_token_reranker_scores_as_the_causal_lm(tmp_path, capsys):
    """bidir-convert --reranker --yes-token: the export's score is the LM's logit(yes) - logit(no) at the last real
    token, right- and left-padded (causal attention and last pooling inside the graph)."""
    template = "<Query>: {query}\n<Document>: {passage}\nAnswer:"
    folder = write_hf_model(tmp_path / "lm", family="qwen3")
    ckpt = tmp_path / "rerank"
    args = [
        str(folder),
        str(ckpt),
        "--reranker",
        "--yes-token",
        "y",
        "--no-token",
        "n",
        "--template",
        template,
    ]
    assert convert_main(args) == 0, capsys.readouterr().err
    manifest = export_onnx(ckpt, tmp_path / "onnx", verify_shape=SMALL_VERIFY)
    assert manifest.verification.passed and (manifest.reranker.pooling, manifest.reranker.attention) == (
        "last",
        "causal",
    )
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    yes, no = (tiny_tokenizer().encode(t, add_special_tokens=False)[0] for t in ("y", "n"))
    pairs = list(VERIFICATION_PAIRS[:3])
    rows = CrossEncoder.from_pretrained(ckpt).tokenize_pairs(pairs)[0]
    want = []
    for row in rows:
        with torch.no_grad():
            logits = lm(torch.tensor([row])).logits[0, -1]  # (vocab,) at the last token
        want.append(float(logits[yes] - logits[no]))
    for side in ("right", "left"):
        got = _ort_scores(tmp_path / "onnx", *pad_batch(rows, 0, side))
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
