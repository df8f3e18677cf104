"""InfoNCE against a hand computation, across 2 ranks, with false-negative masking, Matryoshka and GradCache."""

from __future__ import annotations

import math
import os

import numpy as np
import peft
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from train_testing import free_port

from bidir_train.contrastive import MicroBatch
from bidir_train.loss import info_nce
from bidir_train.step import Chunking, EncoderEmbed, forward_backward


def _hand_loss(q, p, group, temperature, mask=None):
    """Plain Python: cosine scores of each query against every passage, softmax cross-entropy on its positive."""
    q = [np.asarray(v, dtype=np.float64) / np.linalg.norm(v) for v in q.tolist()]
    p = [np.asarray(v, dtype=np.float64) / np.linalg.norm(v) for v in p.tolist()]
    total = 0.0
    for i, qi in enumerate(q):
        scores = [float(qi @ pj) / temperature for pj in p]
        keep = [j for j in range(len(p)) if mask is None or not mask[i][j]]
        log_z = math.log(sum(math.exp(scores[j]) for j in keep))
        total += log_z - scores[i * group]
    return total / len(q)


def _data(B=3, N=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(
        B * (1 + N), D, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("negatives", [0, 1, 3])
def test_loss_matches_hand_computation(negatives):
    q, p = _data(N=negatives)
    got = info_nce(q, p, num_negatives=negatives, temperature=0.05).item()
    assert got == pytest.approx(_hand_loss(q, p, 1 + negatives, 0.05), abs=1e-9)


def test_own_passages_only():
    q, p = _data(N=2)
    got = info_nce(q, p, num_negatives=2, temperature=0.1, in_batch_negatives=False).item()
    # Query i sees only passages 3i..3i+2: the hand loss with everything else masked.
    mask = [[j // 3 != i for j in range(9)] for i in range(3)]
    assert got == pytest.approx(_hand_loss(q, p, 3, 0.1, mask), abs=1e-9)


def test_false_negative_masking():
    q, p = _data(B=3, N=1)
    # Passage 2 (query 1's positive) is the same document as query 0's positive (id 10): for query 0 it is a
    # false negative, for query 1 it is the label. Query 2's negative (passage 5) has id 10 too, but query 2's
    # positives are not 10, so it stays.
    passage_keys = torch.tensor([10, 11, 10, 12, 13, 10])
    positive_keys = torch.tensor([[10, -1], [10, 99], [13, -1]])
    got = info_nce(
        q, p, num_negatives=1, temperature=0.05, passage_keys=passage_keys, positive_keys=positive_keys
    ).item()
    mask = [[False] * 6 for _ in range(3)]
    mask[0][2] = True  # query 0: passage 2 shares its positive's id
    mask[0][5] = True  # and so does passage 5
    mask[1][0] = mask[1][5] = True  # query 1: passages 0 and 5 have its positive's id 10
    assert got == pytest.approx(_hand_loss(q, p, 2, 0.05, mask), abs=1e-9)
    unmasked = info_nce(q, p, num_negatives=1, temperature=0.05).item()
    assert got < unmasked


def test_matryoshka_averages_truncations():
    q, p = _data(N=1)
    got = info_nce(q, p, num_negatives=1, temperature=0.05, dims=(4, 8)).item()
    want = (_hand_loss(q[:, :4], p[:, :4], 2, 0.05) + _hand_loss(q, p, 2, 0.05)) / 2
    assert got == pytest.approx(want, abs=1e-9)


NEGATIVES = (1, 2)


def _rank_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for negatives in NEGATIVES:
            q, p = _data(B=4, N=negatives)  # the global batch, the same on every rank
            B, G = 2, 1 + negatives  # per-rank queries, passages per query
            q_r = q[rank * B : (rank + 1) * B].clone().requires_grad_(True)
            p_r = p[rank * B * G : (rank + 1) * B * G].clone().requires_grad_(True)
            loss = info_nce(q_r, p_r, num_negatives=negatives, temperature=0.05, gather=True)
            (loss / world).backward()  # FSDP averages gradients over ranks: the same 1/world
            results[(rank, negatives)] = (loss.item(), q_r.grad.clone(), p_r.grad.clone())
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank_worker, args=(2, free_port(), results), nprocs=2, join=True)
    return dict(results)


@pytest.mark.parametrize("negatives", NEGATIVES)
def test_two_ranks_match_one(negatives, two_rank_results):
    """Rank r's labels point at its own positives inside the gathered passages: the mean of the two ranks' losses
    and the gradients each rank gets for its rows equal one process computing the whole batch."""
    results = {r: two_rank_results[(r, negatives)] for r in range(2)}
    q, p = _data(B=4, N=negatives)
    q.requires_grad_(True)
    p.requires_grad_(True)
    full = info_nce(q, p, num_negatives=negatives, temperature=0.05)
    full.backward()
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(full.item(), abs=1e-12)
    assert full.item() == pytest.approx(_hand_loss(q.detach(), p.detach(), 1 + negatives, 0.05), abs=1e-9)
    G = 1 + negatives
    for r in range(2):
        torch.testing.assert_close(results[r][1], q.grad[r * 2 : (r + 1) * 2], rtol=0, atol=1e-12)
        torch.testing.assert_close(results[r][2], p.grad[r * 2 * G : (r + 1) * 2 * G], rtol=0, atol=1e-12)
    # The two ranks' losses differ (they hold different queries): a wrong offset could not hide in the mean.
    assert results[0][0] != pytest.approx(results[1][0])


def test_gradcache_sorted_and_packed_forwards_give_plain_gradients():
    from bidir_core.batching import pad_batch
    from bidir_core.testing import tiny_encoder

    encoder = tiny_encoder()
    g = torch.Generator().manual_seed(1)
    lengths = [5, 9, 3, 12, 7, 4]  # queries; passages below
    q_ids, q_mask = pad_batch([torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths], 0)
    p_lengths = [11, 6, 14, 8, 3, 9, 10, 5, 13, 7, 6, 12]
    p_ids, p_mask = pad_batch([torch.randint(3, 300, (n,), generator=g).tolist() for n in p_lengths], 0)
    batch = MicroBatch(q_ids, q_mask, p_ids, p_mask, torch.arange(12), torch.arange(0, 12, 2)[:, None], 0, 0)

    embed = EncoderEmbed(encoder, torch.device("cpu"))  # (ids, mask) or (PackedBatch, None)

    def loss_fn(q, p):
        return info_nce(
            q,
            p,
            num_negatives=1,
            temperature=0.05,
            passage_keys=batch.passage_keys,
            positive_keys=batch.positive_keys,
        )

    grads = []
    losses = []
    # plain; GradCache chunks of 2 and 4; length-sorted forward chunks of 2 and 4; packed forwards of at most
    # 20 / 1000 real tokens, alone, under GradCache and with a row cap: all the same gradients
    runs = [(None, None, None), (2, None, None), (4, None, None), (None, 2, None), (None, 4, None)]
    runs += [(None, None, 20), (None, None, 1000), (2, None, 20), (None, 3, 1000)]
    for cache, forward, tokens in runs:
        encoder.zero_grad()
        losses.append(
            forward_backward(
                embed, loss_fn, batch.groups, scale=0.5, chunking=Chunking(cache, forward, tokens)
            )
        )
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters()})
    for other in grads[1:]:
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad, rtol=0, atol=1e-5, msg=name)
    assert losses[1:] == pytest.approx([losses[0]] * (len(runs) - 1), abs=1e-5)
    assert max(g.abs().max().item() for g in grads[0].values()) > 1e-3  # gradients are not trivially zero


