"""bidir-convert --reranker: a causal LM's yes/no token logits become a reranker head (oracle: transformers'
*ForCausalLM, logits[yes] - logits[no] at the last token), a reranker folder converts as it is, and bad flags get
one line.

Tolerance 1e-5 in fp32, as the other parity tests: a difference of two logits of the same states (measured: at
most 2.4e-7 on differences up to 1.2).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from bidir_core import CrossEncoder
from bidir_core.convert import main
from bidir_core.testing import tiny_tokenizer, write_hf_model, write_nvidia_llama_bidirec

ATOL = 1e-5
PAIRS = [
    ("how do i sort a list", "return a new sorted list from the items in iterable"),
    ("fox", "the quick brown fox jumps over the lazy dog"),
    ("a", "b"),
]
TEMPLATE = "<Query>: {query}\n<Document>: {passage}\nAnswer:"
YES, NO = "y", "n"  # one token each in the tiny tokenizer ("yes" is three)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and err.startswith("bidir-convert: error: ") and "Traceback" not in err
    ), err
    return err


@pytest.mark.parametrize(("family", "tied"), [("qwen3", False), ("llama", True)])
def test_yes_no_head_scores_as_the_causal_lm(tmp_path, capsys, family, tied):
    folder = write_hf_model(tmp_path / "lm", family=family, tie_word_embeddings=tied)
    out = tmp_path / "rerank"
    args = [str(folder), str(out), "--reranker", "--yes-token", YES, "--no-token", NO, "--template", TEMPLATE]
    assert main(args) == 0, capsys.readouterr().err
    assert "wrote reranker" in capsys.readouterr().out
    ce = CrossEncoder.from_pretrained(out)
    assert (ce.config.pooling, ce.config.attention, ce.config.template) == ("last", "causal", TEMPLATE)

    lm = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    yes, no = (tiny_tokenizer().encode(t, add_special_tokens=False)[0] for t in (YES, NO))
    want = []
    for query, passage in PAIRS:
        ids = ce.tokenizer(TEMPLATE.format(query=query, passage=passage), return_tensors="pt")
        with torch.no_grad():
            logits = lm(**ids).logits[0, -1]  # (vocab,) at the last token
        want.append(float(logits[yes] - logits[no]))
    np.testing.assert_allclose(ce.predict(PAIRS), want, atol=ATOL)


def test_reranker_folder_converts_as_it_is(tmp_path, capsys):
    folder = write_nvidia_llama_bidirec(tmp_path / "nv", reranker=True, temperature=0.5)
    out = tmp_path / "rerank"
    assert main([str(folder), str(out), "--reranker", "--dtype", "float32"]) == 0, capsys.readouterr().err
    converted, source = CrossEncoder.from_pretrained(out), CrossEncoder.from_pretrained(folder)
    assert converted.config == source.config and converted.config.temperature == 0.5
    np.testing.assert_array_equal(converted.predict(PAIRS), source.predict(PAIRS))


def test_template_file_is_read_exactly(tmp_path, capsys):
    # A chat prompt ends in newlines (Qwen3-Reranker's: "</think>\n\n") that $(cat FILE) would drop.
    template = "<q>{query}</q>\r\n<p>{passage}</p>\n\n"
    (tmp_path / "prompt.txt").write_bytes(template.encode())
    folder = write_nvidia_llama_bidirec(tmp_path / "nv", reranker=True)
    out = tmp_path / "rerank"
    argv = [str(folder), str(out), "--reranker", "--template-file", str(tmp_path / "prompt.txt")]
    assert main(argv) == 0, capsys.readouterr().err
    assert CrossEncoder.from_pretrained(out).config.template == template


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--reranker", "--yes-token", "yes", "--no-token", NO], "'yes' is 3 tokens"),
        (["--reranker", "--yes-token", YES, "--no-token", YES], "are the same token"),
        (["--reranker", "--yes-token", YES], "--yes-token and --no-token go together"),
        (["--reranker"], "has no reranker head"),
        (["--reranker", "--template", "{query}"], "must contain {passage} exactly once"),
        (["--reranker", "--no-normalize"], "--no-normalize applies to an embedder"),
        (["--template", "{query}{passage}"], "--template applies to a reranker: add --reranker"),
        (["--reranker", "--template-file", "missing.txt"], "missing.txt: cannot read the template"),
    ],
)
def test_bad_reranker_flags_get_one_line(hf_source, tmp_path, capsys, extra, needle):
    assert main([str(hf_source), str(tmp_path / "out"), *extra]) == 2
    assert needle in _error_line(capsys)
    assert not (tmp_path / "out").exists()
