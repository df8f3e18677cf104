"""Packed batches against the padded path (which test_parity checks against transformers), in fp32.

Tolerance 1e-5: the same math per text; only the order of reductions differs (the matmuls run over N packed tokens
instead of B x T padded ones, pooling sums with index_add instead of einsum), which moves fp32 results by ~1e-7.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bidir_core import packed_attention
from bidir_core.batching import length_sorted_batches, pad_batch
from bidir_core.checkpoint import EncoderConfig
from bidir_core.errors import BidirError
from bidir_core.packed import pack, pack_padded
from bidir_core.packed_attention import PackedAttention
from bidir_core.pooling import POOLING_STRATEGIES
from bidir_core.testing import tiny_config, tiny_encoder, tiny_model, write_hf_llama

ATOL = 1e-5
LENGTHS = [17, 1, 9, 30, 3]  # mixed, a one-token text among them

VARIANTS = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "bias_and_head_dim": {"attention_bias": True, "mlp_bias": True, "head_dim": 32},
    # max_position_embeddings below the longest text, so the NTK base really stretches, per text
    "dynamic_rope": {"max_position_embeddings": 12, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    "llama3_rope": {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    },
}


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch):
    """FlexAttention uncompiled: the same masks, none of the ~20 s of compilation (the benchmark compiles it)."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(packed_attention, "_flex", lambda: flex_attention)


def _rows(lengths=LENGTHS, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (n,), generator=g).tolist() for n in lengths]


def test_pack_layout():
    rows = [[5, 6, 7], [], [8], [9, 10]]
    p = pack(rows)
    assert p.input_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert p.cu_seqlens.tolist() == [0, 3, 3, 4, 6]
    assert p.position_ids.tolist() == [0, 1, 2, 0, 0, 1]  # restart at 0 per text
    assert p.segment_ids().tolist() == [0, 0, 0, 2, 3, 3]
    assert p.token_seq_lens().tolist() == [3, 3, 3, 1, 2, 2]
    assert p.lengths == (3, 0, 1, 2) and p.max_seqlen == 3
    for side in ("left", "right"):
        q = pack_padded(*pad_batch(rows, pad_id=0, padding_side=side))
        for name in ("input_ids", "cu_seqlens", "position_ids"):
            assert torch.equal(getattr(q, name), getattr(p, name)), (side, name)


@pytest.mark.parametrize("kernel", ["gathered", "segments", "dense", "flex"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hidden_states_equal_padded(variant, kernel):
    model = tiny_model(tiny_config(**VARIANTS[variant]))
    model.attention_kernel = kernel
    rows = _rows()
    packed = pack(rows)
    with torch.no_grad():
        got = model(packed)  # (N, H)
        for side in ("right", "left"):
            ids, mask = pad_batch(rows, pad_id=0, padding_side=side)
            want = model(ids, mask)[mask.bool()]  # real tokens in row order: the packed order
            assert torch.allclose(got, want, atol=ATOL), (variant, kernel, side, (got - want).abs().max())


@pytest.mark.parametrize("pooling", POOLING_STRATEGIES)
def test_embeddings_equal_padded_every_pooling(pooling):
    encoder = tiny_encoder(EncoderConfig(pooling=pooling, normalize=False))
    rows = _rows()
    with torch.no_grad():
        got = encoder(pack(rows))
        for side in ("right", "left"):
            want = encoder(*pad_batch(rows, pad_id=0, padding_side=side))
            assert torch.allclose(got, want, atol=ATOL), (pooling, side, (got - want).abs().max())


def test_hidden_states_equal_transformers(tmp_path):
    """The oracle directly: transformers' LlamaModel (is_causal false) on each text alone."""
    from transformers import AutoModel, LlamaConfig

    from bidir_core.model import LlamaBidirectionalModel

    folder = write_hf_llama(tmp_path / "hf")
    config = LlamaConfig.from_pretrained(folder)
    config.is_causal = False
    oracle = AutoModel.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    rows = _rows()
    with torch.no_grad():
        got = LlamaBidirectionalModel.from_pretrained(folder)(pack(rows))
        want = torch.cat([oracle(input_ids=torch.tensor([r])).last_hidden_state[0] for r in rows])
    assert torch.allclose(got, want, atol=ATOL), (got - want).abs().max()


@pytest.mark.parametrize("kernel", ["gathered", "segments", "dense", "flex"])
def test_a_text_never_sees_its_neighbour(kernel):
    """Change one text (its tokens, then its length): every other text's states stay where they were: bit for bit
    when the stream keeps its length, within rounding when it grows (the matmuls then block differently)."""
    model = tiny_model()
    model.attention_kernel = kernel
    rows = _rows()
    changed = [list(r) for r in rows]
    changed[2] = [3 + (t - 2) % 300 for t in changed[2]]
    longer = [list(r) for r in rows]
    longer[2] = longer[2] + [7, 8, 9]
    with torch.no_grad():
        base = model(pack(rows)).split(LENGTHS)
        for other, atol in ((changed, 0.0), (longer, ATOL)):
            moved = model(pack(other)).split([len(r) for r in other])
            for i in range(len(rows)):
                if i != 2:
                    assert torch.allclose(base[i], moved[i], rtol=0, atol=atol), (kernel, i)
            assert not torch.allclose(base[2][:1], moved[2][:1], atol=1e-3)  # the changed text did move


def test_dynamic_rope_per_text():
    """Dynamic NTK stretches RoPE by each text's own length: a long text packed with short ones is as it is
    alone, and a short one is not stretched by its long neighbour."""
    model = tiny_model(tiny_config(**VARIANTS["dynamic_rope"]))
    rows = _rows([30, 4])  # 30 > max_position_embeddings 12 > 4
    with torch.no_grad():
        together = model(pack(rows)).split([30, 4])
        for row, got in zip(rows, together, strict=True):
            alone = model(torch.tensor([row]))[0]
            assert torch.allclose(got, alone, atol=ATOL)


def _reference_attention(q, k, v, lengths, causal):
    """softmax(q k^T / sqrt(D) + mask) v by hand, text by text."""
    out, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        scores = q[:, :, s] @ k[:, :, s].transpose(-1, -2) / math.sqrt(q.shape[-1])
        if causal:
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out.append(scores.softmax(-1) @ v[:, :, s])
        start += n
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["gathered", "segments", "dense", "flex"])
def test_kernels_bidirectional_and_causal(kernel, causal):
    lengths = [5, 1, 12, 0, 7]
    packed = pack(_rows(lengths))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, sum(lengths), 16, generator=g) for _ in range(3))
    got = PackedAttention(packed, kernel, causal=causal)(q, k, v)
    want = _reference_attention(q, k, v, lengths, causal)
    assert torch.allclose(got, want, atol=ATOL), (kernel, causal)
    if causal:  # the first token of a text sees only itself: its output is its own value
        assert torch.allclose(got[:, :, 0], v[:, :, 0], atol=ATOL)