@pytest.mark.parametrize("max_tokens", [None, 20], ids=["padded", "packed"])
def test_gradcache_replays_dropout(max_tokens):
    """With dropout in the model (LoRA's lora_dropout here), GradCache's gradients are those of the loss it returns.

    The oracle is a step without the cache whose forward_chunk is the cache chunk: it embeds the same chunks in the
    same order, so from the same seed it draws the same dropout masks as GradCache's first (no-grad) pass and
    computes the same loss, and autograd gives that loss's exact gradient. GradCache's re-embedding must draw those
    masks again: without the replay it draws fresh ones, and its gradients belong to no loss that was computed (off
    by more than the largest gradient here; with the replay, by at most 2.4e-7: fp32 rounding). After the step the
    random stream is where the oracle's left it too, so later draws (the next micro-batch's masks) do not depend on
    loss.cache_chunk_size."""
    from bidir_core.batching import pad_batch
    from bidir_core.testing import tiny_encoder
    from bidir_train.config import LoraConfig
    from bidir_train.lora import peft_config

    encoder = tiny_encoder()
    peft.inject_adapter_in_model(peft_config(LoraConfig(rank=4, alpha=8.0, dropout=0.3)), encoder.model)
    with (
        torch.no_grad()
    ):  # PEFT starts B at zero; random B lets the masks change the embeddings, not only B's grad
        for name, param in encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    encoder.train()
    g = torch.Generator().manual_seed(2)
    q_ids, q_mask = pad_batch([torch.randint(3, 300, (n,), generator=g).tolist() for n in [5, 9, 3, 12]], 0)
    p_ids, p_mask = pad_batch([torch.randint(3, 300, (n,), generator=g).tolist() for n in [11, 6, 14, 8]], 0)
    batch = MicroBatch(q_ids, q_mask, p_ids, p_mask, torch.arange(4), torch.arange(4)[:, None], 0, 0)

    embed = EncoderEmbed(encoder, torch.device("cpu"))  # (ids, mask) or (PackedBatch, None)

    def loss_fn(q, p):
        return info_nce(q, p, num_negatives=0, temperature=0.05)

    def step(**chunks):
        encoder.zero_grad()
        torch.manual_seed(7)
        loss = forward_backward(
            embed, loss_fn, batch.groups, scale=0.5, chunking=Chunking(**chunks, max_tokens=max_tokens)
        )
        grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
        return loss, grads, torch.get_rng_state()

    cached_loss, cached, cached_rng = step(cache_chunk=2)
    plain_loss, plain, plain_rng = step(forward_chunk=2)
    assert cached_loss == plain_loss  # the same masks in the first pass: the same loss, bit for bit
    assert cached.keys() == plain.keys() and any("lora_A" in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(cached[name], grad, rtol=0, atol=1e-6, msg=name)
    assert torch.equal(cached_rng, plain_rng)
    # The masks matter: another draw gives another loss (so equal gradients above are not dropout being inert).
    torch.manual_seed(8)
    again = forward_backward(
        embed, loss_fn, batch.groups, chunking=Chunking(forward_chunk=2, max_tokens=max_tokens)
    )
    assert again != plain_loss
