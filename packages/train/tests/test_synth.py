"""bidir-synth: seeded generation gives the same file twice, a killed run resumes into the uninterrupted one's
output (each passage's queries exactly once), the round-trip filter keeps exactly the pairs it should, and bad
input stops in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bidir_core.datasets import read_training_examples
from bidir_core.errors import BidirError
from bidir_core.testing import random_texts, write_hf_llama
from bidir_train import synth
from bidir_train.query_generator import GenerationSettings, QueryGenerator, clean_query
from bidir_train.round_trip import round_trip_filter
from bidir_train.synth import SynthConfig, main, synthesize

SAMPLING = GenerationSettings(
    max_new_tokens=6, temperature=1.0, top_p=0.95, seed=3, queries_per_passage=2, batch_size=2
)
PROMPT = "Write a question about: {passage}"


def _one_line(excinfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, BidirError) and "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt") / "prompt.txt"
    path.write_text(PROMPT)
    return str(path)


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A tiny random LlamaForCausalLM folder with the tiny tokenizer (no chat template): a base model."""
    return write_hf_llama(tmp_path_factory.mktemp("lm") / "model")


@pytest.fixture(scope="module")
def generator(lm_folder):
    return QueryGenerator.load(str(lm_folder), prompt=PROMPT, settings=SAMPLING)


def _with(generator: QueryGenerator, **changes) -> QueryGenerator:
    """The same model and tokenizer under other settings (no reload)."""
    settings = GenerationSettings(**{**SAMPLING.__dict__, **changes})
    return QueryGenerator(generator.model, generator.tokenizer, PROMPT, settings, generator.identity)


def _txt(path, texts):
    path.write_text("".join(t + "\n" for t in texts))
    return path


def _beir(path, texts):
    path.write_text(
        "".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    return path


def test_the_same_seed_writes_the_same_file(generator, lm_folder, prompt_file, tmp_path):
    texts = random_texts(5, seed=1, max_words=12)
    corpus = _txt(tmp_path / "passages.txt", texts)
    # Once loading the model folder itself, once with the loaded generator: the same seed, the same bytes.
    cfg = SynthConfig(
        str(corpus), str(tmp_path / "a.jsonl"), str(lm_folder), prompt=prompt_file, generation=SAMPLING
    )
    first = synthesize(cfg)
    synthesize(SynthConfig(str(corpus), str(tmp_path / "b.jsonl")), generator=generator)
    synthesize(SynthConfig(str(corpus), str(tmp_path / "c.jsonl")), generator=_with(generator, seed=4))
    assert first["generated"] == 10 and first["rows"] > 0 and not (tmp_path / "a.jsonl.parts").exists()
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "c.jsonl").read_bytes() != (tmp_path / "b.jsonl").read_bytes()
    rows = list(read_training_examples(tmp_path / "a.jsonl"))
    assert len(rows) == first["rows"]
    assert all(ex.positives[0] in texts and not ex.positive_ids and not ex.negatives for ex in rows)


