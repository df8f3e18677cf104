"""The embedded default model (SmolLM2-135M, a real 30-layer Llama) through export and onnxruntime.

Exported once per session (about a minute on 2 cores). Tolerance 1e-4 on normalized embeddings: against PyTorch
fp32 for new shapes (observed ~4e-6 here), and for the manifest's max |diff|, which is against float64.
"""

from __future__ import annotations

import pytest
import torch
from export_testing import padded_inputs, run_onnx

from bidir_core import BiEncoder
from bidir_core.artifacts import checkpoint_fingerprint, read_manifest
from bidir_core.sources import resolve_source
from bidir_export import export_onnx

pytestmark = pytest.mark.slow
ATOL = 1e-4


@pytest.fixture(scope="module")
def smollm2_export(embedded_default, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "onnx"
    export_onnx(embedded_default, out, verify_shape=(2, 64))
    return out, BiEncoder.from_pretrained(embedded_default).eval()


def test_manifest_and_graph(smollm2_export, embedded_default):
    out, encoder = smollm2_export
    manifest = read_manifest(out, "onnx")
    assert manifest.source == embedded_default
    assert manifest.source_fingerprint == checkpoint_fingerprint(resolve_source(embedded_default))
    assert manifest.hidden_size == encoder.hidden_size == 576
    assert manifest.verification.passed and manifest.verification.max_abs_diff <= ATOL
    assert manifest.op_histogram["Attention"] == encoder.model.config.num_hidden_layers == 30


@pytest.mark.parametrize("batch, seq, side", [(1, 1, "right"), (3, 45, "left"), (2, 70, "right")])
def test_parity_on_new_shapes(smollm2_export, batch, seq, side):
    out, encoder = smollm2_export
    ids, mask = padded_inputs(encoder.model.config.vocab_size, batch, seq, side)
    with torch.no_grad():
        want = encoder(ids, mask)
    torch.testing.assert_close(run_onnx(out, ids, mask), want, atol=ATOL, rtol=0)


def test_real_text_and_the_last_token(smollm2_export):
    out, encoder = smollm2_export
    ids = encoder.tokenizer(["passage: bidirectional attention sees the whole text"], return_tensors="pt")
    ids, mask = ids["input_ids"], ids["attention_mask"]
    changed = ids.clone()
    changed[0, -1] = encoder.tokenizer.convert_tokens_to_ids(encoder.tokenizer.tokenize(" words")[0])
    got, got_changed = run_onnx(out, ids, mask), run_onnx(out, changed, mask)
    with torch.no_grad():
        torch.testing.assert_close(got, encoder(ids, mask), atol=ATOL, rtol=0)
    assert (got - got_changed).abs().max() > 1e-3
