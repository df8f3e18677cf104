"""CrossEncoder against the oracle, transformers' {Family}ForSequenceClassification on the same weights (last-token
pooling, causal or is_causal false), and its text API: batching, packing, saving, bad input.

Tolerance 1e-5 in fp32, as the hidden-state parity tests: the logit is one dot product of those states with the
head. Measured here: at most 2.4e-7 from transformers on logits up to 3.4 (both families, both attention modes,
both padding sides), 1.2e-7 between packed and padded predict().
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from errors_testing import one_line_error
from parity_testing import padded_batch

from bidir_core import BidirError, BiEncoder, CrossEncoder, RerankerConfig
from bidir_core.batching import pad_batch
from bidir_core.families import family_of
from bidir_core.packed import pack
from bidir_core.reranker_config import tokenize_pairs
from bidir_core.testing import tiny_cross_encoder, tiny_tokenizer

ATOL = 1e-5

PAIRS = [
    ("how do i sort a list", "return a new sorted list from the items in iterable"),
    ("fox", "the quick brown fox jumps over the lazy dog"),
    ("dense retrieval", "embeddings for semantic search {and} braces }{"),
    ("a", "b"),
]


def _oracle(ce: CrossEncoder):
    """transformers' {Family}ForSequenceClassification holding ce's decoder and head (one label, pad id 0)."""
    config = copy.deepcopy(ce.model.config)
    config.num_labels, config.pad_token_id = 1, ce.tokenizer.pad_token_id
    cls = getattr(transformers, f"{family_of(config).name}ForSequenceClassification")
    oracle = cls(config).eval()
    state = {f"model.{k}": v for k, v in ce.model.state_dict().items()} | {"score.weight": ce.score.weight}
    oracle.load_state_dict(state, strict=True)
    return oracle


def _oracle_logits(oracle, ids, mask) -> torch.Tensor:
    # Positions of the real tokens given explicitly (transformers' default is arange(T) whatever the padding); the
    # oracle finds each row's last real token by the pad id, which padded_batch's ids (3..319) never are.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return oracle(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, 0]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_logits_match_transformers_sequence_classification(family, attention):
    ce = tiny_cross_encoder(RerankerConfig(pooling="last", attention=attention), family=family)
    oracle = _oracle(ce)
    for padding_side in ("right", "left"):
        ids, mask = padded_batch(padding_side)
        with torch.no_grad():
            got = ce(ids, mask)
        assert got.dtype == torch.float32 and got.shape == (3,)
        torch.testing.assert_close(got, _oracle_logits(oracle, ids, mask), atol=ATOL, rtol=0)
    row = ids[:1, -17:], mask[:1, -17:]  # batch size 1, no padding
    with torch.no_grad():
        torch.testing.assert_close(ce(*row), _oracle_logits(oracle, *row), atol=ATOL, rtol=0)


@pytest.mark.parametrize("pooling", ["avg", "last", "cls", "weighted_avg"])
def test_temperature_divides_and_packed_equals_padded(pooling):
    ce = tiny_cross_encoder(RerankerConfig(pooling=pooling))
    hot = tiny_cross_encoder(RerankerConfig(pooling=pooling, temperature=0.05))
    ids, mask = padded_batch("left")
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    with torch.no_grad():
        padded, packed = ce(ids, mask), ce(pack(rows))
        torch.testing.assert_close(packed, padded, atol=ATOL, rtol=0)
        torch.testing.assert_close(hot(ids, mask), padded / 0.05, atol=ATOL / 0.05, rtol=0)


def test_forward_is_differentiable():
    ce = tiny_cross_encoder()
    ids, mask = padded_batch("right")
    ce(ids, mask).sum().backward()
    assert ce.score.weight.grad is not None and ce.model.embed_tokens.weight.grad is not None


def test_predict_is_batch_independent_and_ordered():
    """A pair's score is the same alone, among neighbours, packed or padded, whatever the batch size."""
    ce = tiny_cross_encoder()
    alone = np.array([ce.predict([pair])[0] for pair in PAIRS])
    for kwargs in ({}, {"packed": False}, {"batch_size": 1}, {"packed": True, "max_tokens": 20}):
        scores = ce.predict(PAIRS, **kwargs)
        assert scores.dtype == np.float32 and scores.shape == (len(PAIRS),)
        np.testing.assert_allclose(scores, alone, atol=ATOL)
    # The scores are those of the formatted texts, one forward each.
    ids = [ce.tokenizer(ce.format(q, p))["input_ids"] for q, p in PAIRS]
    with torch.no_grad():
        want = torch.cat([ce(*pad_batch([row], 0)) for row in ids]).numpy()
    np.testing.assert_allclose(alone, want, atol=ATOL)
    sig = ce.predict(PAIRS, activation="sigmoid")
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-alone)), atol=1e-6)
    assert ce.predict([]).shape == (0,)


