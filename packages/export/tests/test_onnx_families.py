"""Every decoder family exports, verified, in both attention modes; the mode is in the manifest and in the graph.

fp32 tolerance 1e-5 against BiEncoder.forward, as in test_onnx_parity.py.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from export_testing import SMALL_VERIFY, padded_inputs, run_onnx

from bidir_core import BidirError, BiEncoder, EncoderConfig
from bidir_core.artifacts import read_manifest
from bidir_core.testing import TINY_VOCAB_SIZE, tiny_encoder
from bidir_export import export_onnx
from bidir_export.onnx_export import ATTENTION_KEY, verify_export

CASES = [
    ("mistral", "bidirectional", "avg"),
    ("ministral3", "bidirectional", "cls"),
    ("qwen2", "bidirectional", "avg"),
    ("qwen3", "causal", "last"),  # as Qwen3-Embedding
    ("mistral", "causal", "cls"),  # cls under causal attention sees only the first token: a sharp check
]


@pytest.fixture(scope="module")
def family_export(tmp_path_factory):
    made = {}

    def make(family: str, attention: str, pooling: str):
        key = (family, attention, pooling)
        if key not in made:
            root = tmp_path_factory.mktemp("-".join(key))
            config = EncoderConfig(pooling=pooling, attention=attention, max_length=64)
            ckpt = tiny_encoder(config, family=family).save_pretrained(root / "ckpt")
            export_onnx(ckpt, root / "onnx", verify_shape=SMALL_VERIFY)
            made[key] = root / "onnx", ckpt
        return made[key]

    return make


@pytest.mark.parametrize(("family", "attention", "pooling"), CASES, ids=["-".join(c) for c in CASES])
def test_family_exports_verified(family_export, family, attention, pooling):
    out, ckpt = family_export(family, attention, pooling)
    manifest = read_manifest(out, "onnx")
    assert manifest.verification.passed and manifest.encoder.attention == attention
    assert json.loads((out / "manifest.json").read_text())["encoder"]["attention"] == attention
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {p.key: p.value for p in graph.metadata_props}[ATTENTION_KEY] == attention

    encoder = BiEncoder.from_pretrained(ckpt).eval()
    for batch, seq, side in [(1, 1, "right"), (5, 23, "right"), (4, 19, "left")]:
        ids, mask = padded_inputs(TINY_VOCAB_SIZE, batch, seq, side)
        with torch.no_grad():
            want = encoder(ids, mask)
        torch.testing.assert_close(run_onnx(out, ids, mask), want, atol=1e-5, rtol=0)

    # The mode survives export: the first token (cls) sees the last one only when bidirectional.
    if pooling == "cls":
        ids, mask = padded_inputs(TINY_VOCAB_SIZE, 1, 12, "right")
        changed = ids.clone()
        changed[0, -1] = (ids[0, -1] + 1) % TINY_VOCAB_SIZE
        shift = float((run_onnx(out, ids, mask) - run_onnx(out, changed, mask)).abs().max())
        assert shift > 1e-3 if attention == "bidirectional" else shift == 0.0


def test_manifest_contradicting_the_graph_is_refused(family_export):
    out, _ = family_export("qwen3", "causal", "last")
    raw = json.loads((out / "manifest.json").read_text())
    try:
        raw["encoder"]["attention"] = "bidirectional"
        (out / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(BidirError) as e:
            verify_export(out, verify_shape=SMALL_VERIFY)
        assert "\n" not in str(e.value)
        assert f"attention is causal ({ATTENTION_KEY}), the manifest's bidirectional" in str(e.value)
    finally:
        raw["encoder"]["attention"] = "causal"
        (out / "manifest.json").write_text(json.dumps(raw))
