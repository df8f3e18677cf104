"""batch-embed at scale on a synthetic corpus (short texts, Parquet, several files) and the tiny random model:

1. planning + validation at --small vs --large rows, wall time and peak RSS above the imports: ours (plan_inputs,
   then every row read and checked shard by shard, ids unique within a shard), ours with --check-unique-ids (ids
   unique across shards, hash-partitioned on disk), and the baseline of a whole-input scan (the same rows read,
   every id kept in one Python set);
2. the bytes each of 2 ranks reads (/proc/self/io rchar) to read its own shards, against the corpus size;
3. rows/s of the local engine vs the Ray engine (a local cluster, ray.init(num_cpus=2)) on the same corpus
   (--embed-rows of it), and that both give the same artifact.

Each measurement runs in a fresh subprocess (peak RSS is per process).

    python benchmarks/bench_scale.py [--large 1000000] [--small 100000] [--embed-rows 100000] [--out runs/scale]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FILES = 8
ROW_GROUP = 10_000
SHARD = 100_000


def make_corpus(folder: Path, rows: int) -> Path:
    """rows short texts in FILES Parquet files (row groups of ROW_GROUP), ids doc-<n>; made once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (folder / "done").exists():
        return folder / "*.parquet"
    folder.mkdir(parents=True, exist_ok=True)
    from bidir_core.testing import WORDS  # here, not at the top: a child process measures its own imports

    words = np.array(WORDS)
    rng = np.random.default_rng(0)
    per = -(-rows // FILES)
    for f in range(FILES):
        lo, hi = f * per, min(rows, (f + 1) * per)
        n_words = rng.integers(3, 16, hi - lo)
        texts = [" ".join(rng.choice(words, k)) for k in n_words]
        table = pa.table({"id": [f"doc-{i}" for i in range(lo, hi)], "text": texts})
        pq.write_table(table, folder / f"part-{f:02d}.parquet", row_group_size=ROW_GROUP)
    (folder / "done").write_text("")
    return folder / "*.parquet"


def _child(kind: str, inp: str, arg: str) -> dict:
    """One measurement in this (fresh) process; returns what it measured."""
    import pyarrow.parquet  # noqa: F401 (imported before the baseline RSS is taken, as torch is)

    from bidir_serve.batch.plan import plan_inputs, resolve_inputs, shard_rows

    files = resolve_inputs(inp)
    # after the imports (torch and all): the work's own memory is the peak above this. The kernel's peak (VmHWM) is
    # reset first, so a transient of the imports does not count as the work's.
    Path("/proc/self/clear_refs").write_text("5")
    rss_start = _status_mb("VmRSS")
    t0 = time.perf_counter()
    if kind in ("validate", "unique"):  # ours: the plan, then every row read and checked
        from bidir_serve.batch.unique_ids import check_unique_ids

        plan = plan_inputs(files, "id", "text", SHARD)
        if kind == "unique":  # --check-unique-ids: ids unique across shards, spilled to disk by hash
            check_unique_ids(plan, "id", "text")
        else:  # the default: what the ranks do between them (ids unique within each shard)
            for k in range(plan.n_shards):
                for _ in shard_rows(plan, k, "id", "text"):
                    pass
        rows = plan.rows
    elif kind == "baseline":  # a whole-input scan: every row read, every id kept in one set
        plan = plan_inputs(files, "id", "text", SHARD)
        seen: set[str] = set()
        for k in range(plan.n_shards):
            seen.update(r.id for r in shard_rows(plan, k, "id", "text"))
        rows = len(seen)
    elif kind == "rank":  # what rank `arg` of 2 reads: its own shards (k % 2 == rank)
        plan = plan_inputs(files, "id", "text", SHARD)
        before = _rchar()
        rows = sum(1 for k in range(int(arg), plan.n_shards, 2) for _ in shard_rows(plan, k, "id", "text"))
        return {"rows": rows, "bytes_read": _rchar() - before}
    else:  # embed with engine `kind` (local / ray); arg: the model
        from bidir_serve import BatchEmbedConfig, embed_corpus

        out = Path(inp).parent.parent / f"emb-{kind}"
        if kind == "ray":
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        cfg = BatchEmbedConfig(
            arg, inp, str(out), engine=kind, progress=False, overwrite=True, shard_size=SHARD // 4
        )
        summary = embed_corpus(cfg)
        return {"rows": summary.rows_embedded, "seconds": summary.seconds}
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    return {"rows": rows, "seconds": seconds, "peak_rss_mb": peak, "work_rss_mb": peak - rss_start}


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def measure(kind: str, inp: Path, arg: str = "") -> dict:
    run = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(inp), arg],
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode:
        sys.exit(f"bench_scale: {kind} failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--large", type=int, default=1_000_000)
    p.add_argument("--small", type=int, default=100_000)
    p.add_argument("--embed-rows", type=int, default=100_000, help="corpus size for the engine comparison")
    p.add_argument("--out", default="runs/scale")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(_child(*a.child)))
        return
    import harness

    busy = harness.warn_if_busy()
    root = Path(a.out)
    corpora = {n: make_corpus(root / f"corpus-{n}", n) for n in sorted({a.small, a.large, a.embed_rows})}
    lines = ["| measurement | rows | ours | baseline | ours / baseline |", "|---|---|---|---|---|"]
    records = []
    runs = {
        n: {k: measure(k, corpora[n]) for k in ("validate", "unique", "baseline")} for n in (a.small, a.large)
    }
    for n, run in runs.items():
        assert run["validate"]["rows"] == run["unique"]["rows"] == run["baseline"]["rows"] == n
        records.append({"what": "plan+validate", "rows": n, **run})
        base = run["baseline"]
        for kind, label in (
            ("validate", "plan + validate"),
            ("unique", "plan + validate --check-unique-ids"),
        ):
            ours = run[kind]
            lines.append(
                f"| {label}: peak RSS | {n:,} | {ours['work_rss_mb']:.0f} MB | {base['work_rss_mb']:.0f} MB | "
                f"{ours['work_rss_mb'] / max(base['work_rss_mb'], 1e-9):.2f} |"
            )
            lines.append(
                f"| {label}: wall | {n:,} | {ours['seconds']:.1f} s | {base['seconds']:.1f} s | "
                f"{ours['seconds'] / base['seconds']:.2f} |"
            )
    for kind in ("validate", "unique", "baseline"):
        small, large = runs[a.small][kind], runs[a.large][kind]
        lines.append(
            f"| {kind}: peak RSS at {a.large:,} / at {a.small:,} rows | | above the imports "
            f"{large['work_rss_mb'] / max(small['work_rss_mb'], 1e-9):.2f}; whole process "
            f"{large['peak_rss_mb'] / small['peak_rss_mb']:.2f} | | |"
        )
    size = sum(f.stat().st_size for f in corpora[a.large].parent.glob("*.parquet"))
    for rank in (0, 1):
        r = measure("rank", corpora[a.large], str(rank))
        records.append({"what": "rank bytes", "rank": rank, **r, "corpus_bytes": size})
        lines.append(
            f"| rank {rank} of 2: bytes read | {r['rows']:,} | {r['bytes_read'] / 1e6:.1f} MB | "
            f"{size / 1e6:.1f} MB (whole corpus) | {r['bytes_read'] / size:.2f} |"
        )
    model = str(_tiny_model(root))
    local, ray = (measure(e, corpora[a.embed_rows], model) for e in ("local", "ray"))
    _same_artifact(root / "emb-local", root / "emb-ray")
    records.append({"what": "engines", "rows": a.embed_rows, "local": local, "ray": ray})
    lr, rr = local["rows"] / local["seconds"], ray["rows"] / ray["seconds"]
    lines.append(
        f"| embed, tiny model: rows/s | {a.embed_rows:,} | ray (num_cpus=2) {rr:,.0f} | local {lr:,.0f} | "
        f"{rr / lr:.2f} |"
    )
    print("\n".join(lines))
    harness.append_jsonl(root / "results.jsonl", {"records": records, **harness.environment(busy)})


def _tiny_model(root: Path) -> Path:
    from bidir_core.checkpoint import EncoderConfig
    from bidir_core.testing import tiny_encoder

    path = root / "tiny-model"
    if not path.exists():
        tiny_encoder(EncoderConfig(max_length=48)).eval().save_pretrained(path)
    return path


def _same_artifact(a: Path, b: Path) -> None:
    from bidir_core.embeddings_artifact import read_embeddings

    x, y = read_embeddings(a), read_embeddings(b)
    if x.ids() != y.ids() or not np.allclose(x.embeddings(), y.embeddings(), atol=1e-5, rtol=0):
        sys.exit("bench_scale: the ray and local artifacts differ")
    print(f"engines: {len(x.ids()):,} rows, same ids and embeddings (1e-5): OK")


if __name__ == "__main__":
    main()
