"""Pooling formulas against hand-computed values, for right and left padding, and the length-sorted batching that
feeds them (bidir_core.pooling, bidir_core.batching)."""

from __future__ import annotations

import random

import pytest
import torch
from errors_testing import load_error, one_line_error

from bidir_core import POOLING_STRATEGIES, BidirError, pool
from bidir_core.batching import length_sorted_batches, pad_batch
from bidir_core.checkpoint import EncoderConfig
from bidir_core.testing import tiny_encoder

# Real tokens of the two rows (B=2, H=3). Row 0 has 3 real tokens a, b, c; row 1 has 2 real tokens d, e.
A, B, C = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]
D, E = [3.0, 0.0, -3.0], [0.0, 6.0, 9.0]
# Padding positions hold large values, so a strategy that reads a pad position gives a visibly wrong answer.
P = [1000.0, -1000.0, 500.0]

# Hand-computed:
#   avg:          row 0 (a+b+c)/3 = [4,5,6];                 row 1 (d+e)/2 = [1.5,3,3]
#   weighted_avg: row 0 (1a+2b+3c)/6 = [30,36,42]/6 = [5,6,7]; row 1 (1d+2e)/3 = [3,12,15]/3 = [1,4,5]
#   cls:          row 0 a;                                    row 1 d
#   last:         row 0 c;                                    row 1 e
EXPECTED = {
    "avg": [[4.0, 5.0, 6.0], [1.5, 3.0, 3.0]],
    "weighted_avg": [[5.0, 6.0, 7.0], [1.0, 4.0, 5.0]],
    "cls": [A, D],
    "last": [C, E],
}


def _right_padded() -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.tensor([[A, B, C, P], [D, E, P, P]])  # (2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    return hidden, mask


