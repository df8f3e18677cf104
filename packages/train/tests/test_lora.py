"""LoRA (recipe section `lora`, through PEFT) on a tiny random model: only the adapters train, final/ is the merged
model (PEFT's merge checked against its own forward and against W + alpha / r * B @ A by hand), checkpoints hold
only the adapters, 2 FSDP ranks equal 1, resume is exact, and a bad target_modules is one line."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from train_testing import assert_same_final, loss_curve, recipe_args, torchrun_train, train_recipe

from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_core.model import LlamaBidirectionalModel
from bidir_core.testing import tiny_encoder
from bidir_train import load_recipe, lora
from bidir_train.checkpoints import SafeReader
from bidir_train.config import LORA_TARGETS
from bidir_train.contrastive import Contrastive
from bidir_train.optim import make_optimizer
from bidir_train.weights import load_encoder

RANK, ALPHA = 4, 8.0


def _recipe(model, data, out, *extra):
    """A LoRA run: rank RANK, alpha ALPHA."""
    return recipe_args(model, data, out, f"lora.rank={RANK}", f"lora.alpha={ALPHA}", *extra)


@pytest.fixture(scope="module")
def straight(tiny_checkpoint, train_jsonl, tmp_path_factory):
    """The reference LoRA run: 6 steps on one process, a checkpoint at step 3."""
    out = tmp_path_factory.mktemp("lora-straight")
    summary = train_recipe(_recipe(tiny_checkpoint, train_jsonl, out))
    assert summary["steps"] == 6
    return out


def test_recipe_section(tiny_checkpoint):
    assert load_recipe("tiny").lora is None  # absent: full fine-tuning
    on = load_recipe("tiny", ["lora.rank=8"])
    assert on.lora.rank == 8 and on.lora.alpha == 32 and on.lora.target_modules == LORA_TARGETS
    assert load_recipe("tiny", ["lora.rank=8", "lora=null"]).lora is None
    assert load_recipe("default_lora").lora.rank == 16
    with pytest.raises(BidirError, match="lora.rank must be >= 1"):
        load_recipe("tiny", ["lora.rank=0"])
    with pytest.raises(BidirError, match=r"lora.dropout must be in \[0, 1\)"):
        load_recipe("tiny", ["lora.dropout=1.0"])
    with pytest.raises(BidirError, match=r"unknown key lora.r \(valid: rank, alpha"):
        load_recipe("tiny", ["lora.r=8"])


def test_bad_target_modules_names_the_linears(tiny_checkpoint, train_jsonl, tmp_path):
    args = _recipe(tiny_checkpoint, train_jsonl, tmp_path / "out", "lora.target_modules=[q_proj, qkv]")
    with pytest.raises(BidirError) as e:
        train_recipe(args)
    message = str(e.value)
    assert "\n" not in message
    assert "lora.target_modules: qkv names no Linear module" in message
    assert message.endswith(", ".join(sorted(LORA_TARGETS)))
    assert not (tmp_path / "out").exists()  # stopped before anything was written


def test_only_adapters_change(tiny_checkpoint, train_jsonl, device):
    """Two optimizer steps: every base weight is bit-identical, every adapter weight moved, and the optimizer
    holds the adapters only."""
    cfg = load_recipe("tiny", _recipe(tiny_checkpoint, train_jsonl, "unused")[1:])
    encoder = load_encoder(cfg, device)
    model = encoder.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(LORA_TARGETS) * model.config.num_hidden_layers
    optimizer = make_optimizer(cfg.optim, model)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)

    objective = Contrastive(cfg, encoder, device)
    sampler = Contrastive.sampler(cfg)
    for step in range(2):
        objective.forward_backward(objective.collate(sampler.rows(0, step)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = model.state_dict()
    for key, value in before.items():
        if key in trainable:
            assert not torch.equal(after[key], value), f"{key} did not train"
        else:
            assert torch.equal(after[key], value), f"{key} changed"


def test_merge_is_base_plus_adapters():
    """PEFT's merge of trained-looking adapters (B random, not PEFT's zeros): the merged model's forward equals the
    adapted model's, and each merged weight is W + alpha / r * B @ A (by hand)."""
    base = tiny_encoder().model
    cfg = load_recipe("tiny", [f"lora.rank={RANK}", f"lora.alpha={ALPHA}"]).lora
    weights = {k: v.clone() for k, v in base.state_dict().items()}  # the merge folds into its base tensors
    state = lora.initial_state_dict(base.config, {k: v.clone() for k, v in weights.items()}, cfg, seed=0)
    generator = torch.Generator().manual_seed(1)
    for key in [k for k in state if ".lora_B." in k]:
        assert not state[key].any()  # PEFT's init: the adapted model starts as the base model
        state[key] = torch.randn(state[key].shape, generator=generator) * 0.1
    adapted = lora.with_adapters(base.config, dict(state), cfg)
    ids = torch.tensor([[1, 40, 41, 42, 43], [1, 50, 51, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = adapted(ids, mask)
        merged = lora.merge(adapted)
        assert type(merged) is LlamaBidirectionalModel
        torch.testing.assert_close(merged(ids, mask), expected, rtol=0, atol=1e-5)
        assert (merged(ids, mask) - base(ids, mask)).abs().max() > 1e-3  # the adapters did something

    merged_sd = merged.state_dict()
    assert merged_sd.keys() == weights.keys()
    for key, w in weights.items():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LORA_TARGETS:
            a, b = state[f"{module}.lora_A.default.weight"], state[f"{module}.lora_B.default.weight"]
            torch.testing.assert_close(merged_sd[key], w + ALPHA / RANK * b @ a, rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged_sd[key], w), key


def test_final_is_merged_and_checkpoints_hold_adapters(straight, tiny_checkpoint):
    base = load_file(tiny_checkpoint / "model.safetensors")
    final = load_file(straight / "final" / "model.safetensors")
    assert final.keys() == base.keys()
    for key, w in base.items():
        if key.removesuffix(".weight").rsplit(".", 1)[-1] in LORA_TARGETS:
            delta = final[key] - w
            assert delta.abs().max() > 1e-5, key  # trained
            assert torch.linalg.matrix_rank(delta, atol=1e-6) <= RANK, key  # a rank-r update
        else:
            assert torch.equal(final[key], w), key  # frozen: bit-identical

    # The adapter alone (PEFT's format) on the base model, merged by PEFT, is final/.
    assert {p.name for p in (straight / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert json.loads((straight / "adapter" / "adapter_config.json").read_text())["r"] == RANK
    base_model = BiEncoder.from_pretrained(tiny_checkpoint).model
    adapted = peft.PeftModel.from_pretrained(base_model, straight / "adapter")
    for key, w in adapted.merge_and_unload().state_dict().items():
        torch.testing.assert_close(w, final[key], rtol=0, atol=1e-6)

    encoder = BiEncoder.from_pretrained(straight / "final")  # a plain bidir checkpoint
    assert encoder.encode_queries(["how do i sort item 3"]).shape == (1, 64)

    (checkpoint,) = (straight / "checkpoints").iterdir()
    keys = set(SafeReader(checkpoint).read_metadata().state_dict_metadata)
    model_keys = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    assert len(model_keys) == 2 * len(LORA_TARGETS) * 2  # 2 layers
    assert not [k for k in keys if k.startswith("optim.") and "base_layer" in k]


def test_two_ranks_match_one(straight, tiny_checkpoint, train_jsonl, tmp_path):
    """FSDP2 over 2 gloo ranks (frozen and trainable parameters in one shard group): the same losses and final/."""
    torchrun_train(2, _recipe(tiny_checkpoint, train_jsonl, tmp_path, "schedule.micro_batch_size=1"))
    one, two = loss_curve(straight), loss_curve(tmp_path)
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, abs=1e-5)
    assert one[0] != pytest.approx(one[-1], abs=1e-3)
    assert_same_final(straight, tmp_path, atol=1e-5)


def test_resume_is_exact(tiny_checkpoint, train_jsonl, tmp_path):
    """Stop at step 2, resume to 4 == 4 steps straight: identical losses, final/ and adapter. With adapter dropout
    under GradCache, whose re-embedding replays each chunk's random state: the stream a checkpoint saves is the
    one the next step draws from."""
    extra = ("schedule.max_steps=4", "lora.dropout=0.2", "loss.cache_chunk_size=1")
    args = _recipe(tiny_checkpoint, train_jsonl, tmp_path / "resumed", *extra)
    first = train_recipe([*args, "schedule.stop_at_step=2"])
    assert first["steps"] == 2 and first["final"] is None and not (tmp_path / "resumed" / "adapter").exists()
    assert train_recipe(args)["steps"] == 4
    train_recipe(_recipe(tiny_checkpoint, train_jsonl, tmp_path / "straight", *extra))
    assert loss_curve(tmp_path / "resumed") == loss_curve(tmp_path / "straight")
    for name in ("final/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = (load_file(tmp_path / run / name) for run in ("straight", "resumed"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_activation_checkpointing_gives_the_same_run(tiny_checkpoint, train_jsonl, tmp_path):
    """checkpoint_wrapper around decoder layers with PEFT's LoRA layers inside: the same losses."""
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        train_recipe(
            _recipe(
                tiny_checkpoint,
                train_jsonl,
                out,
                "schedule.max_steps=2",
                f"parallel.activation_checkpointing={flag}",
            )
        )
        runs[flag] = loss_curve(out)
    assert runs["true"] == pytest.approx(runs["false"], abs=1e-6)


def test_mntp_with_lora(tied_checkpoint, train_jsonl, tmp_path):
    """MNTP reads the (frozen) tied embeddings as its LM head: it trains the adapters, and final/ keeps the
    embeddings bit-identical."""
    out = tmp_path / "mntp"
    summary = train_recipe(
        [
            *_recipe(tied_checkpoint, train_jsonl, out, "schedule.max_steps=2"),
            "objective=mntp",
            "data.num_negatives=0",
        ]
    )
    assert summary["steps"] == 2 and all(loss > 0 for loss in loss_curve(out))
    base = load_file(tied_checkpoint / "model.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    assert torch.equal(final["embed_tokens.weight"], base["embed_tokens.weight"])
    assert not torch.equal(final["layers.0.mlp.down_proj.weight"], base["layers.0.mlp.down_proj.weight"])


def test_foreign_adapter_folder_is_refused_before_training(tiny_checkpoint, train_jsonl, tmp_path):
    """output_dir/adapter/ holding a file PEFT does not write is never replaced: refused before the model loads."""
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "notes.txt").write_text("mine")
    with pytest.raises(BidirError, match=r"adapter: holds notes.txt, which a PEFT adapter folder does not"):
        train_recipe(_recipe(tiny_checkpoint, train_jsonl, out))
    assert [p.name for p in out.iterdir()] == ["adapter"]
    assert (out / "adapter" / "notes.txt").read_text() == "mine"
