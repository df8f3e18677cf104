"""bidir_core.tokenization: over-long texts are cut before the tokenizer sees them, to the same tokens as truncating
the whole text; a folder without tokenizer files is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from errors_testing import load_error, one_line_error

from bidir_core import tokenization
from bidir_core.checkpoint import EncoderConfig
from bidir_core.testing import WORDS, tiny_encoder


@pytest.fixture(scope="module")
def encoder():
    """A tiny encoder with max_length 48, which the long texts below run far past."""
    return tiny_encoder(EncoderConfig(max_length=48)).eval()


class _Recording:
    """A tokenizer proxy that records the characters of every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, texts, **kw):
        self.lengths += [len(t) for t in texts]
        return self.tokenizer(texts, **kw)

    def get_vocab(self):
        return self.tokenizer.get_vocab()


def test_long_text_keeps_the_same_tokens_and_embedding(encoder):
    tok = encoder.tokenizer
    rng = np.random.default_rng(0)
    long = " ".join(rng.choice(WORDS, 3000))  # ~20k characters, far past the cut
    limit = len(tokenization.cut_long_texts(tok, [long], 48)[0])
    assert limit == 4 * 48 * tokenization.max_token_chars(tok) < len(long)
    ids, cut = tokenization.tokenize(tok, [long], 48)
    full = tok([long], add_special_tokens=True, truncation=True, max_length=48)["input_ids"]
    assert cut == 1 and ids == full  # the same 48 tokens as truncating the whole text
    with pytest.warns(UserWarning, match="truncated"):
        got = encoder.encode(long)
    with torch.no_grad():
        ref = encoder(torch.tensor(full), torch.ones(1, 48, dtype=torch.long))[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    # A text that fits (max_length tokens of the longest tokens) is never cut.
    longest = max(tok.get_vocab(), key=len)
    assert len(longest * 47) <= limit and tokenization.cut_long_texts(tok, [longest * 47], 48) == [
        longest * 47
    ]


def test_huge_text_is_cut_before_the_tokenizer(encoder):
    rec = _Recording(encoder.tokenizer)
    huge = "embeddings search dense passages " * 600_000  # ~20 MB
    ids, cut = tokenization.tokenize(rec, ["short text", huge], 48)
    assert cut == 1 and len(ids[1]) == 48
    assert max(rec.lengths) <= 4 * 48 * tokenization.max_token_chars(encoder.tokenizer) < len(huge) / 1000


def test_missing_tokenizer_files(hf_copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf_copy / name).unlink()
    one_line_error(load_error(hf_copy), str(hf_copy), "tokenizer")
