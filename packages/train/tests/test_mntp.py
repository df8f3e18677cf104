"""MNTP: the loss against a hand computation, masking, the stage in the training loop (lower loss, exact resume,
2 FSDP ranks = 1), and its checkpoint as the start of a contrastive run."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from train_testing import assert_same_final, loss_curve, recipe_args, torchrun_train, train_recipe

from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_core.testing import tiny_encoder, tiny_tokenizer
from bidir_train import load_recipe
from bidir_train.mntp import (
    IGNORE,
    MaskingCollator,
    TextRow,
    TextSampler,
    mask_tokens,
    mntp_forward_backward,
)

TEXTS = [f"the {w} of item {i} is {w}ed by the parser" for i in range(20) for w in ("sort", "hash", "copy")]


@pytest.fixture(scope="module")
def texts_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def _mntp_args(model, texts, out, *extra):
    """An MNTP run: global batch 8 in micro-batches of 4."""
    mntp = (
        "objective=mntp",
        "data.num_negatives=0",
        "schedule.global_batch_size=8",
        "schedule.micro_batch_size=4",
    )
    return recipe_args(model, texts, out, *mntp, *extra)


def _collate(probability=0.3):
    tokenizer = tiny_tokenizer()
    collate = MaskingCollator(tokenizer, max_length=32, probability=probability, mask_token="<pad>")
    return collate([TextRow(t, seed=i) for i, t in enumerate(TEXTS[:6])])


def test_loss_matches_hand_computation():
    """Mean over masked tokens of -log p(original token i | output at position i - 1), logits = h @ E^T."""
    encoder = tiny_encoder(tie_word_embeddings=True)
    model = encoder.model.train()
    batch = _collate()
    loss = mntp_forward_backward(model, batch, device=torch.device("cpu"), autocast=contextlib.nullcontext)

    with torch.no_grad():
        hidden = model(batch.input_ids, batch.attention_mask)  # (B, T, H)
        logits = hidden @ model.embed_tokens.weight.T  # (B, T, V): the whole LM head, every position
        terms = []
        for b in range(hidden.shape[0]):
            for i in range(hidden.shape[1]):
                if batch.labels[b, i] != IGNORE:
                    terms.append(-F.log_softmax(logits[b, i - 1], dim=-1)[batch.labels[b, i]])
    assert len(terms) >= 6  # every text has at least one masked token
    assert loss == pytest.approx(torch.stack(terms).mean().item(), abs=1e-5)
    assert model.embed_tokens.weight.grad.abs().max() > 0  # the (tied) head is trained


def test_sorted_and_packed_chunks_give_the_same_loss_and_gradients():
    """Length-sorted padded chunks, and packed chunks of at most 30 / 1000 real tokens (no padding; a text's
    first token is never a target, so no text is predicted from its neighbour's last state): the same loss."""
    batch = _collate()
    results = []
    for chunk, tokens in ((None, None), (2, None), (None, 30), (None, 1000), (2, 1000)):
        model = tiny_encoder(tie_word_embeddings=True).model.train()
        loss = mntp_forward_backward(
            model,
            batch,
            device=torch.device("cpu"),
            autocast=contextlib.nullcontext,
            chunk=chunk,
            max_tokens=tokens,
        )
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    loss_a, grads_a = results[0]
    for loss_b, grads_b in results[1:]:
        assert loss_b == pytest.approx(loss_a, abs=1e-5)
        for name, grad in grads_a.items():
            torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=1e-5, msg=name)


def test_masking_rule():
    ids = list(range(10, 210))  # one long text of non-special tokens
    specials = {10, 50}
    g = torch.Generator().manual_seed(0)
    inputs, labels = mask_tokens(
        ids, probability=0.2, mask_id=3, vocab_size=300, special_ids=specials, generator=g
    )
    chosen = [i for i, label in enumerate(labels) if label != IGNORE]
    assert (
        0 not in chosen and 40 not in chosen
    )  # never the first token (nothing before it), never a special one
    assert all(labels[i] == ids[i] for i in chosen)
    assert all(
        inputs[i] == ids[i] for i in range(len(ids)) if i not in chosen
    )  # unchosen tokens are untouched
    assert 25 <= len(chosen) <= 55  # ~20% of 198 eligible
    masked = sum(inputs[i] == 3 for i in chosen)
    assert 0.6 * len(chosen) <= masked <= 0.95 * len(chosen)  # ~80% become the mask token
    again = mask_tokens(
        ids,
        probability=0.2,
        mask_id=3,
        vocab_size=300,
        special_ids=specials,
        generator=torch.Generator().manual_seed(0),
    )
    assert again == (inputs, labels)  # a row's seed fixes its masks
    one = mask_tokens([5, 6], probability=1e-9, mask_id=3, vocab_size=300, special_ids=set(), generator=g)
    assert one[1] == [IGNORE, 6]  # at least one token of every text of two or more