def test_rank_sorts_by_predict():
    ce = tiny_cross_encoder()
    docs = [p for _, p in PAIRS]
    scores = ce.predict([("fox", d) for d in docs])
    ranked = ce.rank("fox", docs, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == list(np.argsort(-scores, kind="stable"))
    assert [r["score"] for r in ranked] == sorted(scores.tolist(), reverse=True)
    assert all(r["text"] == docs[r["corpus_id"]] for r in ranked)
    top = ce.rank("fox", docs, top_k=2)
    assert top == [{k: v for k, v in r.items() if k != "text"} for r in ranked[:2]]


def test_format_keeps_user_braces_and_truncation_cuts_the_passage():
    ce = tiny_cross_encoder(RerankerConfig(template="<{query}|{passage}", max_length=12))
    assert ce.format("{passage}", "{{x}}") == "<{passage}|{{x}}"
    ids, cut = ce.tokenize_pairs([("fox", "the quick brown fox jumps over the lazy dog " * 3), ("a", "b")])
    assert cut == 1 and len(ids[0]) == 12
    whole = ce.tokenizer(ce.format("fox", "the quick brown fox jumps over the lazy dog " * 3))["input_ids"]
    assert ids[0] == whole[:12]  # the head of the joined text: the query and the start of the passage
    with pytest.warns(UserWarning, match="1 of 2 pairs were longer than max_length=12"):
        ce.predict([("fox", "the quick brown fox jumps over the lazy dog " * 3), ("a", "b")])


def test_truncation_keeps_what_the_template_puts_after_the_passage():
    """A template with text after {passage} (a chat prompt's end) keeps it whole; the passage's end is cut."""
    ce = tiny_cross_encoder(RerankerConfig(template="Q {query} P {passage} the end", max_length=16))
    long = "the quick brown fox jumps over the lazy dog " * 3
    (ids, short), cut = ce.tokenize_pairs([("fox", long), ("a", "b")])
    assert cut == 1 and len(ids) <= 16 and short == ce.tokenizer(ce.format("a", "b"))["input_ids"]
    end = ce.tokenizer(" the end", add_special_tokens=False)["input_ids"]
    assert ids[-len(end) :] == end
    kept = next(
        k for k in range(len(long), -1, -1) if ce.tokenizer(ce.format("fox", long[:k]))["input_ids"] == ids
    )
    assert (
        len(ce.tokenizer(ce.format("fox", long[: kept + 1]))["input_ids"]) > 16
    )  # the longest start that fits


def test_tokenize_pairs_is_the_core_function_without_a_model():
    """reranker_config.tokenize_pairs needs only a tokenizer and the settings (the serving backends call it so), and
    CrossEncoder.tokenize_pairs is that function; bad pairs are errors naming their index."""
    config = RerankerConfig(template="Q {query} P {passage} the end", max_length=16)
    ce = tiny_cross_encoder(config)
    pairs = [("fox", "the quick brown fox jumps over the lazy dog " * 3), ("a", "b")]
    assert tokenize_pairs(tiny_tokenizer(), config, pairs) == ce.tokenize_pairs(pairs)
    for bad, message in (
        ([("a", "b"), "ab"], "pair 1: expected (query, passage), got str"),
        ([("a", 3)], "pair 0: the passage is a int, not a str"),
        ([("a", "b"), (" ", "b")], "pair 1: the query is empty"),
    ):
        with pytest.raises(BidirError) as e:
            tokenize_pairs(tiny_tokenizer(), config, bad)
        one_line_error(e, message)


def test_save_load_round_trip_and_transformers(tmp_path):
    """A saved reranker loads back in bidir with equal scores, and in transformers' AutoModelForSequenceClassification
    (pooling last, temperature 1) with equal logits on the formatted text."""
    for attention in ("causal", "bidirectional"):
        ce = tiny_cross_encoder(
            RerankerConfig(pooling="last", attention=attention, template="Q {query} P {passage}")
        )
        folder = ce.save_pretrained(tmp_path / attention)
        back = CrossEncoder.from_pretrained(folder)
        assert back.config == ce.config and back.model.causal == (attention == "causal")
        np.testing.assert_array_equal(back.predict(PAIRS), ce.predict(PAIRS))
        auto = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        texts = [ce.format(q, p) for q, p in PAIRS]
        batch = tokenizer(texts, padding=True, return_tensors="pt")  # right padding: positions as bidir's
        with torch.no_grad():
            logits = auto(**batch).logits[:, 0].numpy()
        np.testing.assert_allclose(logits, ce.predict(PAIRS), atol=ATOL)


def test_bf16_model_scores_in_float32(tmp_path):
    """A bf16 decoder: the head stays fp32 and predict() returns float32 (0.004 from fp32 measured on logits up to
    0.63: bf16's 8 mantissa bits through two layers; 0.02 allowed)."""
    ce = tiny_cross_encoder()
    folder = ce.save_pretrained(tmp_path / "rr")
    bf16 = CrossEncoder.from_pretrained(folder, dtype=torch.bfloat16)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16 and bf16.score.weight.dtype == torch.float32
    scores = bf16.predict(PAIRS)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, ce.predict(PAIRS), atol=0.02)
    # Saved again over itself (overwrite replaces a reranker checkpoint), then loaded: the same scores.
    bf16.save_pretrained(folder, overwrite=True)
    np.testing.assert_array_equal(
        CrossEncoder.from_pretrained(folder, dtype=torch.bfloat16).predict(PAIRS), scores
    )


