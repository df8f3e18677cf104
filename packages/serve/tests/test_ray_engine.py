"""batch-embed --engine ray on a local Ray cluster (2 CPUs, started once for the module): the same artifact as the
local engine row for row, a SIGKILLed driver recovered by rerunning, a failing actor retried, and bad input reported
with the local engine's one line.

Oracle: the local engine on the same input (tolerance 1e-5: the same fp32 model on CPU, batches composed alike)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bidir_core import BidirError
from bidir_core.embeddings_artifact import read_embeddings, read_embeddings_manifest
from bidir_serve import BatchEmbedConfig, embed_corpus

ray = pytest.importorskip("ray")

from bidir_serve.batch.ray_engine import embed_corpus_ray  # noqa: E402

ATOL = 1e-5
# Ray Data's own deprecation notices (its DataContext defaults), not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SERVE_SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for the module; its address, for drivers in other processes."""
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Functions this module hands to Ray actors (the failing backend loader) travel by value: workers cannot
    # import a test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield context.address_info["address"]
    ray.shutdown()


def _corpus(folder: Path, make_texts, n: int = 30) -> Path:
    folder.mkdir()
    texts = make_texts(n, seed=11, max_words=20)
    half = n // 2
    with (folder / "a.jsonl").open("w") as f:
        for i in range(half):
            f.write(json.dumps({"id": f"doc-{i}", "text": texts[i]}) + "\n")
    ids = [f"doc-{i}" for i in range(half, n)]
    pq.write_table(pa.table({"id": ids, "text": texts[half:]}), folder / "b.parquet", row_group_size=4)
    return folder / "*"


def _config(ckpt, inp, out, engine, **kw):
    kw.setdefault("shard_size", 4)
    return BatchEmbedConfig(str(ckpt), str(inp), str(out), engine=engine, progress=False, **kw)


def _assert_equal(a: Path, b: Path):
    x, y = read_embeddings(a), read_embeddings(b)
    assert x.ids() == y.ids() and len(set(x.ids())) == len(x.ids())
    assert [s.rows for s in x.manifest.shards] == [s.rows for s in y.manifest.shards]
    assert x.manifest.input_fingerprint == y.manifest.input_fingerprint
    np.testing.assert_allclose(x.embeddings(), y.embeddings(), atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_ray_equals_local_row_for_row(cluster, tiny_checkpoint, make_texts, tmp_path):
    inp = _corpus(tmp_path / "in", make_texts)
    local = embed_corpus(_config(tiny_checkpoint, inp, tmp_path / "local", "local"))
    summary = embed_corpus(_config(tiny_checkpoint, inp, tmp_path / "ray", "ray"))
    assert summary.complete and summary.rows_embedded == local.rows_embedded == 30
    assert summary.shards_written == 8 and summary.tokens == local.tokens
    _assert_equal(tmp_path / "ray", tmp_path / "local")
    # Resume: a shard deleted after completion is the only one computed again.
    (tmp_path / "ray" / "part-00003.parquet").unlink()
    again = embed_corpus(_config(tiny_checkpoint, inp, tmp_path / "ray", "ray"))
    assert again.shards_written == 1 and again.rows_embedded == 4
    _assert_equal(tmp_path / "ray", tmp_path / "local")


class _FailOnce:
    """A backend whose first embed call (across processes: a marker file) raises, as a flaky GPU would."""

    def __init__(self, backend, marker: Path):
        self._backend, self._marker = backend, marker

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def embed(self, inputs):
        if not self._marker.exists():
            self._marker.write_text("failed once")
            raise RuntimeError("injected actor failure")
        return self._backend.embed(inputs)


def _failing_loader(marker: Path):
    from bidir_serve.backends import load_backend

    def load(*args, **kwargs):
        return _FailOnce(load_backend(*args, **kwargs), marker)

    return load


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_actor_that_raises_is_retried(cluster, tiny_checkpoint, make_texts, tmp_path):
    inp = _corpus(tmp_path / "in", make_texts, n=12)
    embed_corpus(_config(tiny_checkpoint, inp, tmp_path / "local", "local"))
    marker = tmp_path / "failed"
    cfg = _config(tiny_checkpoint, inp, tmp_path / "ray", "ray")
    summary = embed_corpus_ray(cfg, _load_backend=_failing_loader(marker))
    assert marker.exists() and summary.complete  # it failed once, and the retry finished the job
    _assert_equal(tmp_path / "ray", tmp_path / "local")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("a.jsonl", b'{"id": "1", "text": "ok"}\n{"id": "2"}\n'),
        ("a.jsonl", b'{"id": "1", "text": "ok"}\n{"id": "1", "text": "b"}\n'),
        ("a.txt", b"fine\n\xff\xfe\n"),
        ("a.parquet", None),
    ],
)
def test_bad_input_gives_the_local_one_line_error(cluster, tiny_checkpoint, tmp_path, name, content):
    if content is None:
        pq.write_table(pa.table({"id": ["a", None], "text": ["x", "y"]}), tmp_path / name)
    else:
        (tmp_path / name).write_bytes(content)
    errors = []
    for engine in ("local", "ray"):
        with pytest.raises(BidirError) as e:
            embed_corpus(_config(tiny_checkpoint, tmp_path / name, tmp_path / engine, engine, shard_size=100))
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "\n" not in errors[1] and name in errors[1]
    assert not list((tmp_path / "ray").glob("part-*"))


