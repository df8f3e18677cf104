"""CoSENT against a hand computation, and objective: cosent in the training loop (plain = GradCache, bad data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from train_testing import loss_curve, recipe_args, train_recipe

from bidir_core.errors import BidirError
from bidir_train.loss import cosent


def _hand_cosent(a, b, scores, scale):
    """Plain Python: log(1 + sum over every ordered pair of pairs (y_i > y_j) of exp(scale * (cos_j - cos_i)))."""
    cos = []
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        cos.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    total = 1.0
    for i in range(len(cos)):
        for j in range(len(cos)):
            if scores[i] > scores[j]:
                total += math.exp(scale * (cos[j] - cos[i]))
    return math.log(total)


def test_cosent_two_pairs_by_hand():
    """Two pairs, cosines 1 and 0 by construction: loss = log(1 + exp(scale * (0 - 1))) when the first is rated
    higher, log(1 + exp(scale)) when it is rated lower (scale 5: float32 keeps exp(-5) visible)."""
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # cos 1, cos 0 (normalization is the loss's)
    assert cosent(a, b, torch.tensor([5.0, 1.0]), scale=5.0).item() == pytest.approx(math.log1p(math.exp(-5)))
    assert cosent(a, b, torch.tensor([1.0, 5.0]), scale=5.0).item() == pytest.approx(math.log1p(math.exp(5)))
    # Equal scores order nothing: log(1) = 0.
    assert cosent(a, b, torch.tensor([2.0, 2.0])).item() == 0.0


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_cosent_matches_hand_computation(scale):
    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(6, 8, generator=g, dtype=torch.float64),
        torch.randn(6, 8, generator=g, dtype=torch.float64),
    )
    scores = [4.2, 0.0, 2.5, 2.5, 5.0, 1.0]  # a tie: that pair of pairs is not compared
    got = cosent(a, b, torch.tensor(scores, dtype=torch.float64), scale=scale).item()
    assert got == pytest.approx(_hand_cosent(a, b, scores, scale), rel=1e-9)


def test_cosent_matryoshka_is_the_mean_over_truncations():
    g = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(5, 8, generator=g, dtype=torch.float64),
        torch.randn(5, 8, generator=g, dtype=torch.float64),
    )
    scores = [3.0, 1.0, 4.0, 0.5, 2.0]
    want = (_hand_cosent(a[:, :4], b[:, :4], scores, 20.0) + _hand_cosent(a, b, scores, 20.0)) / 2
    got = cosent(a, b, torch.tensor(scores, dtype=torch.float64), dims=(4, 8)).item()
    assert got == pytest.approx(want, rel=1e-9)


def test_cosent_gradient_pulls_the_better_pair_together():
    """One step of gradient descent raises the cosine of the pair rated higher, when it is scored lower."""
    a = torch.tensor([[1.0, 0.2], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.1]], requires_grad=True)
    scores = torch.tensor([5.0, 0.0])
    cosent(a, b, scores).backward()
    moved = b.detach() - 0.01 * b.grad
    before = torch.nn.functional.cosine_similarity(a[0], b[0].detach(), dim=0)
    after = torch.nn.functional.cosine_similarity(a[0], moved[0], dim=0)
    assert after > before


def test_cosent_shape_errors():
    with pytest.raises(BidirError, match="scores"):
        cosent(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2))
    with pytest.raises(BidirError, match="matryoshka_dims"):
        cosent(torch.ones(3, 4), torch.ones(3, 4), torch.arange(3.0), dims=(8,))


@pytest.fixture(scope="module")
def sts_tsv(tmp_path_factory):
    """20 graded pairs with a header, STS-B's layout (score, sentence1, sentence2)."""
    path = tmp_path_factory.mktemp("sts") / "sts-train.tsv"
    words = ["cat", "dog", "car", "tree", "house"]
    rows = ["score\tsentence1\tsentence2"]
    for i in range(20):
        w = words[i % 5]
        rows.append(f"{i % 6 * 1.0}\ta {w} sits here {i}\tthe {words[(i * 3) % 5]} stands there {i}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _cosent(model, data, out, *extra):
    """A run of objective: cosent (no hard negatives, no dev set)."""
    return recipe_args(model, data, out, "objective=cosent", "data.num_negatives=0", "eval.dev=null", *extra)


def test_cosent_objective_trains_and_gradcache_matches(tiny_checkpoint, sts_tsv, tmp_path):
    plain = _cosent(tiny_checkpoint, sts_tsv, tmp_path / "plain", "schedule.max_steps=3")
    summary = train_recipe(plain)
    assert summary["steps"] == 3 and (tmp_path / "plain" / "final").is_dir()
    losses = loss_curve(tmp_path / "plain")
    # >= 0 always (log of 1 + a sum); 0 only when a micro-batch's two pairs tie in score.
    assert len(losses) == 3 and all(math.isfinite(x) and x >= 0 for x in losses) and max(losses) > 0
    train_recipe(
        _cosent(
            tiny_checkpoint, sts_tsv, tmp_path / "cached", "schedule.max_steps=3", "loss.cache_chunk_size=1"
        )
    )
    assert loss_curve(tmp_path / "cached") == pytest.approx(losses, abs=1e-5)


def test_cosent_forwards_follow_schedule_packing(tiny_checkpoint, sts_tsv, tmp_path, monkeypatch):
    """schedule.packing=packed: every CoSENT forward is a packed batch of at most max_tokens_per_forward real tokens
    (none padded), as the contrastive objective's are; padded: none is packed. The same losses either way."""
    from bidir_core.encoder import BiEncoder
    from bidir_core.packed import PackedBatch

    forward, seen = BiEncoder.forward, []

    def spy(self, input_ids, attention_mask=None, **kw):
        packed = isinstance(input_ids, PackedBatch)
        seen.append((packed, input_ids.num_tokens if packed else None))
        return forward(self, input_ids, attention_mask, **kw)

    monkeypatch.setattr(BiEncoder, "forward", spy)
    losses = {}
    for packing in ("packed", "padded"):
        seen.clear()
        args = ["schedule.max_steps=2", f"schedule.packing={packing}", "schedule.max_tokens_per_forward=40"]
        train_recipe(_cosent(tiny_checkpoint, sts_tsv, tmp_path / packing, *args))
        losses[packing] = loss_curve(tmp_path / packing)
        assert len(seen) >= 2 * 2 * 2  # 2 steps x 2 micro-batches x 2 sentences, at least
        if packing == "packed":
            assert all(packed and tokens <= 40 for packed, tokens in seen), seen
        else:
            assert not any(packed for packed, _ in seen)
    assert losses["packed"] == pytest.approx(losses["padded"], abs=1e-5)


def test_cosent_objective_refuses_training_rows(tiny_checkpoint, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"query": "a", "pos_doc": "b"}\n')
    with pytest.raises(BidirError, match="STS-style TSV"):
        train_recipe(_cosent(tiny_checkpoint, rows, tmp_path / "out"))
    bad = tmp_path / "bad.tsv"
    bad.write_text("score\tsentence1\tsentence2\n1.0\ta\tb\nhigh\tc\td\n")
    with pytest.raises(BidirError, match=r"bad.tsv:3: score 'high'"):
        train_recipe(_cosent(tiny_checkpoint, bad, tmp_path / "out2"))


def test_cosent_refuses_a_file_whose_scores_are_all_equal(tiny_checkpoint, tmp_path):
    """Every pair tied: loss 0 and gradient 0 at every step, so the run would train nothing; refused before the
    model loads, naming the file, as bidir-eval refuses such a file."""
    flat = tmp_path / "flat.tsv"
    flat.write_text("score\tsentence1\tsentence2\n" + "".join(f"3\ta {i}\tb {i}\n" for i in range(4)))
    with pytest.raises(BidirError) as e:
        train_recipe(_cosent(tiny_checkpoint, flat, tmp_path / "out"))
    assert str(e.value).startswith(f"{flat}: all 4 gold scores are equal (3.0)")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    # The rows trained are what counts: data.max_examples that keeps only tied pairs is refused too.
    flat.write_text("3\ta\tb\n3\tc\td\n1\te\tf\n")
    with pytest.raises(BidirError, match=r"flat.tsv: all 2 gold scores .*data.max_examples=2"):
        train_recipe(_cosent(tiny_checkpoint, flat, tmp_path / "out", "data.max_examples=2"))