def test_a_killed_run_resumes_into_the_uninterrupted_output(generator, tmp_path, monkeypatch):
    texts = random_texts(7, seed=2, max_words=10)
    corpus = _beir(tmp_path / "corpus.jsonl", texts)
    synthesize(SynthConfig(str(corpus), str(tmp_path / "straight.jsonl"), chunk_size=2), generator=generator)

    out = tmp_path / "resumed.jsonl"
    cfg = SynthConfig(str(corpus), str(out), chunk_size=2)
    real_write, written = synth.write_json_atomic, []

    def killed_after_two_chunks(path, value):
        if path.name.startswith("chunk-") and len(written) == 2:
            raise KeyboardInterrupt  # the process dies while generating chunk 2
        written.append(path.name) if path.name.startswith("chunk-") else None
        return real_write(path, value)

    monkeypatch.setattr(synth, "write_json_atomic", killed_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        synthesize(cfg, generator=generator)
    monkeypatch.undo()
    parts = tmp_path / "resumed.jsonl.parts"
    assert not out.exists()  # nothing that looks complete
    assert sorted(p.name for p in parts.iterdir()) == [
        "chunk-00000.json",
        "chunk-00001.json",
        "manifest.json",
    ]
    (parts / ".chunk-00002.json.0123abcd.tmp").write_text('{"half": ')  # what a kill mid-write leaves

    # Other settings are refused, naming what differs; nothing is generated or deleted.
    with pytest.raises(BidirError) as excinfo:
        synthesize(cfg, generator=_with(generator, seed=9))
    _one_line(excinfo, "manifest.json", "generation", "--overwrite")

    generated = []
    real_generate = generator.generate

    def counting(passages, **kw):
        generated.extend(passages)
        return real_generate(passages, **kw)

    monkeypatch.setattr(generator, "generate", counting)
    summary = synthesize(cfg, generator=generator)
    assert generated == texts[4:]  # only chunks 2 and 3
    assert summary["resumed_chunks"] == 2 and summary["chunks"] == 4
    assert out.read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    assert not parts.exists()
    rows = list(read_training_examples(out))
    assert {ex.positive_ids[0] for ex in rows} <= {f"d{i}" for i in range(7)}
    assert all(ex.positives[0] == texts[int(ex.positive_ids[0][1:])] for ex in rows)

    # A finished output is not replaced without --overwrite; with it, only this writer's files go.
    with pytest.raises(BidirError) as excinfo:
        synthesize(cfg, generator=generator)
    _one_line(excinfo, "resumed.jsonl", "already exists")
    synthesize(
        SynthConfig(str(corpus), str(out), chunk_size=2, overwrite=True), generator=_with(generator, seed=9)
    )
    assert out.read_bytes() != (tmp_path / "straight.jsonl").read_bytes()


class FakeEncoder:
    """Hand-made vectors per text (normalized), so every rank is known; texts not listed get `default`."""

    def __init__(self, vectors: dict[str, list[float]], default: list[float] | None = None):
        self.vectors, self.default = vectors, default

    def _encode(self, texts, batch_size=32, normalize=True, show_progress_bar=False):
        out = np.array([self.vectors.get(t, self.default) for t in texts], dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    encode_queries = encode_documents = _encode


class FakeReranker:
    def __init__(self, scores: dict[tuple[str, str], float]):
        self.scores = scores

    def predict(self, pairs, batch_size=32, show_progress_bar=False):
        return np.array([self.scores.get(pair, 0.0) for pair in pairs], dtype=np.float32)


def _e(*weights: float) -> list[float]:
    return [*weights, *[0.0] * (5 - len(weights))]


def test_round_trip_filter_keeps_exactly_the_pairs_whose_passage_comes_back():
    corpus = ["alpha", "beta", "gamma", "Alpha "]  # the last is the first again, up to case and spaces
    vectors = {"alpha": _e(1), "beta": _e(0, 1), "gamma": _e(0, 0, 1), "Alpha ": _e(1)}
    vectors |= {
        "q1": _e(0.9, 0.1),  # from alpha: alpha first
        "q2": _e(0.2, 0.9),  # from alpha: beta first, alpha second
        "q3": _e(0, 0, 1),  # from gamma: gamma first
        "q4": _e(0, 0.3, 0.9),  # from beta: gamma first, beta second
        "q5": _e(1),  # from "Alpha ": the search returns index 0 first (ties: the lower index), the same text
    }
    queries, sources = ["q1", "q2", "q3", "q4", "q5"], [0, 0, 2, 1, 3]
    encoder = FakeEncoder(vectors)
    keep, counts = round_trip_filter(encoder, queries, sources, corpus, top_k=1)
    assert keep == [True, False, True, False, True] and counts == {"pairs": 5, "kept_embedder": 3, "kept": 3}
    keep, _ = round_trip_filter(encoder, queries, sources, corpus, top_k=3)
    assert keep == [True, True, True, True, True]

    # The reranker reorders the embedder's top 3: it puts beta above alpha for q1, gamma first for q3.
    reranker = FakeReranker(
        {("q1", "alpha"): 1.0, ("q1", "beta"): 2.0, ("q3", "gamma"): 5.0, ("q5", "alpha"): 1.0}
    )
    keep, counts = round_trip_filter(
        encoder, queries, sources, corpus, top_k=1, reranker=reranker, candidates=3
    )
    # q5: alpha and "Alpha " are both its source; no other passage scores above them
    assert keep == [False, False, True, False, True] and counts == {"pairs": 5, "kept_embedder": 3, "kept": 2}


def test_the_filter_in_a_run_keeps_the_pairs_of_the_passage_every_query_finds(
    generator, tiny_checkpoint, tmp_path
):
    texts = ["first passage here", "second one", "the third"]
    corpus = _txt(tmp_path / "p.txt", texts)
    plain = synthesize(SynthConfig(str(corpus), str(tmp_path / "plain.jsonl")), generator=generator)
    # Every query embeds as the first passage does, so only the first passage's queries come back.
    encoder = FakeEncoder({t: _e(*[0.0] * i, 1.0) for i, t in enumerate(texts)}, default=_e(1))
    cfg = SynthConfig(str(corpus), str(tmp_path / "kept.jsonl"), filter_model=str(tiny_checkpoint))
    summary = synthesize(cfg, generator=generator, encoder=encoder)
    rows = list(read_training_examples(tmp_path / "kept.jsonl"))
    expected = [ex for ex in read_training_examples(tmp_path / "plain.jsonl") if ex.positives[0] == texts[0]]
    assert 0 < len(expected) < plain["rows"]  # the filter drops some pairs and keeps some
    assert [(ex.query, ex.positives) for ex in rows] == [(ex.query, ex.positives) for ex in expected]
    assert summary["filter"] == {
        "pairs": plain["rows"],
        "kept_embedder": len(expected),
        "kept": len(expected),
    }


def test_a_chat_template_wraps_the_prompt(tmp_path):
    folder = write_hf_llama(tmp_path / "chat")
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    g = QueryGenerator.load(str(folder), prompt=PROMPT, settings=GenerationSettings(max_new_tokens=4))
    ids, cut = g.fit("over the lazy dog")
    assert g.chat and not cut
    text = g.tokenizer.decode(ids)
    assert text.startswith("<s>[user] Write a question about: over the lazy dog\n") and text.endswith(
        "[assistant] "
    )
    queries, _ = g.generate(["over the lazy dog", "night"])
    assert [len(q) for q in queries] == [1, 1]  # greedy: one query per passage


def test_a_passage_longer_than_the_context_is_cut_and_counted(tmp_path):
    folder = write_hf_llama(tmp_path / "short", max_position_embeddings=64)
    settings = GenerationSettings(max_new_tokens=8)
    g = QueryGenerator.load(str(folder), prompt=PROMPT, settings=settings)
    long = " ".join(random_texts(30, seed=5))
    ids, cut = g.fit(long)
    assert cut and len(ids) <= 64 - 8
    assert g.tokenizer.decode(ids).startswith("<s>Write a question about: " + long[:20])
    corpus = _txt(tmp_path / "p.txt", ["a short one", long])
    with pytest.warns(UserWarning, match="1 of 2 passages were longer than the generator's context"):
        summary = synthesize(SynthConfig(str(corpus), str(tmp_path / "out.jsonl")), generator=g)
    assert summary["cut_passages"] == 1

    # A prompt that leaves no room for any passage is refused before anything runs.
    with pytest.raises(BidirError) as excinfo:
        QueryGenerator(g.model, g.tokenizer, "the lazy dog " * 30 + "{passage}", settings)
    _one_line(excinfo, "the prompt alone takes", "context of 64 tokens")


def test_bad_input_is_one_line(lm_folder, tiny_checkpoint, tmp_path):
    good = _txt(tmp_path / "p.txt", ["one passage"])
    cases = []
    blank = _txt(tmp_path / "blank.txt", ["", "   "])
    cases.append((SynthConfig(str(blank), str(tmp_path / "o.jsonl")), ("blank.txt", "no passages")))
    empty_beir = tmp_path / "corpus.jsonl"
    empty_beir.write_text("")
    cases.append((SynthConfig(str(empty_beir), str(tmp_path / "o.jsonl")), ("corpus.jsonl", "no documents")))
    no_slot = tmp_path / "prompt.txt"
    no_slot.write_text("Write a question.")
    cases.append(
        (SynthConfig(str(good), str(tmp_path / "o.jsonl"), prompt=str(no_slot)), ("prompt.txt", "{passage}"))
    )

    remote = write_hf_llama(tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(
        json.dumps(config | {"auto_map": {"AutoModelForCausalLM": "m.Model"}})
    )
    cases.append(
        (SynthConfig(str(good), str(tmp_path / "o.jsonl"), str(remote)), ("config.json", "auto_map"))
    )
    unknown = write_hf_llama(tmp_path / "unknown")
    (unknown / "config.json").write_text(json.dumps(config | {"model_type": "my_llama"}))
    cases.append(
        (SynthConfig(str(good), str(tmp_path / "o.jsonl"), str(unknown)), ("config.json", "my_llama"))
    )
    # a bidir embedder checkpoint (LlamaModel weights, no LM head of its untied model) is no generator
    cases.append(
        (SynthConfig(str(good), str(tmp_path / "o.jsonl"), str(tiny_checkpoint)), ("lm_head.weight",))
    )
    for cfg, needles in cases:
        with pytest.raises(BidirError) as excinfo:
            synthesize(cfg)
        _one_line(excinfo, *needles)
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.parts").exists()

    # --overwrite deletes nothing when the model cannot load, nor a parts folder holding a file it did not write.
    kept = _txt(tmp_path / "kept.jsonl", ["an earlier output"])
    with pytest.raises(BidirError) as excinfo:
        synthesize(SynthConfig(str(good), str(kept), str(remote), overwrite=True))
    _one_line(excinfo, "auto_map")
    (tmp_path / "kept.jsonl.parts").mkdir()
    (tmp_path / "kept.jsonl.parts" / "manifest.json").write_text("{}")
    (tmp_path / "kept.jsonl.parts" / "notes.txt").write_text("mine")
    with pytest.raises(BidirError) as excinfo:
        synthesize(SynthConfig(str(good), str(kept), str(lm_folder), overwrite=True))
    _one_line(excinfo, "kept.jsonl.parts", "notes.txt", "not deleted")
    assert (
        kept.read_text() == "an earlier output\n"
        and (tmp_path / "kept.jsonl.parts" / "manifest.json").is_file()
    )

    with pytest.raises(BidirError) as excinfo:
        GenerationSettings(queries_per_passage=3)
    _one_line(excinfo, "queries_per_passage 3 needs sampling")


def test_cli_errors_and_counts(lm_folder, tmp_path, capsys):
    blank = _txt(tmp_path / "blank.txt", [""])
    assert main([str(lm_folder), "--corpus", str(blank), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bidir-synth: error: ") and "blank.txt" in err and "\n" not in err
    corpus = _txt(tmp_path / "p.txt", ["the quick brown fox", "", "dense search"])
    args = [str(lm_folder), "--corpus", str(corpus), "--output", str(tmp_path / "o.jsonl"), "--no-progress"]
    assert main(args + ["--max-new-tokens", "4", "--prompt", "keywords"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bidir-synth: ") and "from 2 passages: 2 generated" in out


def test_queries_are_cleaned_and_deduplicated():
    assert clean_query('\n  Question: "How do I sort?"\nmore text') == "How do I sort?"
    assert clean_query("keywords: sort list python") == "sort list python"
    kept, counts = synth._deduplicate(["The passage"], [["Q one", " q  ONE ", "", "the PASSAGE", "two"]])
    assert kept == [["Q one", "two"]]
    assert counts == {"generated": 5, "empty": 1, "same_as_passage": 1, "duplicate": 1}


def test_a_query_generated_for_several_passages_is_dropped():
    """A query that came back for two different passage texts names neither; one repeated for two copies of the
    same text still names it."""
    passages = [
        ("a", "Sorting lists."),
        ("b", "Parsing JSON."),
        ("c", "sorting  LISTS."),
        ("d", "Parsing JSON."),
    ]
    pairs = [(0, "What is the text about?"), (1, "what is the TEXT about?"), (0, "How to sort?"),
             (2, "How to sort?"), (1, "How to parse?"), (3, "How to parse?"), (3, "JSON?")]  # fmt: skip
    kept, dropped = synth._drop_shared(pairs, passages)
    assert kept == [
        (0, "How to sort?"),
        (2, "How to sort?"),
        (1, "How to parse?"),
        (3, "How to parse?"),
        (3, "JSON?"),
    ]
    assert dropped == 2


def test_the_embedded_default_is_its_gguf_as_transformers_reads_it(embedded_default, embedded_gguf):
    """The LlamaForCausalLM built from bidir_core's import (decoder weights, Q/K rows un-permuted, the LM head tied
    to the embeddings) gives the logits of transformers' own GGUF loader, the oracle."""
    import torch
    from transformers import AutoModelForCausalLM

    from bidir_train.query_generator import load_causal_lm

    model, tokenizer, identity = load_causal_lm(embedded_default, device="cpu", dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight and identity.startswith("sha256:")
    oracle = AutoModelForCausalLM.from_pretrained(
        embedded_gguf.parent, gguf_file=embedded_gguf.name, dtype=torch.float32
    ).eval()
    ids = tokenizer(
        ["The Eiffel Tower is a wrought-iron lattice tower in Paris."], return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        ours, theirs = model(ids).logits, oracle(ids).logits  # (1, T, vocab)
    # Measured 0.0: the same dequantized fp32 weights through the same kernels; the margin is for other CPUs' kernels.
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


def test_the_embedded_default_generates_from_its_cache(embedded_default):
    """bidir's checkpoint config switches the KV cache off (an encoder needs none); a generator built from it
    switches it back on, so each new token is one position of forward (not the whole prefix again), and the greedy
    queries equal the uncached recomputation, the oracle."""
    import torch

    generator = QueryGenerator.load(
        embedded_default, prompt=PROMPT, settings=GenerationSettings(max_new_tokens=5, batch_size=2)
    )
    passages = ["The Eiffel Tower is a wrought-iron lattice tower in Paris.", "Photosynthesis makes sugar."]
    widths: list[int] = []
    hook = generator.model.model.register_forward_pre_hook(
        lambda _module, _args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        cached, _ = generator.generate(passages)
    finally:
        hook.remove()
    assert len(widths) > 1 and widths[0] > 1 and set(widths[1:]) == {1}, widths
    model = generator.model
    model.config.use_cache = model.generation_config.use_cache = False
    try:
        uncached, _ = generator.generate(passages)
    finally:
        model.config.use_cache = model.generation_config.use_cache = True
    assert cached == uncached and all(q[0] for q in cached), (cached, uncached)
    assert torch.is_grad_enabled()  # generate's no_grad did not leak


def test_filter_settings_are_checked(tmp_path):
    for field, value in (("filter_top_k", 0), ("filter_max_length", 0), ("filter_max_length", True)):
        with pytest.raises(BidirError, match=f"{field} must be a positive integer"):
            SynthConfig("c.txt", str(tmp_path / "o.jsonl"), **{field: value})
    assert SynthConfig("c.txt", str(tmp_path / "o.jsonl"), filter_max_length=256).filter_max_length == 256