def _left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.tensor([[P, A, B, C], [P, P, D, E]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    return hidden, mask


@pytest.mark.parametrize("strategy", POOLING_STRATEGIES)
@pytest.mark.parametrize("layout", [_right_padded, _left_padded], ids=["right", "left"])
def test_pooling_matches_hand_computed_values(strategy, layout):
    hidden, mask = layout()
    out = pool(hidden, mask, strategy)
    assert out.shape == (2, 3)
    assert out.dtype == hidden.dtype
    torch.testing.assert_close(out, torch.tensor(EXPECTED[strategy]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("strategy", POOLING_STRATEGIES)
def test_left_and_right_padding_give_identical_results(strategy):
    right = pool(*_right_padded(), strategy)
    left = pool(*_left_padded(), strategy)
    torch.testing.assert_close(left, right, atol=0, rtol=0)


@pytest.mark.parametrize("strategy", POOLING_STRATEGIES)
def test_pad_values_do_not_matter(strategy):
    hidden, mask = _right_padded()
    other = hidden.clone()
    other[mask == 0] = -7.5
    torch.testing.assert_close(pool(other, mask, strategy), pool(hidden, mask, strategy), atol=0, rtol=0)


def test_avg_is_the_default():
    hidden, mask = _right_padded()
    torch.testing.assert_close(pool(hidden, mask), torch.tensor(EXPECTED["avg"]))


def test_weighted_avg_differs_from_avg_and_weights_later_tokens_more():
    hidden, mask = _right_padded()
    avg = pool(hidden, mask, "avg")
    weighted = pool(hidden, mask, "weighted_avg")
    assert not torch.allclose(avg, weighted)
    # Row 0's features increase with position, so the position-weighted mean lies above the plain mean.
    assert (weighted[0] > avg[0]).all()


def test_weighted_avg_weights_sum_to_one():
    # A constant row pools to that constant under any normalized weighting (a weighted *sum* would not).
    hidden = torch.full((1, 4, 3), 2.5)
    for mask in (torch.tensor([[1, 1, 1, 0]]), torch.tensor([[0, 1, 1, 1]]), torch.tensor([[1, 1, 1, 1]])):
        torch.testing.assert_close(pool(hidden, mask, "weighted_avg"), torch.full((1, 3), 2.5))


def test_single_real_token_pools_to_that_token_under_every_strategy():
    hidden = torch.tensor([[P, A, P, P]])
    mask = torch.tensor([[0, 1, 0, 0]])
    for strategy in POOLING_STRATEGIES:
        torch.testing.assert_close(pool(hidden, mask, strategy), torch.tensor([A]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("strategy", POOLING_STRATEGIES)
def test_all_padding_row_pools_to_zeros_without_nan(strategy):
    hidden = torch.tensor([[A, B, C, P], [P, P, P, P]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    out = pool(hidden, mask, strategy)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out[1], torch.zeros(3), atol=0, rtol=0)
    # The real row next to it is unaffected.
    torch.testing.assert_close(out[0], torch.tensor(EXPECTED[strategy][0]), atol=1e-6, rtol=0)


def test_bool_and_float_masks_pool_like_int_masks():
    hidden, mask = _left_padded()
    for strategy in POOLING_STRATEGIES:
        expected = pool(hidden, mask, strategy)
        torch.testing.assert_close(pool(hidden, mask.bool(), strategy), expected)
        torch.testing.assert_close(pool(hidden, mask.float(), strategy), expected)


@pytest.mark.parametrize("name", ["max", "mean", "AVG", "", "lasttoken"])
def test_unknown_strategy_raises_bidir_error(name):
    hidden, mask = _right_padded()
    with pytest.raises(BidirError) as excinfo:
        pool(hidden, mask, name)
    message = str(excinfo.value)
    assert repr(name) in message
    assert "avg" in message and "weighted_avg" in message  # lists the valid choices
    assert "\n" not in message
    assert isinstance(excinfo.value, ValueError)


def test_encoder_config_rejects_unknown_pooling():
    with pytest.raises(BidirError, match="'max'"):
        EncoderConfig(pooling="max")


@pytest.mark.parametrize("strategy", POOLING_STRATEGIES)
def test_encoder_pools_left_and_right_padded_batches_identically(strategy):
    # The model gives each real token the same state whatever the padding side, so the pooled embedding must match.
    encoder = tiny_encoder(EncoderConfig(pooling=strategy, normalize=False))
    sequences = [[1, 40, 41, 42, 43, 44], [1, 50, 51], [1, 60, 61, 62, 63]]
    with torch.no_grad():
        right = encoder(*pad_batch(sequences, pad_id=0, padding_side="right"))
        left = encoder(*pad_batch(sequences, pad_id=0, padding_side="left"))
        alone = torch.cat([encoder(*pad_batch([s], pad_id=0)) for s in sequences])
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)  # fp32, same math on permuted keys
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)


def test_unknown_pooling_in_pool():
    hidden, mask = torch.zeros(1, 2, 3), torch.ones(1, 2)
    with pytest.raises(BidirError) as excinfo:
        pool(hidden, mask, "max")
    one_line_error(excinfo, "'max'", "avg")


def test_unknown_pooling_in_from_pretrained(hf_source):
    one_line_error(load_error(hf_source, pooling="max"), "'max'", "avg, cls, last, weighted_avg")


# --- batching -----------------------------------------------------------------------------------------------------


def _check_batches(lengths, batches, batch_size, max_tokens=None):
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths))), "every index exactly once"
    assert all(batch for batch in batches), "no empty batch"
    for batch in batches:
        assert len(batch) <= batch_size
        if max_tokens is not None and len(batch) > 1:
            assert len(batch) * max(lengths[i] for i in batch) <= max_tokens
    # Longest first overall, and stable: equal lengths keep their input order.
    keys = [(-lengths[i], i) for i in flat]
    assert keys == sorted(keys)


def test_length_sorted_batches_hand_example():
    lengths = [3, 7, 1, 7, 5]
    assert length_sorted_batches(lengths, batch_size=2) == [[1, 3], [4, 0], [2]]


def test_length_sorted_batches_max_tokens_hand_example():
    # batch_size alone would allow 10 rows; 4 rows of 5 tokens in 10 padded tokens means 2 per batch.
    assert length_sorted_batches([5, 5, 5, 5], batch_size=10, max_tokens=10) == [[0, 1], [2, 3]]
    # A longest row of 8 tokens pads the batch to 8: [8, 2] is 16 tokens > 12, so it goes alone.
    assert length_sorted_batches([2, 8, 2, 2], batch_size=10, max_tokens=12) == [[1], [0, 2, 3]]


def test_length_sorted_batches_row_longer_than_max_tokens_gets_its_own_batch():
    batches = length_sorted_batches([50, 3, 3], batch_size=8, max_tokens=10)
    assert batches == [[0], [1, 2]]


def test_length_sorted_batches_edge_cases():
    assert length_sorted_batches([], batch_size=4) == []
    assert length_sorted_batches([0, 0, 2], batch_size=4) == [[2, 0, 1]]
    assert length_sorted_batches([4, 4, 4], batch_size=1) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="batch_size"):
        length_sorted_batches([1, 2], batch_size=0)


@pytest.mark.parametrize("seed", range(20))
def test_length_sorted_batches_properties(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(0, 40) for _ in range(rng.randint(1, 60))]
    batch_size = rng.randint(1, 9)
    max_tokens = rng.choice([None, 16, 50, 200])
    batches = length_sorted_batches(lengths, batch_size=batch_size, max_tokens=max_tokens)
    _check_batches(lengths, batches, batch_size, max_tokens)
    if max_tokens is None:
        # Without a token budget only the last batch may be short.
        assert all(len(b) == batch_size for b in batches[:-1])


def test_length_sorted_batches_max_padding_hand_example():
    # Longest first: 8, 7, 6, 2, 2. [8, 7, 6] pads 3 of 24 (12.5 %); adding a 2 would pad 9 of 32 (28 %) > 25 %.
    lengths = [2, 8, 6, 2, 7]
    assert length_sorted_batches(lengths, batch_size=10, max_padding=0.25) == [[1, 4, 2], [0, 3]]
    assert length_sorted_batches(lengths, batch_size=10) == [[1, 4, 2, 0, 3]]
    # Packed batches have no padding to bound.
    assert length_sorted_batches(lengths, batch_size=10, padded=False, max_padding=0.0) == [[1, 4, 2, 0, 3]]


@pytest.mark.parametrize("seed", range(20))
def test_length_sorted_batches_max_padding_bounds_every_batch(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 60))]
    max_padding = rng.choice([0.0, 0.1, 0.25, 0.5])
    max_tokens = rng.choice([None, 2048])
    batches = length_sorted_batches(lengths, 32, max_tokens, max_padding=max_padding)
    _check_batches(lengths, batches, 32, max_tokens)
    for b in batches:
        padded = len(b) * max(lengths[i] for i in b)
        assert sum(lengths[i] for i in b) >= (1 - max_padding) * padded


def test_pad_batch_right_and_left_layouts():
    sequences = [[5, 6, 7], [8], []]
    ids, mask = pad_batch(sequences, pad_id=0, padding_side="right")
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]

    ids, mask = pad_batch(sequences, pad_id=9, padding_side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_pad_batch_defaults_to_right_padding_and_uses_pad_id():
    ids, mask = pad_batch([[1, 2], [3, 4, 5, 6]], pad_id=77)
    assert ids.tolist() == [[1, 2, 77, 77], [3, 4, 5, 6]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_pad_batch_all_empty_has_one_column():
    ids, mask = pad_batch([[], []], pad_id=3)
    assert ids.shape == (2, 1) and ids.tolist() == [[3], [3]]
    assert mask.tolist() == [[0], [0]]


def test_pad_batch_rejects_unknown_padding_side():
    with pytest.raises(ValueError, match="padding_side"):
        pad_batch([[1, 2], [3]], pad_id=0, padding_side="middle")
