"""batch-embed end to end on a tiny model: order and ids, shard boundaries, the three input formats, prompts,
Matryoshka and float16, resumption after a kill, refusal of changed inputs, and bad input.

Reference: BiEncoder.encode_documents / encode_queries on the same texts. Tolerance 1e-5: the same fp32 model runs
on CPU in both, only the batch composition (and so the padding) differs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_testing import embed, write_jsonl

from bidir_core import BidirError
from bidir_core.checkpoint import EncoderConfig
from bidir_core.embeddings_artifact import read_embeddings, read_embeddings_manifest
from bidir_core.testing import tiny_encoder
from bidir_serve.batch_embed import main

ATOL = 1e-5
SERVE_SRC = Path(__file__).resolve().parents[1] / "src"


def _documents(encoder, texts, **kw):
    with pytest.warns(UserWarning, match="truncated"):
        return encoder.encode_documents(texts, **kw)


def test_order_ids_and_shard_boundaries(tiny_checkpoint, encoder, texts, tmp_path):
    """Small windows and token budgets reorder rows heavily; the output is still in input order."""
    inp = write_jsonl(tmp_path / "in.jsonl", texts)
    with pytest.warns(UserWarning, match=r"\d+ rows were longer than max_length=48"):
        summary = embed(tiny_checkpoint, inp, tmp_path / "out", shard_size=16, window=5, max_batch_tokens=120)
    assert summary.complete and summary.rows == summary.rows_embedded == 60 and summary.shards_written == 4
    assert (
        summary.truncated == sum(len(encoder.tokenizer("passage: " + t)["input_ids"]) > 48 for t in texts) > 0
    )
    art = read_embeddings(tmp_path / "out")
    assert [s.rows for s in art.manifest.shards] == [16, 16, 16, 12]
    for k, (ids, _) in enumerate(art.iter_shards()):
        assert ids == [f"doc-{i}" for i in range(16 * k, min(16 * k + 16, 60))]
    np.testing.assert_allclose(art.embeddings(), _documents(encoder, texts), atol=ATOL, rtol=0)
    assert art.manifest.dim == 64 and art.manifest.normalize and art.manifest.prefix == "passage: "


def test_three_input_formats(tiny_checkpoint, encoder, make_texts, tmp_path):
    texts = make_texts(20, seed=1, max_words=20)
    expected = _documents_quiet(encoder, texts)
    write_jsonl(tmp_path / "a.jsonl", texts, ids=list(range(20)))  # integer ids are stored as strings
    pq.write_table(pa.table({"id": [str(i) for i in range(20)], "text": texts}), tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n")
    for name, ids in [("a.jsonl", range(20)), ("a.parquet", range(20)), ("a.txt", range(1, 21))]:
        embed(tiny_checkpoint, tmp_path / name, tmp_path / f"out-{name}", shard_size=8)
        art = read_embeddings(tmp_path / f"out-{name}")
        assert art.ids() == [str(i) for i in ids], name
        np.testing.assert_allclose(art.embeddings(), expected, atol=ATOL, rtol=0, err_msg=name)


def _documents_quiet(encoder, texts, **kw):
    return encoder.encode_documents(texts, **kw)


def test_glob_of_text_files_and_blank_jsonl_lines(tiny_checkpoint, tmp_path):
    (tmp_path / "b.txt").write_text("one more line\nand another\r\n")
    (tmp_path / "a.txt").write_text("first file\n")
    embed(tiny_checkpoint, tmp_path / "*.txt", tmp_path / "out")
    assert read_embeddings(tmp_path / "out").ids() == ["a.txt:1", "b.txt:1", "b.txt:2"]
    (tmp_path / "c.jsonl").write_text('{"id": "x", "text": "a"}\n\n{"id": "y", "text": "b"}\n')
    embed(tiny_checkpoint, tmp_path / "c.jsonl", tmp_path / "out2")
    assert read_embeddings(tmp_path / "out2").ids() == ["x", "y"]


def test_query_prompt_dim_and_float16(encoder, make_texts, tmp_path):
    # the tiny encoder's weights (same seed), with the Matryoshka dims that let --dim cut it
    matryoshka = tiny_encoder(EncoderConfig(max_length=48, matryoshka_dims=(16, 32)))
    model = matryoshka.save_pretrained(tmp_path / "matryoshka")
    texts = make_texts(12, seed=2, max_words=10)
    inp = write_jsonl(tmp_path / "in.jsonl", texts)
    embed(model, inp, tmp_path / "q", prompt="query", dim=16, dtype="float16")
    art = read_embeddings(tmp_path / "q")
    assert art.manifest.dim == 16 and art.manifest.dtype == "float16" and art.manifest.prefix == "query: "
    out = art.embeddings()
    assert out.dtype == np.float16
    # float16 storage: about 3 decimal digits on unit-norm vectors
    np.testing.assert_allclose(
        out.astype(np.float32), encoder.encode_queries(texts, dim=16), atol=2e-3, rtol=0
    )
    embed(model, inp, tmp_path / "none", prompt="none")
    np.testing.assert_allclose(
        read_embeddings(tmp_path / "none").embeddings(), encoder.encode(texts), atol=ATOL
    )


def test_dim_follows_the_servers_rule(tiny_checkpoint, tmp_path, capsys):
    """A model whose config lists no matryoshka_dims is embedded only at its full width, as the server serves it."""
    inp = write_jsonl(tmp_path / "in.jsonl", ["hello world"])
    args = ["--model", str(tiny_checkpoint), "--input", str(inp), "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "cut"), "--dim", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dim=32: this model was not trained for Matryoshka truncation" in err
    assert not (tmp_path / "cut").exists()  # refused before the folder is made
    assert main([*args, "--output", str(tmp_path / "full"), "--dim", "64"]) == 0  # its own width is no cut
    assert read_embeddings(tmp_path / "full").manifest.dim == 64


def test_rerun_skips_and_changed_input_is_refused(tiny_checkpoint, make_texts, tmp_path):
    texts = make_texts(10, seed=3, max_words=10)
    inp = write_jsonl(tmp_path / "in.jsonl", texts)
    out = tmp_path / "out"
    embed(tiny_checkpoint, inp, out, shard_size=4)
    first = read_embeddings(out).embeddings()
    again = embed(tiny_checkpoint, inp, out, shard_size=4)
    assert again.complete and again.rows_embedded == 0
    with pytest.raises(BidirError, match="holds embeddings of other inputs or settings .* --overwrite"):
        embed(tiny_checkpoint, inp, out, shard_size=5)  # a setting that moves rows between shards
    write_jsonl(inp, texts[:9] + ["a changed last row"])
    with pytest.raises(BidirError, match="holds embeddings of other inputs or settings"):
        embed(tiny_checkpoint, inp, out, shard_size=4)
    np.testing.assert_array_equal(read_embeddings(out).embeddings(), first)  # refused: nothing touched
    summary = embed(tiny_checkpoint, inp, out, shard_size=4, overwrite=True)
    assert summary.rows_embedded == 10 and read_embeddings(out).manifest.shards[-1].rows == 2
    assert not np.array_equal(read_embeddings(out).embeddings()[-1], first[-1])


def test_output_folder_that_is_not_ours(tiny_checkpoint, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", ["hello"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(BidirError, match="busy: not empty and not an embeddings folder"):
        embed(tiny_checkpoint, inp, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.jsonl", b'{"id": "1", "text": "ok"}\n{"id": "2"}\n', r"a.jsonl:2: no 'text' field"),
        (
            "a.jsonl",
            b'{"id": "1", "text": "ok"}\n{"id": "2", "text": "caf\xe9"}\n',
            r"a.jsonl:2: invalid UTF-8",
        ),
        ("a.jsonl", b'{"id": "1", "text": "ok"}\n{"id": "2", "text": 5}\n', r"a.jsonl:2: 'text' is a int"),
        ("a.jsonl", b'{"id": "1", "text": "ok"}\n{"id": "2", "text": "  "}\n', r"a.jsonl:2: empty text"),
        (
            "a.jsonl",
            b'{"id": "1", "text": "ok"}\n{"id": "1", "text": "b"}\n',
            r"duplicate id.*'1' again at .*a.jsonl:2",
        ),
        ("a.jsonl", b'{"id": "1", "text": "ok"}\n{"id": "2", "text"\n', r"a.jsonl:2: not valid JSON"),
        ("a.txt", b"fine\n\nafter a blank line\n", r"a.txt:2: empty text"),
        ("a.txt", b"fine\n\xff\xfe\n", r"a.txt:2: invalid UTF-8"),
    ],
)
def test_bad_input_names_file_and_line(tiny_checkpoint, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BidirError, match=message):
        embed(tiny_checkpoint, tmp_path / name, tmp_path / "out")
    # Validation streams: the row is met while its shard is read; that shard is never published.
    assert (
        not list((tmp_path / "out").glob("part-*"))
        and not read_embeddings_manifest(tmp_path / "out").complete
    )
    with pytest.raises(BidirError, match=message):  # --check-unique-ids reads everything before any work
        embed(tiny_checkpoint, tmp_path / name, tmp_path / "out2", check_unique_ids=True)
    assert not (tmp_path / "out2").exists()


def test_bad_parquet(tiny_checkpoint, tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "text": [1, 2]}), tmp_path / "a.parquet")
    with pytest.raises(BidirError, match=r"a.parquet: column 'text' is int64, not a string"):
        embed(tiny_checkpoint, tmp_path / "a.parquet", tmp_path / "out")
    pq.write_table(pa.table({"id": ["a", "b"], "body": ["x", "y"]}), tmp_path / "b.parquet")
    with pytest.raises(BidirError, match=r"b.parquet: no column 'text' \(columns: id, body\)"):
        embed(tiny_checkpoint, tmp_path / "b.parquet", tmp_path / "out")
    pq.write_table(pa.table({"id": ["a", None], "text": ["x", "y"]}), tmp_path / "c.parquet")
    with pytest.raises(BidirError, match=r"c.parquet row 2: 'id' is null"):
        embed(tiny_checkpoint, tmp_path / "c.parquet", tmp_path / "out")
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    with pytest.raises(BidirError, match=r"d.parquet: not a readable Parquet file"):
        embed(tiny_checkpoint, tmp_path / "d.parquet", tmp_path / "out")


def test_cli_one_line_error_and_summary(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"id": "1"}\n')
    assert (
        main(
            [
                "--model",
                str(tiny_checkpoint),
                "--input",
                str(tmp_path / "a.jsonl"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and err.startswith("batch-embed: error: ")
        and "a.jsonl:1: no 'text' field" in err
    )
    write_jsonl(tmp_path / "a.jsonl", ["hello world", "bye"])
    args = [
        "--model",
        str(tiny_checkpoint),
        "--input",
        str(tmp_path / "a.jsonl"),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--no-progress", "--shard-size", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("batch-embed: 2 of 2 rows embedded") and "2 shards" in out and "[complete]" in out
    assert main([*args, "--shard-size", "0"]) == 2
    assert "shard_size must be a positive integer" in capsys.readouterr().err


# A batch-embed whose backend sleeps per batch, so the test can kill it between shards.
_SLOW_MAIN = """
import sys, time
import bidir_serve.backends as b
embed = b.TorchBackend.embed
def slow(self, inputs):
    time.sleep(0.15)
    return embed(self, inputs)
