"""objective: reranker through the trainer on a tiny random model: a fresh seeded head on a source without one, FSDP2
parity across world sizes, exact resume (with LoRA too, whose head trains fully), and final/ a reranker checkpoint
that CrossEncoder loads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from train_testing import RESUMABLE, assert_same_final, loss_curve, torchrun_train, train_recipe

from bidir_core.cross_encoder import CrossEncoder, new_score_head

RERANKER = ("objective=reranker", "rerank.template={query}|{passage}", "rerank.max_length=40", *RESUMABLE)
LORA = ("lora.rank=4", "optim.lr=1e-2")


@pytest.fixture(scope="module")
def straight(tiny_args, tmp_path_factory):
    """The reference: 4 reranker steps on one process, a checkpoint after each."""
    out = tmp_path_factory.mktemp("straight")
    assert train_recipe(tiny_args(out, *RERANKER))["steps"] == 4
    return out


def test_resume_is_exact(tiny_args, straight, tmp_path):
    args = tiny_args(tmp_path, *RERANKER)
    assert train_recipe([*args, "schedule.stop_at_step=2"])["final"] is None
    assert train_recipe(args)["steps"] == 4
    assert loss_curve(tmp_path) == loss_curve(straight)
    assert_same_final(straight, tmp_path)


def test_final_is_a_reranker_with_a_trained_head(straight, tiny_checkpoint):
    reranker = CrossEncoder.from_pretrained(straight / "final")
    assert (reranker.config.template, reranker.config.max_length) == ("{query}|{passage}", 40)
    scores = reranker.predict([("how do i sort item 3", "sort returns"), ("open", "a file")])
    assert scores.shape == (2,) and all(abs(s) < 1e3 for s in scores)
    initial = new_score_head(reranker.model.config, seed=0).weight  # the head drawn from schedule.seed
    assert (reranker.score.weight - initial).abs().max() > 1e-4
    base = load_file(tiny_checkpoint / "model.safetensors")
    trained = reranker.model.state_dict()
    assert (
        trained["layers.0.self_attn.q_proj.weight"] - base["layers.0.self_attn.q_proj.weight"]
    ).abs().max() > 0
    losses = loss_curve(straight)
    assert losses[0] != pytest.approx(losses[-1], abs=1e-4)


def test_two_ranks_match_one(tiny_args, straight, tmp_path):
    """FSDP2 over 2 gloo ranks (the head sharded as the root's parameter), micro-batch 1 per rank: the losses and
    the final weights of one process."""
    torchrun_train(2, tiny_args(tmp_path, *RERANKER, "schedule.micro_batch_size=1"))
    assert loss_curve(tmp_path) == pytest.approx(loss_curve(straight), abs=1e-5)
    # Adam divides by sqrt(v): a gradient within rounding of 0 (summed in another order over two ranks) moves its
    # weight by up to lr (1e-3) a step, so a few weights differ by more than the losses do; 1e-4 still tells a
    # missed step or an unsharded head apart.
    assert_same_final(straight, tmp_path, atol=1e-4)


def test_lora_trains_the_head_fully_resumes_exactly_and_shards(tiny_args, tmp_path):
    """LoRA on the decoder, the head trained fully: resume is exact, and two FSDP2 ranks (frozen base, adapters and
    the root's head sharded) give the losses and final weights of one process."""
    whole = tmp_path / "whole"
    train_recipe(tiny_args(whole, *RERANKER, *LORA))
    args = tiny_args(tmp_path / "resumed", *RERANKER, *LORA)
    train_recipe([*args, "schedule.stop_at_step=2"])
    train_recipe(args)
    assert loss_curve(tmp_path / "resumed") == loss_curve(whole)
    assert_same_final(whole, tmp_path / "resumed")
    torchrun_train(2, tiny_args(tmp_path / "ranks", *RERANKER, *LORA, "schedule.micro_batch_size=1"))
    assert loss_curve(tmp_path / "ranks") == pytest.approx(loss_curve(whole), abs=1e-5)
    assert_same_final(whole, tmp_path / "ranks", atol=1e-4)  # see test_two_ranks_match_one
    reranker = CrossEncoder.from_pretrained(whole / "final")
    initial = new_score_head(reranker.model.config, seed=0).weight
    assert (reranker.score.weight - initial).abs().max() > 1e-3  # the head trained, not adapted or frozen
    assert (whole / "adapter" / "adapter_model.safetensors").is_file()
    assert torch.isfinite(torch.from_numpy(reranker.predict([("q", "p")]))).all()


def test_a_reranker_source_keeps_its_head_and_settings(straight, train_jsonl, device):
    """Training on from a reranker checkpoint starts from its head (no fresh one) and its template and length."""
    from bidir_train import load_recipe
    from bidir_train.weights import load_model

    saved = CrossEncoder.from_pretrained(straight / "final")
    cfg = load_recipe(
        "tiny", ["objective=reranker", f"model.path={straight / 'final'}", f"data.train={train_jsonl}"]
    )
    loaded = load_model(cfg, device)
    assert isinstance(loaded, CrossEncoder) and loaded.config == saved.config
    assert torch.equal(loaded.score.weight.detach().cpu(), saved.score.weight)
    assert loaded.score.weight.requires_grad
