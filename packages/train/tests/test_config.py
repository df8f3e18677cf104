"""Recipes load; unknown keys and bad overrides fail with a one-line error naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bidir_core.errors import BidirError
from bidir_train.config import TrainConfig
from bidir_train.recipe import available_recipes, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_every_recipe_loads():
    files = sorted(RECIPES.glob("*.yaml"))
    assert {p.stem for p in files} >= {"default", "tiny", "llama3_2_1b", "llama_embed_nemotron_8b"}
    for path in files:
        cfg = load_recipe(path)
        assert isinstance(cfg, TrainConfig)
        assert cfg.name == path.stem
        assert path.read_text().startswith("#"), f"{path.name} has no header comment"


def test_recipe_by_name_and_defaults():
    assert "default" in available_recipes()
    cfg = load_recipe("default")
    assert cfg.model.path == "smollm2-135m"
    assert cfg.data.train == "stdlib-docstrings"
    assert cfg.output_dir == Path("runs/default")
    # a quoted ~ is the home folder, for the run folder's checks and for everything written there
    assert load_recipe("default", ["logging.output_dir=~/runs/x"]).output_dir == Path.home() / "runs/x"


def test_nemo_recipes_hyperparameters():
    for name, lr in (("llama3_2_1b", 5e-6), ("llama_embed_nemotron_8b", 2e-6)):
        cfg = load_recipe(name)
        assert cfg.schedule.global_batch_size == 128
        assert cfg.loss.temperature == 0.02
        assert cfg.data.num_negatives == 4
        assert cfg.model.query_max_length == cfg.model.passage_max_length == 512
        assert cfg.optim.lr == lr
        assert (cfg.model.precision, cfg.model.pooling) == ("bf16", "avg")


def test_reranker_recipes():
    """NeMo AutoModel's Llama-3.2-1B reranker: groups of 1 + 4, lr 3e-6, 128 queries a step, 512 tokens, bf16;
    and the CPU one on the embedded default."""
    nemo = load_recipe("reranker_llama3_2_1b")
    assert (nemo.objective, nemo.rerank.loss, nemo.data.num_negatives) == ("reranker", "group_ce", 4)
    assert (nemo.optim.lr, nemo.schedule.global_batch_size, nemo.rerank.max_length) == (3e-6, 128, 512)
    assert nemo.model.precision == "bf16" and nemo.eval.dev is None
    cpu = load_recipe("reranker")
    assert (cpu.objective, cpu.model.path, cpu.eval.dev) == ("reranker", "smollm2-135m", None)
    assert cpu.data.num_negatives >= 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rerank.loss=listwise", "rerank.loss"),
        ("rerank.max_length=0", "rerank.max_length must be >= 1"),
        ("loss.distill=kd", "loss.distill"),
        ("loss.distill_temperature=0", "loss.distill_weight and loss.distill_temperature must be > 0"),
    ],
)
def test_reranker_and_distillation_keys_are_checked(override, message):
    with pytest.raises(BidirError, match=message) as e:
        load_recipe("reranker", [override])
    assert "\n" not in str(e.value)


def test_overrides_are_parsed_and_typed():
    cfg = load_recipe(
        "tiny",
        [
            "optim.lr=1e-5",  # YAML 1.1 reads this as a string: accepted for a float field
            "schedule.max_steps=10",
            "loss.matryoshka_dims=[16, 32]",
            "eval.dev=null",
            "optim.betas=[0.8, 0.9]",
            "model.query_prefix=q> ",
            "loss.cache_chunk_size=2",
        ],
    )
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.max_steps == 10
    assert cfg.loss.matryoshka_dims == (16, 32)
    assert cfg.eval.dev is None
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.query_prefix == "q> "
    assert cfg.loss.cache_chunk_size == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1e-5", "unknown key optim.lrr; did you mean optim.lr?"),
        ("optimm.lr=1e-5", "unknown key optimm; did you mean optim?"),
        ("schedule.max_steps=ten", "schedule.max_steps must be an integer or null, got 'ten'"),
        ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
        ("loss.in_batch_negatives=maybe", "loss.in_batch_negatives must be true or false"),
        ("schedule.decay=step", "schedule.decay must be one of linear, cosine, constant"),
        ("schedule.micro_batch_size=3", "not a multiple of schedule.micro_batch_size=3"),
        ("optim.betas=[0.9]", "optim.betas must be a list [a number, a number]"),
        ("loss.temperature=0", "loss.temperature must be > 0"),
        ("schedule.max_tokens_per_forward=0", "schedule.max_tokens_per_forward must be >= 1, got 0"),
        ("schedule.packing=yes", "schedule.packing must be one of auto, packed, padded"),
        ("lr", "expected section.key=value"),
    ],
)
def test_bad_override(override, message):
    with pytest.raises(BidirError) as e:
        load_recipe("tiny", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.temperature=.nan", "loss.temperature must be a finite number, got nan"),
        ("optim.lr=.nan", "optim.lr must be a finite number"),
        ("optim.lr=-1", "optim.lr must be > 0, got -1.0"),
        ("optim.lr=.inf", "optim.lr must be a finite number"),
        ("optim.betas=[0.9, .nan]", "optim.betas must be a finite number"),
        ("optim.betas=[0.9, 1.5]", "optim.betas must be in [0, 1)"),
        ("optim.max_grad_norm=0", "optim.max_grad_norm must be > 0 or null"),
    ],
)
def test_non_finite_or_out_of_range_config_value(override, message):
    with pytest.raises(BidirError) as e:
        load_recipe("tiny", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  pooling: avg\n  qeury_prefix: 'q: '\n")
    with pytest.raises(
        BidirError, match=r"r.yaml: unknown key model.qeury_prefix; did you mean model.query_prefix\?"
    ):
        load_recipe(path)


def test_missing_recipe():
    with pytest.raises(BidirError, match="no such recipe file or packaged recipe"):
        load_recipe("no-such-recipe")
