"""bidir_core.sources: a model source is opened once and described by a frozen ModelSource, which every loader
takes; one load reads each of the source's files once; a path that is no source is one line naming it."""

from __future__ import annotations

import builtins
import collections
import dataclasses
import io
import sys

import pytest
import torch
from errors_testing import load_error, one_line_error

import bidir_core.sources as sources
from bidir_core.checkpoint import EncoderConfig
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_core.model import LlamaBidirectionalModel
from bidir_core.sources import ModelSource, open_source
from bidir_core.testing import tiny_encoder, write_hf_model, write_nvidia_llama_bidirec


@pytest.fixture
def reads(monkeypatch):
    """How often bidir (not transformers, whose tokenizer reads config.json on its own) opens each JSON file of a
    source as text, and how often sources.resolve_source runs."""
    counts = collections.Counter()
    real_open = builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        name = getattr(file, "name", None) if not isinstance(file, str) else file.rsplit("/", 1)[-1]
        if name in ("bidir.json", "config.json") and "b" not in mode and "w" not in mode:
            frame = sys._getframe(1)
            while frame is not None and "/transformers/" not in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is None:
                counts[name] += 1
        return real_open(file, mode, *args, **kwargs)

    real_resolve = sources.resolve_source

    def counting_resolve(path_or_name):
        counts["resolve"] += 1
        return real_resolve(path_or_name)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)  # pathlib's read_text opens through io.open
    monkeypatch.setattr(sources, "resolve_source", counting_resolve)
    return counts


def test_one_load_reads_each_file_once(tmp_path, reads):
    """BiEncoder.from_pretrained of a checkpoint resolves it once and reads bidir.json and config.json once each;
    so does the model alone, and a load from an opened source reads neither again."""
    folder = tiny_encoder(EncoderConfig(attention="causal", pooling="last")).save_pretrained(tmp_path / "c")
    reads.clear()
    encoder = BiEncoder.from_pretrained(folder)
    assert dict(reads) == {"resolve": 1, "bidir.json": 1, "config.json": 1}
    assert encoder.source.path == folder and encoder.config.attention == "causal" and encoder.model.causal
    reads.clear()
    LlamaBidirectionalModel.from_pretrained(folder)
    assert dict(reads) == {"resolve": 1, "bidir.json": 1, "config.json": 1}
    source = open_source(folder)
    reads.clear()
    BiEncoder.from_pretrained(source, attention="bidirectional", pooling="avg")
    LlamaBidirectionalModel.from_pretrained(source)
    assert dict(reads) == {}


def test_a_source_says_what_it_is(tmp_path, embedded_gguf):
    checkpoint = tiny_encoder().save_pretrained(tmp_path / "c")
    hf = write_hf_model(tmp_path / "hf", family="qwen3")
    nvidia = write_nvidia_llama_bidirec(tmp_path / "nv", pooling="mean")
    described = {
        checkpoint: ("checkpoint", EncoderConfig(), None),
        hf: ("huggingface", None, None),
        nvidia: ("llama_bidirec", None, "mean"),
        embedded_gguf: ("gguf", None, None),
    }
    for path, (fmt, stored, pooling) in described.items():
        source = open_source(str(path))
        assert (source.name, source.path, source.format, source.kind) == (str(path), path, fmt, "embedder")
        assert (source.stored, source.config_pooling, source.attention) == (stored, pooling, "bidirectional")
        with pytest.raises(dataclasses.FrozenInstanceError):
            source.format = "gguf"
    assert open_source(nvidia).encoder_config().pooling == "avg"  # NeMo's "mean", read with the source


def test_attention_has_one_record(tmp_path):
    """The attention mode is the config's is_causal: with_attention gives a new source (the files are not read
    again, the opened one is unchanged), the settings copy it, and the model reads it."""
    source = open_source(write_hf_model(tmp_path / "hf"))
    causal = source.with_attention("causal")
    assert causal is not source and causal.config is not source.config
    assert (source.attention, causal.attention, causal.config.is_causal) == ("bidirectional", "causal", True)
    assert causal.with_attention(None) is causal and causal.with_attention("causal") is causal
    assert causal.encoder_config().attention == "causal" and causal.encoder_config().pooling == "last"
    assert causal.encoder_config(EncoderConfig(pooling="avg")).attention == "causal"
    model = LlamaBidirectionalModel.from_pretrained(causal)
    assert model.config is causal.config and model.causal
    with pytest.raises(BidirError, match="attention must be one of"):
        source.with_attention("sideways")


def test_weights_are_read_on_demand(tmp_path):
    encoder = tiny_encoder()
    source = open_source(encoder.save_pretrained(tmp_path / "c"))
    assert isinstance(source, ModelSource)
    state_dict, where = source.read_weights(torch.bfloat16)
    assert where == {k: source.path / "model.safetensors" for k in state_dict}
    for key, tensor in encoder.model.state_dict().items():
        assert torch.equal(state_dict[key], tensor.to(torch.bfloat16)), key
    assert source.read_lm_head(torch.float32) is None
    assert source.tokenizer().pad_token is not None


# --- paths that are no source -------------------------------------------------------------------------------------


def test_sources_load_before_they_are_damaged(hf_source, bidir_source):
    # Positive control: every failure below is caused by the damage, not by the fixture.
    assert BiEncoder.from_pretrained(hf_source).hidden_size == 64
    assert BiEncoder.from_pretrained(bidir_source).hidden_size == 64


def test_missing_path(tmp_path):
    missing = tmp_path / "does-not-exist"
    one_line_error(load_error(missing), str(missing), "no such file or folder")
    with pytest.raises(BidirError) as excinfo:
        LlamaBidirectionalModel.from_pretrained(missing)
    one_line_error(excinfo, str(missing))


def test_folder_without_config_json(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    one_line_error(load_error(folder), str(folder), "config.json")


def test_text_file_as_model(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("not a model")
    one_line_error(load_error(path), str(path), "not a checkpoint folder or a .gguf file")


@pytest.mark.parametrize("content", [b"definitely not a GGUF file " * 8, b""], ids=["not-gguf", "empty"])
def test_non_gguf_file_named_gguf(tmp_path, content):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    one_line_error(load_error(path), str(path), "GGUF")