# A driver in its own process, on the module's cluster, whose actors embed slowly enough to be killed mid-job.
_SLOW_DRIVER = """
import sys, time
from bidir_serve import BatchEmbedConfig
from bidir_serve.backends import load_backend
from bidir_serve.batch.ray_engine import embed_corpus_ray

class Slow:
    def __init__(self, backend):
        self.backend = backend
    def __getattr__(self, name):
        return getattr(self.backend, name)
    def embed(self, inputs):
        time.sleep(0.3)
        return self.backend.embed(inputs)

def load(*args, **kwargs):
    return Slow(load_backend(*args, **kwargs))

ckpt, inp, out, address = sys.argv[1:]
cfg = BatchEmbedConfig(ckpt, inp, out, engine="ray", ray_address=address, shard_size=4, max_batch_size=2,
                       progress=False)
embed_corpus_ray(cfg, _load_backend=load)
"""


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_sigkilled_driver_then_rerun_gives_every_id_once(cluster, tiny_checkpoint, make_texts, tmp_path):
    inp = _corpus(tmp_path / "in", make_texts, n=40)
    embed_corpus(_config(tiny_checkpoint, inp, tmp_path / "local", "local"))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SERVE_SRC), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_DRIVER, str(tiny_checkpoint), str(inp), str(out), cluster], env=env
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("part-*.parquet"))) < 2:
            assert proc.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, "no shard appeared within 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = len(list(out.glob("part-*.parquet")))
    assert 2 <= done < 10 and not read_embeddings_manifest(out).complete
    summary = embed_corpus(_config(tiny_checkpoint, inp, out, "ray"))
    assert summary.complete and summary.shards_written <= 10 - done
    _assert_equal(out, tmp_path / "local")
    assert not list(out.glob(".*.tmp"))


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_one_parquet_column_for_id_and_text_on_both_engines(cluster, tiny_checkpoint, make_texts, tmp_path):
    texts = list(dict.fromkeys(make_texts(12, seed=12, max_words=8)))  # distinct: each text is its id
    pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet", row_group_size=5)
    for engine in ("local", "ray"):
        cfg = _config(tiny_checkpoint, tmp_path / "a.parquet", tmp_path / engine, engine)
        embed_corpus(dataclasses.replace(cfg, id_field="body", text_field="body"))
    _assert_equal(tmp_path / "ray", tmp_path / "local")
    assert read_embeddings(tmp_path / "ray").ids() == texts


def test_ray_address_where_nothing_listens_is_one_line_soon(tmp_path):
    """No cluster at --ray-address: one line naming it, soon (ray.init alone retries for minutes)."""
    with socket.socket() as s:  # a port that was free a moment ago, so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    (tmp_path / "in.txt").write_text("hello\n")
    args = ["--model", "no-model", "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out")]
    main = "import sys; from bidir_serve.batch_embed import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SERVE_SRC), *sys.path])}
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", main, *args, "--engine", "ray", "--ray-address", address],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 2 and time.monotonic() - start < 60, run.stderr[-2000:]
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("batch-embed: error: --ray-address"), (
        run.stderr
    )
    assert str(port) in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()
