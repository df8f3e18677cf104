"""bidir_core.encoder (BiEncoder.encode): padding invariance, order restoration, Matryoshka dims, prefixes, truncation;
bad arguments (a dim, a text that is no str) are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from errors_testing import one_line_error

from bidir_core import BidirError, EncoderConfig, pool
from bidir_core.batching import pad_batch
from bidir_core.testing import tiny_encoder

TEXTS = [
    "a short one",
    "the quick brown fox jumps over the lazy dog and then keeps running far away",
    "embeddings",
    "how do i sort a list in python",
    "return a new sorted list from the items in iterable, stable, with an optional key",
    "",
]


@pytest.mark.parametrize("pooling", ["avg", "cls", "last", "weighted_avg"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_text_alone_equals_text_in_padded_batch(pooling, padding_side):
    encoder = tiny_encoder(EncoderConfig(pooling=pooling))
    rows = [encoder.tokenizer(t)["input_ids"] for t in TEXTS[:5]]
    with torch.no_grad():
        ids, mask = pad_batch(rows, encoder.tokenizer.pad_token_id, padding_side)
        batched = encoder(ids, mask)
        for i, row in enumerate(rows):
            alone = encoder(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))
            assert torch.allclose(batched[i], alone[0], atol=1e-5), (pooling, padding_side, i)


def test_weighted_avg_is_not_avg():
    hidden = torch.randn(1, 5, 8)
    mask = torch.ones(1, 5, dtype=torch.long)
    assert not torch.allclose(pool(hidden, mask, "weighted_avg"), pool(hidden, mask, "avg"))


def test_encode_restores_input_order_and_ignores_batch_size():
    encoder = tiny_encoder()
    texts = TEXTS[:5]
    full = encoder.encode(texts, batch_size=2)
    assert full.dtype == np.float32 and full.shape == (5, 64)
    for i, text in enumerate(texts):
        np.testing.assert_allclose(full[i], encoder.encode([text])[0], atol=1e-5)
    np.testing.assert_allclose(encoder.encode(texts, batch_size=1), full, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    # a single str gives one vector, as in sentence-transformers
    assert encoder.encode(texts[0]).shape == (64,)


def test_matryoshka_dim_truncates_then_renormalizes():
    encoder = tiny_encoder()
    raw = encoder.encode(TEXTS[:5], normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    short = encoder.encode(TEXTS[:5], dim=16)
    want = raw[:, :16] / np.linalg.norm(raw[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(short, want, atol=1e-5)
    with pytest.raises(BidirError, match="larger than the model's embedding size 64"):
        encoder.encode(TEXTS[:1], dim=65)


def test_prefixes_applied_exactly_once():
    encoder = tiny_encoder(
        EncoderConfig(query_prefix="Instruct: find code\nQuery: ", passage_prefix="passage: ")
    )
    texts = TEXTS[:3]
    np.testing.assert_allclose(
        encoder.encode_queries(texts),
        encoder.encode(["Instruct: find code\nQuery: " + t for t in texts]),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        encoder.encode_documents(texts), encoder.encode(["passage: " + t for t in texts])
    )
    assert not np.allclose(
        encoder.encode_documents(texts), encoder.encode(["passage: passage: " + t for t in texts])
    )
    assert not np.allclose(encoder.encode_documents(texts), encoder.encode(texts))
    with pytest.raises(BidirError, match="list of texts"):
        encoder.encode_queries("one text")


def test_truncation_is_counted_and_equals_truncated_input():
    encoder = tiny_encoder(EncoderConfig(max_length=8))
    long_text = TEXTS[1]
    n_tokens = len(encoder.tokenizer(long_text)["input_ids"])
    assert n_tokens > 8
    with pytest.warns(UserWarning, match=r"1 of 2 texts were longer than max_length=8"):
        got = encoder.encode([long_text, "short"])
    ids = encoder.tokenizer(long_text, truncation=True, max_length=8)["input_ids"]
    assert len(ids) == 8
    with torch.no_grad():
        want = encoder(torch.tensor([ids]), torch.ones(1, 8, dtype=torch.long))
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-5)


def test_empty_text_gives_zero_vector_with_warning():
    encoder = tiny_encoder()
    encoder.tokenizer._tokenizer.post_processor = None  # no BOS: "" really has no tokens
    with pytest.warns(UserWarning, match="1 texts have no tokens"):
        emb = encoder.encode(["", "hello"])
    assert np.all(emb[0] == 0) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb[1]), 1.0, atol=1e-5)


def test_empty_list_and_numpy_dim():
    encoder = tiny_encoder()
    assert encoder.encode([]).shape == (0, 64)
    assert encoder.encode([], dim=8).shape == (0, 8)
    np.testing.assert_array_equal(
        encoder.encode(TEXTS[:2], dim=np.int64(8)), encoder.encode(TEXTS[:2], dim=8)
    )
    with pytest.raises(BidirError, match="positive integer"):
        encoder.encode(TEXTS[:1], dim=True)


# --- bad arguments ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [65, 1000])
def test_dim_larger_than_hidden(encoder, dim):
    with pytest.raises(BidirError) as excinfo:
        encoder.encode(["hello"], dim=dim)
    one_line_error(excinfo, f"dim={dim}", "64")


@pytest.mark.parametrize("dim", [0, -3, 2.5])
def test_dim_not_a_positive_integer(encoder, dim):
    with pytest.raises(BidirError) as excinfo:
        encoder.encode(["hello"], dim=dim)
    one_line_error(excinfo, repr(dim))


def test_dim_checked_in_forward_too(encoder):
    ids, mask = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(BidirError) as excinfo:
        encoder(ids, mask, dim=65)
    one_line_error(excinfo, "dim=65")


def test_dim_equal_to_hidden_is_fine(encoder):
    assert encoder.encode(["hello"], dim=64).shape == (1, 64)
    assert encoder.encode(["hello"], dim=1).shape == (1, 1)


def test_non_str_text(encoder):
    with pytest.raises(BidirError) as excinfo:
        encoder.encode(["fine", 42])
    one_line_error(excinfo, "text 1", "int")


def test_single_str_to_encode_queries(encoder):
    with pytest.raises(BidirError) as excinfo:
        encoder.encode_queries("what is a llama")
    one_line_error(excinfo, "str")