def test_new_head_is_seeded_and_needed(hf_source):
    with pytest.raises(BidirError) as e:
        CrossEncoder.from_pretrained(hf_source)
    one_line_error(e, str(hf_source), "no reranker head", "new_head=True")
    torch.manual_seed(123)
    a = CrossEncoder.from_pretrained(hf_source, new_head=True)
    torch.manual_seed(456)
    b = CrossEncoder.from_pretrained(hf_source, new_head=True)
    c = CrossEncoder.from_pretrained(hf_source, new_head=True, seed=1)
    assert torch.equal(a.score.weight, b.score.weight) and not torch.equal(a.score.weight, c.score.weight)
    assert a.score.weight.dtype == torch.float32 and a.score.weight.shape == (1, 64)
    assert a.config == RerankerConfig()  # a plain decoder: bidirectional, avg, NeMo's template


def test_embedder_and_reranker_refuse_each_other(tmp_path, bidir_source):
    folder = tiny_cross_encoder().save_pretrained(tmp_path / "rr")
    with pytest.raises(BidirError) as e:
        BiEncoder.from_pretrained(folder)
    one_line_error(e, str(folder), "is a reranker; load it with CrossEncoder")
    with pytest.raises(BidirError) as e:
        CrossEncoder.from_pretrained(bidir_source)
    one_line_error(e, "no reranker head")
    # An embedder checkpoint with a new head keeps its pooling and max length.
    ce = CrossEncoder.from_pretrained(bidir_source, new_head=True)
    assert ce.config.pooling == "avg" and ce.config.attention == "bidirectional"


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("{passage}", "must contain {query} exactly once"),
        ("{query} {query} {passage}", "must contain {query} exactly once (found 2)"),
        ("{query} {passage} {title}", "has the field {title}"),
        ("{query:>5} {passage}", "has the field {query:>5}"),
        ("{query} {passage", "not a valid format string"),
    ],
)
def test_bad_template(template, needle):
    with pytest.raises(BidirError) as e:
        RerankerConfig(template=template)
    one_line_error(e, needle)


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_temperature(temperature):
    with pytest.raises(BidirError) as e:
        RerankerConfig(temperature=temperature)
    one_line_error(e, "temperature must be a finite number > 0")


