"""NVIDIA llama_bidirec folders as NVIDIA ships them: their code is never run nor asked about, and their pooling
keeps NeMo's meaning (NeMo's weighted_avg is a plain sum of token states, not bidir's SGPT weighting)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bidir_core import BidirError, BiEncoder
from bidir_core.batching import pad_batch
from bidir_core.convert import main as convert_main
from bidir_core.pooling import pool
from bidir_core.testing import tiny_tokenizer, write_nvidia_llama_bidirec
from bidir_core.tokenization import load_tokenizer

TEXTS = ["the quick brown fox", "a llama checkpoint turned into an embedding model", "dog"]
PROMPT = "Do you wish to run the custom code"

# Loads the folder the way every bidir CLI does, then embeds a text: any prompt or code run would show.
_LOAD = """
import sys
from pathlib import Path
from bidir_core import BiEncoder
from bidir_core.tokenization import load_tokenizer
folder = Path(sys.argv[1])
tok = load_tokenizer(folder)
enc = BiEncoder.from_pretrained(folder)
print("loaded", type(tok).__name__, enc.encode(["the quick brown fox"]).shape)
"""


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "folder-code-ran"


def _load_in_child(folder, tmp_path, stdin: str | None) -> tuple[int, str]:
    """Run _LOAD in a fresh interpreter; stdin is written and closed ("" closes it at once), or (None) left open and
    silent until the child has exited, as in a terminal where nobody answers. Returns (exit status, stdout + stderr)."""
    log = tmp_path / "child.log"
    with (
        log.open("w") as out,
        subprocess.Popen(
            [sys.executable, "-c", _LOAD, str(folder)],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=out,
            text=True,
        ) as proc,
    ):
        try:
            if stdin is not None:
                proc.stdin.write(stdin)
                proc.stdin.close()
            rc = proc.wait(timeout=120)
        finally:
            proc.kill()
    return rc, log.read_text()


@pytest.mark.parametrize("stdin", ["y\n", "", None], ids=["y-piped", "stdin-closed", "stdin-open"])
def test_folder_code_never_runs_and_nothing_is_asked(tmp_path, marker, stdin):
    """Without trust_remote_code=False, transformers asks "run the custom code? [y/N]" for a folder with auto_map
    (waiting 15 s for an answer while stdin stays open), and a "y" runs llama_bidirectional_model.py."""
    folder = write_nvidia_llama_bidirec(tmp_path / "nv", marker=marker)
    rc, output = _load_in_child(folder, tmp_path, stdin)
    assert rc == 0, output
    assert PROMPT not in output
    assert "loaded" in output and "(1, 64)" in output, output
    assert (
        "model of type" not in output
    )  # transformers' warning about an unknown model_type: noise for a user
    assert not marker.exists()


def test_the_tokenizer_is_the_folders_standard_one(tmp_path, marker):
    """auto_map names only the model's code; the tokenizer is the standard class tokenizer_config.json names, and
    it tokenizes as the tokenizer the folder was written from."""
    folder = write_nvidia_llama_bidirec(tmp_path / "nv", marker=marker)
    tokenizer = load_tokenizer(folder)
    want = tiny_tokenizer()(TEXTS)["input_ids"]
    assert tokenizer(TEXTS)["input_ids"] == want and tokenizer.pad_token_id == 0
    assert not marker.exists()


def test_custom_tokenizer_code_is_refused_in_one_line(tmp_path, marker):
    folder = write_nvidia_llama_bidirec(tmp_path / "nv", marker=marker)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(
        tokenizer_class="LlamaBidirecTokenizer",
        auto_map={"AutoTokenizer": ["llama_bidirectional_model.LlamaBidirecTokenizer", None]},
    )
    path.write_text(json.dumps(config))
    with pytest.raises(BidirError) as e:
        BiEncoder.from_pretrained(folder)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and "never runs code" in message
    assert not marker.exists()


def _nvidia_embeddings(encoder: BiEncoder, texts: list[str], dim: int | None = None) -> torch.Tensor:
    """NeMo's llama_bidirec formula for pool_type weighted_avg, by hand: the masked sum of the last hidden states,
    then (NeMo's default) L2 normalization. Rows are padded on the left, unlike BiEncoder.encode."""
    ids = [encoder.tokenizer(t)["input_ids"] for t in texts]
    input_ids, mask = pad_batch(ids, encoder.tokenizer.pad_token_id, padding_side="left")
    with torch.no_grad():
        hidden = encoder.model(input_ids, mask)
    summed = hidden.masked_fill(~mask[..., None].bool(), 0.0).sum(dim=1)
    return F.normalize(summed[:, :dim] if dim else summed, p=2, dim=-1)


def test_nvidia_weighted_avg_keeps_nvidias_meaning(tmp_path):
    folder = write_nvidia_llama_bidirec(tmp_path / "nv", pooling="weighted_avg")
    with pytest.warns(UserWarning, match=r"config\.json: NVIDIA's pooling 'weighted_avg' is a plain sum"):
        encoder = BiEncoder.from_pretrained(folder)
    assert encoder.config.pooling == "avg" and encoder.config.normalize
    for dim in (None, 16):  # a Matryoshka prefix of a sum and of a mean point the same way too
        want = _nvidia_embeddings(encoder, TEXTS, dim)
        got = torch.from_numpy(encoder.encode(TEXTS, dim=dim))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # fp32: only reduction order differs
    # bidir's own weighted_avg (SGPT) is something else: a silent rename would have been caught above
    ids, mask = pad_batch([encoder.tokenizer(t)["input_ids"] for t in TEXTS], 0)
    with torch.no_grad():
        sgpt = F.normalize(pool(encoder.model(ids, mask), mask, "weighted_avg"), dim=-1)
    assert (sgpt - _nvidia_embeddings(encoder, TEXTS)).abs().max() > 1e-3


def test_nvidia_weighted_avg_unnormalized_is_refused(tmp_path, capsys):
    folder = write_nvidia_llama_bidirec(tmp_path / "nv", pooling="weighted_avg")
    with pytest.raises(
        BidirError, match=r"'weighted_avg' in an NVIDIA llama_bidirec config is a plain sum"
    ) as e:
        BiEncoder.from_pretrained(folder, normalize=False)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{folder / 'config.json'}: ")
    out = tmp_path / "out"
    capsys.readouterr()
    assert convert_main([str(folder), str(out), "--no-normalize"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bidir-convert: error: ") and "plain sum" in err
    assert not out.exists()
    # a pooling chosen explicitly is the user's: no NVIDIA meaning to keep
    assert BiEncoder.from_pretrained(folder, normalize=False, pooling="avg").config.pooling == "avg"


def test_converted_nvidia_folder_says_avg(tmp_path, capsys):
    """bidir-convert writes what the vectors are: avg (normalized) in bidir.json, which then loads with no note."""
    folder = write_nvidia_llama_bidirec(tmp_path / "nv", pooling="weighted_avg")
    with pytest.warns(UserWarning, match="plain sum"):
        assert convert_main([str(folder), str(tmp_path / "out")]) == 0
    assert "pooling=avg" in capsys.readouterr().out
    stored = json.loads((tmp_path / "out" / "bidir.json").read_text())
    assert stored["pooling"] == "avg" and stored["normalize"] is True
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