b.TorchBackend.embed = slow
from bidir_serve.batch_embed import main
sys.exit(main(sys.argv[1:]))
"""


def _env():
    paths = [str(SERVE_SRC), *sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def test_kill_mid_run_then_resume(tiny_checkpoint, make_texts, tmp_path):
    texts = make_texts(48, seed=4, max_words=20)
    inp = write_jsonl(tmp_path / "in.jsonl", texts)
    embed(tiny_checkpoint, inp, tmp_path / "straight", shard_size=6, max_batch_size=3)
    out = tmp_path / "killed"
    args = ["--model", str(tiny_checkpoint), "--input", str(inp), "--output", str(out), "--shard-size", "6"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_MAIN, *args, "--max-batch-size", "3", "--no-progress"], env=_env()
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("part-*.parquet"))) < 2:
            assert proc.poll() is None, "batch-embed ended before it could be killed"
            assert time.monotonic() < deadline, "no shard appeared within 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = sorted(p.name for p in out.glob("part-*.parquet"))
    assert 2 <= len(done) < 8
    assert not read_embeddings_manifest(out).complete
    with pytest.raises(BidirError, match=r"incomplete \(\d of 8 shards written\)"):
        read_embeddings(out)
    summary = embed(tiny_checkpoint, inp, out, shard_size=6, max_batch_size=3)
    assert summary.complete and summary.shards_written == 8 - len(done)
    assert summary.rows_embedded == 48 - 6 * len(done)
    art, straight = read_embeddings(out), read_embeddings(tmp_path / "straight")
    assert art.ids() == straight.ids() == [f"doc-{i}" for i in range(48)]
    np.testing.assert_array_equal(art.embeddings(), straight.embeddings())
    assert not list(out.glob(".*.tmp"))


_MAIN = "import sys; from bidir_serve.batch_embed import main; sys.exit(main(sys.argv[1:]))"  # = batch-embed


def test_nvidia_folder_code_is_not_run_when_y_is_piped(tmp_path):
    """`echo y | batch-embed --model FOLDER ...` on an NVIDIA llama_bidirec folder (auto_map + a .py file): nothing
    asks to run the custom code, so the "y" answers nothing, and the folder's .py never runs."""
    from bidir_core.testing import write_nvidia_llama_bidirec

    marker = tmp_path / "folder-code-ran"
    folder = write_nvidia_llama_bidirec(tmp_path / "nv", marker=marker)
    inp = write_jsonl(tmp_path / "in.jsonl", ["hello world", "bye"])
    args = ["--model", str(folder), "--input", str(inp), "--output", str(tmp_path / "out"), "--no-progress"]
    run = subprocess.run(
        [sys.executable, "-c", _MAIN, *args],
        input="y\n",
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "custom code" not in run.stdout + run.stderr and not marker.exists()
    assert "2 of 2 rows embedded" in run.stdout and read_embeddings(tmp_path / "out").manifest.complete


def test_torchrun_two_processes_equal_one(tiny_checkpoint, make_texts, tmp_path):
    texts = make_texts(30, seed=5, max_words=15)
    inp = write_jsonl(tmp_path / "in.jsonl", texts)
    embed(tiny_checkpoint, inp, tmp_path / "one", shard_size=4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "bidir_serve.batch_embed", "--model", str(tiny_checkpoint), "--input", str(inp)]
    cmd += ["--output", str(tmp_path / "two"), "--shard-size", "4", "--no-progress"]
    # A session of its own, so a hung run can be killed with its workers (torchrun's children outlive it otherwise).
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("batch-embed: ") == 2  # one summary line per rank
    one, two = read_embeddings(tmp_path / "one"), read_embeddings(tmp_path / "two")
    assert two.manifest.complete and two.ids() == one.ids()
    np.testing.assert_allclose(two.embeddings(), one.embeddings(), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_embedded_default_end_to_end(embedded_default, tmp_path, capsys):
    """The CLI on the real embedded default model (SmolLM2-135M), checked against BiEncoder.encode_documents."""
    from bidir_core.encoder import BiEncoder

    texts = ["A plane is taking off.", "experimental investigation of the aerodynamics of a wing", "hello"]
    inp = write_jsonl(tmp_path / "in.jsonl", texts)
    args = [
        "--model",
        "smollm2-135m",
        "--input",
        str(inp),
        "--output",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert main(args) == 0
    assert "3 of 3 rows embedded" in capsys.readouterr().out
    art = read_embeddings(tmp_path / "out")
    assert art.ids() == ["doc-0", "doc-1", "doc-2"] and art.manifest.dim == 576
    expected = BiEncoder.from_pretrained("smollm2-135m").encode_documents(texts)
    np.testing.assert_allclose(art.embeddings(), expected, atol=ATOL, rtol=0)