@pytest.mark.parametrize(
    ("pair", "needle"),
    [(("", "b"), "pair 1: the query is empty"), (("q", "  \n"), "pair 1: the passage is empty"),
     (("q", 3), "pair 1: the passage is a int"), ("qp", "pair 1: expected (query, passage)")],
)  # fmt: skip
def test_bad_pairs_name_their_index(pair, needle):
    with pytest.raises(BidirError) as e:
        tiny_cross_encoder().predict([("a", "b"), pair])
    one_line_error(e, needle)


def test_non_finite_scores_are_an_error():
    ce = tiny_cross_encoder()
    with torch.no_grad():
        ce.model.norm.weight[0] = float("nan")
    with pytest.raises(BidirError) as e:
        ce.predict(PAIRS)
    one_line_error(e, "pair 0", "not finite")


def test_settings_must_suit_the_model():
    ce = tiny_cross_encoder()
    with pytest.raises(BidirError) as e:
        CrossEncoder(ce.model, ce.tokenizer, RerankerConfig(attention="causal"))
    one_line_error(e, "attends bidirectionally but the reranker config says attention='causal'")
    with pytest.raises(BidirError) as e:
        CrossEncoder(ce.model, ce.tokenizer, ce.config, torch.nn.Linear(64, 1))
    one_line_error(e, "score must be nn.Linear(64, 1, bias=False)")


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_sentence_transformers_cross_encoder_scores_as_bidir(tmp_path, attention):
    """sentence-transformers' CrossEncoder loads a saved reranker (pooling last, temperature 1) and gives
    predict()'s scores: it hands a pair to a model with a chat template as "query" / "document" messages, and the
    checkpoint's chat_template.jinja renders them as the template (a template holding Jinja syntax included)."""
    st = pytest.importorskip("sentence_transformers")
    config = RerankerConfig(
        pooling="last", attention=attention, template="{{% raw %}} {query} \n{{{{ {passage}"
    )
    ce = tiny_cross_encoder(config)
    folder = ce.save_pretrained(tmp_path / "rr")
    assert (folder / "chat_template.jinja").is_file()
    model = st.CrossEncoder(str(folder), activation_fn=torch.nn.Identity(), device="cpu")
    np.testing.assert_allclose(model.predict(PAIRS), ce.predict(PAIRS), atol=ATOL)


def test_embedded_default_needs_a_new_head(embedded_default):
    with pytest.raises(BidirError) as e:
        CrossEncoder.from_pretrained(embedded_default)
    one_line_error(e, "smollm2-135m: has no reranker head", "new_head=True")
    ce = CrossEncoder.from_pretrained(embedded_default, new_head=True, max_length=32)
    assert ce.config == RerankerConfig(max_length=32) and ce.score.weight.shape == (1, 576)
    scores = ce.predict(PAIRS[:2])
    assert scores.shape == (2,) and np.isfinite(scores).all()