def test_causal_model_flag_reaches_the_kernel():
    """A model whose config says is_causal (the attention mode's one switch) runs its packed batches causally: a
    text's first token no longer sees its last one."""
    model = tiny_model()
    rows = _rows([6])
    changed = [rows[0][:-1] + [3 + (rows[0][-1] - 2) % 300]]
    with torch.no_grad():
        assert not torch.allclose(model(pack(rows))[0], model(pack(changed))[0], atol=1e-4)
        model.config.is_causal = True
        assert torch.allclose(model(pack(rows))[0], model(pack(changed))[0], atol=1e-6)


@pytest.mark.parametrize("kernel", ["gathered", "segments", "dense"])
def test_gradients_equal_padded(kernel):
    """A backward through the packed forward gives the padded forward's parameter gradients."""
    rows = _rows([17, 1, 9, 0, 30, 3])  # an empty text too: its row must not put NaN into anyone's gradient
    grads = []
    for inputs in ((pack(rows),), pad_batch(rows, pad_id=0, padding_side="left")):
        encoder = tiny_encoder(EncoderConfig(normalize=False))
        encoder.model.attention_kernel = kernel
        emb = encoder(*inputs)
        (emb.square().sum() + emb[:, 0].sum()).backward()
        grads.append({n: p.grad for n, p in encoder.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=ATOL), name


def test_empty_texts_pool_to_zeros():
    encoder = tiny_encoder(EncoderConfig(pooling="cls"))
    with torch.no_grad():
        emb = encoder(pack([[5, 6], [], [7]]))
        assert torch.equal(emb[1], torch.zeros_like(emb[1])) and emb[0].abs().sum() > 0
        assert torch.equal(encoder(pack([[], []])), torch.zeros(2, encoder.hidden_size))


def test_encode_packed_equals_padded():
    encoder = tiny_encoder()
    texts = ["a short one", "", "x" * 40, "a somewhat longer text with more words in it", "b"]
    packed = encoder.encode(texts, batch_size=2, packed=True, max_tokens=20)
    padded = encoder.encode(texts, batch_size=2, packed=False)
    assert packed.shape == padded.shape and abs(packed - padded).max() < ATOL


def test_packed_batches_keep_to_the_token_budget():
    lengths = [5, 30, 2, 9, 9, 1, 40]
    batches = length_sorted_batches(lengths, batch_size=3, max_tokens=20, padded=False)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and (sum(lengths[i] for i in b) <= 20 or len(b) == 1)


def test_auto_kernel_on_cpu_depends_on_autograd():
    # segments: no padding to the longest text, and no autograd cost per call when nothing is recorded
    packed = pack(_rows([3, 9]))
    assert PackedAttention(packed).kernel == "gathered"
    with torch.inference_mode():
        assert PackedAttention(packed).kernel == "segments"
    with torch.no_grad():
        assert packed_attention.default_kernel("cpu") == "segments"
    assert packed_attention.default_kernel("cpu", grad=False) == "segments"


def test_cuda_only_kernels_are_refused_on_cpu():
    for kernel in ("jagged", "varlen"):
        with pytest.raises(BidirError, match="CUDA only"):
            PackedAttention(pack([[1, 2]]), kernel)
    with pytest.raises(BidirError, match="unknown packed attention kernel"):
        PackedAttention(pack([[1, 2]]), "fast")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["jagged", "varlen", "flex", "segments", "gathered"])
def test_cuda_kernels_match_the_reference(kernel):
    if kernel == "varlen":
        pytest.importorskip("flash_attn")
    lengths = [5, 1, 12, 7]
    packed = pack(_rows(lengths)).to("cuda")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, sum(lengths), 64, generator=g) for _ in range(3))
    want = _reference_attention(q, k, v, lengths, False)
    q, k, v = (x.to("cuda", torch.bfloat16) for x in (q, k, v))
    got = PackedAttention(packed, kernel)(q, k, v).float().cpu()
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999, kernel