def test_sampler_rows_do_not_depend_on_world_size_or_resume():
    sampler = TextSampler(TEXTS, global_batch_size=8, seed=1, where="t")
    assert sampler.steps_per_epoch == len(TEXTS) // 8 and sampler.unused_per_epoch == len(TEXTS) % 8
    rows = sampler.rows(0, 2)
    fresh = TextSampler(TEXTS, global_batch_size=8, seed=1, where="t")
    assert fresh.rows(0, 2) == rows  # the same rows and seeds without having seen steps 0 and 1
    assert fresh.rows(1, 2) != rows
    assert len({r.seed for e in range(2) for s in range(7) for r in sampler.rows(e, s)}) == 2 * 7 * 8


def test_stage_lowers_the_loss_and_resumes_exactly(tied_checkpoint, texts_txt, tmp_path):
    straight = tmp_path / "straight"
    summary = train_recipe(_mntp_args(tied_checkpoint, texts_txt, straight, "schedule.max_steps=12"))
    losses = loss_curve(straight)
    assert summary["steps"] == 12 and len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3  # it learns

    resumed = tmp_path / "resumed"
    args = _mntp_args(
        tied_checkpoint, texts_txt, resumed, "schedule.max_steps=12", "checkpoint.every_steps=5"
    )
    first = train_recipe([*args, "schedule.stop_at_step=7"])
    assert first["final"] is None
    train_recipe(args)
    assert loss_curve(resumed) == losses
    assert_same_final(straight, resumed)


def test_checkpoint_starts_a_contrastive_run(tied_checkpoint, texts_txt, train_jsonl, tmp_path):
    mntp = train_recipe(_mntp_args(tied_checkpoint, texts_txt, tmp_path / "mntp", "schedule.max_steps=3"))
    adapted = BiEncoder.from_pretrained(mntp["final"])
    before = BiEncoder.from_pretrained(tied_checkpoint)
    assert abs(adapted.encode_queries(["sort"]) - before.encode_queries(["sort"])).max() > 1e-4

    out = tmp_path / "contrastive"
    summary = train_recipe(recipe_args(mntp["final"], train_jsonl, out, "schedule.max_steps=2"))
    assert summary["steps"] == 2 and BiEncoder.from_pretrained(summary["final"]).encode_queries(
        ["x"]
    ).shape == (1, 64)


def test_two_ranks_match_one(tied_checkpoint, texts_txt, tmp_path):
    """FSDP2 over 2 gloo ranks: the tied LM head is used after the sharded forward; same losses and weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = _mntp_args(tied_checkpoint, texts_txt, one, "schedule.max_steps=4", "checkpoint.every_steps=0")
    train_recipe(args)
    torchrun_train(2, [a.replace(str(one), str(two)) for a in args])
    assert loss_curve(two) == pytest.approx(loss_curve(one), abs=1e-5)
    assert_same_final(one, two, atol=1e-5)


def test_bad_input(tied_checkpoint, tiny_checkpoint, texts_txt, tmp_path):
    with pytest.raises(BidirError, match="untied and was not found"):
        train_recipe(_mntp_args(tiny_checkpoint, texts_txt, tmp_path / "a"))
    assert not (tmp_path / "a" / "final").exists()
    with pytest.raises(BidirError, match="objective must be one of contrastive, mntp"):
        load_recipe("tiny", ["objective=mlm"])
    with pytest.raises(BidirError, match="mask_probability must be in"):
        load_recipe("tiny", ["objective=mntp", "mntp.mask_probability=1.5"])
    with pytest.raises(BidirError, match="is 4 tokens for this tokenizer"):
        train_recipe([*_mntp_args(tied_checkpoint, texts_txt, tmp_path / "b"), "mntp.mask_token=ab cd"])
    with pytest.raises(BidirError, match="text_fields is for objective: mntp"):
        train_recipe(
            ["tiny", f"model.path={tied_checkpoint}", f"data.train={texts_txt}", "data.text_fields=[x]"]
        )


def test_untied_checkpoint_uses_its_own_frozen_head(tmp_path, texts_txt):
    """A Hugging Face LlamaForCausalLM folder with its own lm_head.weight: MNTP predicts through that head (frozen)
    and the saved embedder has no head."""
    from bidir_core.sources import load_lm_head
    from bidir_core.testing import write_hf_llama

    folder = write_hf_llama(tmp_path / "hf")
    head = load_lm_head(folder, torch.float32)
    assert head is not None and head.shape == (tiny_tokenizer().vocab_size, 64)
    assert load_lm_head(tmp_path / "hf", torch.float32).equal(head)
    out = tmp_path / "out"
    summary = train_recipe(_mntp_args(folder, texts_txt, out, "schedule.max_steps=2"))
    assert summary["steps"] == 2 and all(map(math.isfinite, loss_curve(out)))
    saved = load_file(out / "final" / "model.safetensors")
    assert not any(k.startswith("lm_head") for k in saved)
    assert load_lm_head(out / "final", torch.float32) is None
