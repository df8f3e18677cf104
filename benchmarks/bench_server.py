"""Online embedding speed: bidir-server's /v1/embeddings under concurrent load, against batch-embed's offline rows/s
on the same texts (the ceiling) and, where it runs, infinity-emb serving the same checkpoint.

Texts: the embedded stdlib-docstrings dev split (bidir_core.datasets.stdlib_dev), its passages (~70 tokens, the
default) or its queries (~13 tokens), in id order; each request takes the next texts of that pool, cycling.

- ceiling:      embed_corpus(BatchEmbedConfig) on the pool in this process, same model, same passage prefix, same
                token budget. Its rows/s leaves out the fixed cost (reading, model load, fingerprint) by timing a
                one-row job too: rows/s = (pool - 1) / (t_pool - t_one), medians over --repeats interleaved runs.
- bidir-server: started as a subprocess by http_load.py (--server, a command with {model} {host} {port} {device}
                {precision} {max_batch_tokens}; or --url, one already running), ready when GET /health answers 200;
                then, per cell (texts per request x concurrency), `concurrency` workers of one httpx.AsyncClient
                send `requests` POSTs back to back. Before timing, its embeddings of the first pool texts must equal
                the ceiling's (min cosine >= 0.9999): a fast wrong answer is no result.
- infinity-emb: the same cells against --infinity (a command, e.g. the infinity_emb executable of another venv, with
                {checkpoint} {host} {port} {device}; {checkpoint} is a copy of the model that transformers 4 reads, see
                transformers4_copy). It runs the checkpoint as a causal Llama (it knows nothing of the
                bidirectional attention), so its vectors differ and only its throughput compares; the texts it gets
                carry the passage prefix, so both embed the same tokens.

A cell reports requests/s and rows/s (completed requests and their rows over the cell's wall time; the median over
--repeats rounds, cells interleaved), p50/p99 latency of each request (all rounds pooled) and the count of non-200
answers; then rows/s over the ceiling's (goal: >= 0.80 at concurrency 32, for 1- and 32-text requests) and over
infinity's.

    python benchmarks/bench_server.py [--model smollm2-135m] [--texts passages|queries] [--limit N]
        [--concurrency 1,8,32] [--sizes 1,32] [--rows 256] [--repeats 3] [--server CMD] [--url URL]
        [--infinity CMD] [--device cpu|cuda] [--precision fp32|bf16|fp16] [--max-batch-tokens N] [--threads N]
        [--quick] [--json PATH]

--quick is a smoke run (64 queries, concurrency 1 and 8, one round; about 30 s here without infinity).

Reranker mode (--rerank): POST /v1/ranking (NIM's route, which answers the raw logit), each request one
stdlib-docstrings dev query with --docs (20) passages of the corpus, cells at each --concurrency; pairs/s and p50/p99
latency per request, against the offline scoring rate of the same backend in this process on all the requests' pairs
(tokenize_pairs, length-sorted batches of the server's token budget, prepare, score; the model loaded before timing):
the ratio at concurrency 32 has the goal >= 0.70. Before timing, the server's logits of the first requests must equal
the offline ones (fp32: max |diff| <= 1e-4). --model is a reranker checkpoint, or a decoder given a fresh seeded head
(speed does not depend on the head); --tiny a tiny random reranker, for a smoke run with --quick:

    python benchmarks/bench_server.py --rerank [--model M] [--docs 20] [--device cuda --precision bf16] [--tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from harness import agreement, append_jsonl, check, environment, interleaved, medians, warn_if_busy
from http_load import Endpoint, Server, drive, embed_once, embed_requests, rank_once, rank_requests

from bidir_core.batching import length_sorted_batches
from bidir_core.checkpoint import read_encoder_config
from bidir_core.cross_encoder import CrossEncoder
from bidir_core.datasets import stdlib_dev
from bidir_core.embeddings_artifact import read_embeddings
from bidir_core.errors import BidirError
from bidir_core.reranker_config import RERANKER, RerankerConfig, tokenize_pairs
from bidir_core.sources import open_source, resolve_source
from bidir_core.testing import tiny_cross_encoder
from bidir_core.tokenization import load_tokenizer, tokenize
from bidir_serve import BatchEmbedConfig, embed_corpus
from bidir_serve.backends import load_backend
from bidir_serve.server import ServerConfig

PROG = "bench_server"
SERVER = (
    "bidir-server {model} --host {host} --port {port} --backend torch --device {device} --precision {precision} "
    "--max-batch-tokens {max_batch_tokens}"
)


# --- texts and the offline ceiling -------------------------------------------------------------------------------


def load_texts(kind: str, limit: int | None) -> list[str]:
    dev = stdlib_dev()
    table = dev.corpus if kind == "passages" else dev.queries
    texts = [table[k] for k in sorted(table)]
    return texts[:limit] if limit else texts


def ceiling(args, model: str, texts: list[str], tmp: Path) -> tuple[float, dict, np.ndarray]:
    """(rows/s, seconds per run, the pool's embeddings) of batch-embed on the pool, fixed cost left out."""
    inputs = {}
    for name, rows in (("one", texts[:1]), ("pool", texts)):
        inputs[name] = tmp / f"{name}.jsonl"
        lines = (json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(rows))
        inputs[name].write_text("".join(lines), encoding="utf-8")

    def run(name):
        cfg = BatchEmbedConfig(
            model,
            str(inputs[name]),
            str(tmp / f"out-{name}"),
            device=args.device,
            precision=args.precision,
            max_batch_tokens=args.max_batch_tokens,
            overwrite=True,
            progress=False,
        )
        embed_corpus(cfg)
        return read_embeddings(tmp / f"out-{name}").embeddings()

    out = {}

    def after(r, name, seconds, result):
        print(f"  ceiling run {r + 1} {name} ({len(result)} rows): {seconds:.1f} s", flush=True)
        out[name] = result

    times = interleaved(
        {"one": lambda: run("one"), "pool": lambda: run("pool")}, [()] * args.repeats, after=after
    )
    med = medians(times)
    return (len(texts) - 1) / max(med["pool"] - med["one"], 1e-9), times, out["pool"]


def transformers4_copy(checkpoint: Path, tmp: Path) -> Path:
    """The checkpoint as transformers 4 reads it (infinity-emb 0.0.78 needs transformers < 5): links to its files,
    except tokenizer_config.json, whose tokenizer_class "TokenizersBackend" (transformers 5's name) transformers 4
    refuses ("Tokenizer class TokenizersBackend does not exist"); PreTrainedTokenizerFast reads the same
    tokenizer.json."""
    out = tmp / "checkpoint-transformers4"
    out.mkdir()
    for item in checkpoint.iterdir():
        if item.name != "tokenizer_config.json":
            (out / item.name).symlink_to(item.resolve())
    config = json.loads((checkpoint / "tokenizer_config.json").read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def cells(args) -> list[tuple[int, int, int]]:
    """(texts per request, concurrency, requests): enough requests for --rows rows, at least one per worker."""
    return [(s, c, max(c, math.ceil(args.rows / s))) for s in args.sizes for c in args.concurrency]


def measure(name: str, ep: Endpoint, pool: list[str], want: np.ndarray, args, strict: bool) -> dict:
    """Warm up and check the embeddings, then time every cell; {cell name: figures}."""
    n = min(len(pool), 32)
    got = asyncio.run(embed_once(ep, pool[:n]))
    agree = agreement(got, want[:n]) if got.shape == want[:n].shape else None
    figures = (
        f"max |diff| {agree['max_abs_diff']:.2e}, min cosine {agree['min_cosine']:.6f} vs batch-embed"
        if agree
        else f"shape {got.shape} vs batch-embed's {want[:n].shape}"
    )
    if strict:
        ok = agree is not None and agree["min_cosine"] >= 0.9999
        check(f"{name} check", figures, ok, f"{PROG}: {name} and batch-embed disagree")
    else:
        print(f"{name} vectors (not expected to match: causal attention): {figures}")
    return {"check": agree, **time_cells(name, ep, lambda s: embed_requests(ep, pool, s), args)}


def time_cells(name: str, ep: Endpoint, requests_of, args) -> dict:
    """Time every cell (requests_of(size) gives request k's body), cells interleaved over --repeats rounds;
    {cell name: figures}."""
    plan = cells(args)
    runs = {
        f"{s}x{c}": (lambda s=s, c=c, k=k: asyncio.run(drive(ep, requests_of(s), s, c, k)))
        for s, c, k in plan
    }
    results = {key: [] for key in runs}

    def after(r, key, seconds, result):
        results[key].append(result)
        bad = f", errors {result['errors']}" if result["errors"] else ""
        print(
            f"  {name} run {r + 1} {key}: {result['rows']} rows in {result['seconds']:.1f} s{bad}", flush=True
        )

    interleaved(runs, [()] * args.repeats, after=after)
    out = {}
    for (s, c, k), key in zip(plan, runs, strict=True):
        seconds = [r["seconds"] for r in results[key]]
        lat = sorted(x for r in results[key] for x in r["latencies"])
        med = statistics.median(seconds)
        rows = statistics.median(r["rows"] for r in results[key])
        errors = {}
        for r in results[key]:
            for code, count in r["errors"].items():
                errors[code] = errors.get(code, 0) + count
        out[key] = {
            "size": s,
            "concurrency": c,
            "requests": k,
            "seconds": seconds,
            "requests_per_s": rows / s / med,
            "rows_per_s": rows / med,
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
            "p99_ms": 1000 * lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)] if lat else None,
            "errors": errors,
        }
    return out


# --- reranker mode -----------------------------------------------------------------------------------------------


def reranker_checkpoint(args, tmp: Path) -> str:
    """The reranker to serve: --tiny's tiny random one, --model when it is a reranker, else --model (a decoder or an
    embedder) given a fresh head seeded 0 (speed does not depend on the head's values), saved under tmp."""
    if args.tiny:
        return str(tiny_cross_encoder(RerankerConfig(max_length=128)).save_pretrained(tmp / "tiny-reranker"))
    if open_source(args.model).kind == RERANKER:
        return args.model
    return str(
        CrossEncoder.from_pretrained(args.model, new_head=True, seed=0).save_pretrained(tmp / "reranker")
    )


def rerank_requests(docs: int, limit: int | None) -> list[tuple[str, list[str]]]:
    """One request per stdlib-docstrings dev query (in id order, at most `limit`): the query and the next `docs`
    passages of the corpus (cycling), a first stage's candidates as far as their lengths go."""
    dev = stdlib_dev()
    queries = [dev.queries[k] for k in sorted(dev.queries)][:limit]
    passages = [dev.corpus[k] for k in sorted(dev.corpus)]
    return [
        (q, [passages[(i * docs + j) % len(passages)] for j in range(docs)]) for i, q in enumerate(queries)
    ]


def offline_scoring(
    args, model: str, requests: list[tuple[str, list[str]]]
) -> tuple[float, list[float], list]:
    """(pairs/s, seconds per run, each request's logits) of the server's backend scoring every pair in this process:
    tokenize_pairs, then length-sorted batches of the server's token budget and the backend's max_padding
    (bidir_core.batching), prepare, score. The model is loaded before timing; the median over --repeats runs."""
    cfg = ServerConfig(
        model, device=args.device, precision=args.precision, max_batch_tokens=args.max_batch_tokens
    )
    backend = load_backend(cfg.backend_spec)
    pairs = [(q, d) for q, docs in requests for d in docs]

    def run() -> np.ndarray:
        ids, _ = tokenize_pairs(backend.tokenizer, backend.config, pairs)
        out = np.empty(len(ids), np.float32)
        lengths = [len(r) for r in ids]
        for batch in length_sorted_batches(
            lengths, cfg.max_batch_size, cfg.max_batch_tokens, max_padding=backend.max_padding
        ):
            out[batch] = backend.score(backend.prepare([ids[i] for i in batch]))
        return out

    run()  # warm-up
    out = {}

    def after(r, name, seconds, result):
        print(f"  offline scoring run {r + 1} ({len(result)} pairs): {seconds:.1f} s", flush=True)
        out["logits"] = result

    times = interleaved({"offline": run}, [()] * args.repeats, device=args.device, after=after)["offline"]
    sizes = np.cumsum([0] + [len(docs) for _, docs in requests])
    logits = [out["logits"][a:b] for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    return len(pairs) / statistics.median(times), times, logits


def rerank_main(args, busy: float) -> None:
    args.sizes = [args.docs]
    tmp = Path(tempfile.mkdtemp(prefix=f"{PROG}."))
    try:
        model = reranker_checkpoint(args, tmp)
        requests = rerank_requests(args.docs, args.limit)
        print(f"{torch.get_num_threads()} threads; reranker {model}; {len(requests)} requests of 1 query + {args.docs} "
              "stdlib-docstrings dev passages")  # fmt: skip
        rate, times, want = offline_scoring(args, model, requests)
        print(f"offline scoring (ceiling): {rate:.1f} pairs/s")
        server = Server("bidir-server", None if args.url else args.server,
                        {"model": model, "device": args.device, "precision": args.precision,
                         "max_batch_tokens": args.max_batch_tokens}, args.url, tmp / "server.log")  # fmt: skip
        with server:
            ep = Endpoint(server.url, "/v1/ranking", Path(model).name, "", "float")
            got = np.concatenate([asyncio.run(rank_once(ep, q, docs)) for q, docs in requests[:4]])
            diff = float(np.abs(got - np.concatenate(want[:4])).max())
            # fp32: only batch composition differs (measured ~1e-6 on CPU); bf16/fp16: the decoder's rounding
            tolerance = 1e-4 if args.precision == "fp32" else 0.1
            check("bidir-server check", f"max |logit diff| {diff:.2e} vs offline scoring (<= {tolerance:g})",
                  diff <= tolerance, f"{PROG}: bidir-server and offline scoring disagree")  # fmt: skip
            results = {"bidir-server": {"check": {"max_abs_logit_diff": diff},
                                        **time_cells("bidir-server", ep, lambda s: rank_requests(ep, requests), args)}}  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = table(results, rate, "offline scoring", goal=0.70)
    if args.json:
        record = {
            "benchmark": PROG,
            "mode": "rerank",
            **environment(busy),
            "shapes": {"requests": len(requests), "documents_per_request": args.docs, "concurrency": args.concurrency,
                       "rows_per_cell": args.rows, "repeats": args.repeats, "max_batch_tokens": args.max_batch_tokens},
            "commands": {"bidir-server": args.url or args.server},
            "ceiling": {"pairs_per_s": rate, "seconds": times},
            "servers": results,
            "ratios": ratios,
        }  # fmt: skip
        append_jsonl(args.json, record)


# --- the report --------------------------------------------------------------------------------------------------


def table(
    results: dict[str, dict], ceiling_rows: float, ceiling_name: str = "batch-embed", goal: float = 0.80
) -> dict:
    """Print one line per server and cell; return the ratios."""
    ratios = {}
    head = f"{'server':<14} {'rows/req':>9} {'conc':>4} {'reqs':>5} {'req/s':>7} {'rows/s':>7} {'p50 ms':>8} "
    print("\n" + head + f"{'p99 ms':>8} {'errors':>6} {'/ceiling':>8} {'/infinity':>9}")
    for name, cells_ in results.items():
        for key, c in cells_.items():
            if key == "check":
                continue
            vs_ceiling = c["rows_per_s"] / ceiling_rows
            other = results.get("infinity-emb", {}).get(key)
            vs_inf = c["rows_per_s"] / other["rows_per_s"] if other and name != "infinity-emb" else None
            ratios[f"{name} {key}"] = {"vs_ceiling": vs_ceiling, "vs_infinity": vs_inf}
            print(
                f"{name:<14} {c['size']:>9} {c['concurrency']:>4} {c['requests']:>5} {c['requests_per_s']:>7.2f} "
                f"{c['rows_per_s']:>7.1f} {c['p50_ms'] or float('nan'):>8.0f} {c['p99_ms'] or float('nan'):>8.0f} "
                f"{sum(c['errors'].values()):>6} {vs_ceiling:>8.2f} "
                + (f"{vs_inf:>9.2f}" if vs_inf is not None else f"{'-':>9}")
            )
    print(f"{ceiling_name:<14} {'(offline ceiling)':>26} {ceiling_rows:>15.1f}")
    for key, c in results.get("bidir-server", {}).items():
        if key != "check" and c["concurrency"] == 32:
            r = c["rows_per_s"] / ceiling_rows
            print(
                f"bidir-server / ceiling at concurrency 32, {c['size']} row(s) per request: {r:.2f} (goal >= {goal:.2f})"
            )
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a bidir checkpoint (default: the embedded one)")
    ap.add_argument("--texts", choices=("passages", "queries"), default="passages")
    ap.add_argument(
        "--limit", type=int, default=None, help="at most this many texts in the pool (default: all)"
    )
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies")
    ap.add_argument("--sizes", default="1,32", help="comma-separated texts per request")
    ap.add_argument(
        "--rows",
        type=int,
        default=None,
        help="rows (texts, or pairs) per cell, at least one request per worker (default: 256; --rerank: 128 "
        "requests' worth)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="rounds (cells interleaved); medians are reported")
    ap.add_argument("--server", default=SERVER, help=f"the server command (default: {SERVER!r})")
    ap.add_argument(
        "--url", default=None, help="drive an already running server instead of starting --server"
    )
    ap.add_argument("--path", default="/v1/embeddings", help="the embeddings route of --server")
    ap.add_argument(
        "--infinity",
        default=None,
        help="an infinity-emb command with {checkpoint} {host} {port}, e.g. "
        "'/venv/bin/infinity_emb v2 --model-id {checkpoint} --host {host} --port {port} --engine torch "
        "--device {device} --dtype float32' (default: no infinity baseline)",
    )
    ap.add_argument("--infinity-path", default="/embeddings", help="infinity's embeddings route")
    ap.add_argument(
        "--encoding-format",
        choices=("float", "base64"),
        default="base64",
        help="(base64: as openai's client)",
    )
    ap.add_argument(
        "--max-batch-tokens",
        type=int,
        default=BatchEmbedConfig("", "", "").max_batch_tokens,
        help="padded-token budget per batch, batch-embed's and the server's (default: the library's)",
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="batch-embed's and the server's")
    ap.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="the same, both sides"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads here and OMP_NUM_THREADS of servers"
    )
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run: queries, 64 texts, concurrency 1,8, 1 round"
    )
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line with all figures")
    ap.add_argument(
        "--rerank",
        action="store_true",
        help="the reranker mode: pairs/s of POST /v1/ranking, 1 query + --docs documents per request, against the "
        "offline scoring rate of the same backend (--model a reranker, or a decoder given a fresh head)",
    )
    ap.add_argument("--docs", type=int, default=20, help="--rerank: documents per request (default 20)")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="--rerank: a tiny random reranker instead of --model (a smoke run)",
    )
    args = ap.parse_args()
    # A SIGTERM (a timeout, a Ctrl-C'd parent) unwinds like an exit, so the servers started here are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"{PROG}: terminated"))
    if args.quick and args.rerank:
        args.limit, args.concurrency, args.rows, args.repeats = 8, "1,8", 2 * args.docs, 1
    elif args.quick:
        args.texts, args.limit, args.concurrency, args.rows, args.repeats = "queries", 64, "1,8", 16, 1
    if args.rows is None:
        args.rows = 128 * args.docs if args.rerank else 256
    try:
        args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
        args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        sys.exit(f"{PROG}: --concurrency and --sizes are comma-separated integers")
    if min(args.concurrency + args.sizes + [args.rows, args.repeats, args.max_batch_tokens, args.docs]) < 1:
        sys.exit(
            f"{PROG}: --concurrency, --sizes, --rows, --repeats, --max-batch-tokens and --docs must be at least 1"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the servers' (subprocesses inherit it)
    busy = warn_if_busy()
    if args.rerank:
        try:
            rerank_main(args, busy)
        except BidirError as e:
            sys.exit(f"{PROG}: {e}")
        return
    try:
        checkpoint = resolve_source(args.model)
    except BidirError as e:
        sys.exit(f"{PROG}: {e}")
    encoder = read_encoder_config(checkpoint)
    prefix = encoder.passage_prefix if encoder else ""
    texts = load_texts(args.texts, args.limit)
    ids, _ = tokenize(
        load_tokenizer(checkpoint), [prefix + t for t in texts], encoder.max_length if encoder else 512
    )
    lengths = sorted(len(r) for r in ids)
    print(
        f"{torch.get_num_threads()} threads; model {checkpoint}; {len(texts)} stdlib-docstrings dev {args.texts}, "
        f"tokens with the passage prefix: median {lengths[len(lengths) // 2]}, max {lengths[-1]}"
    )

    tmp = Path(tempfile.mkdtemp(prefix=f"{PROG}."))
    try:
        ceiling_rows, ceiling_times, want = ceiling(args, args.model, texts, tmp)
        print(f"batch-embed (offline ceiling): {ceiling_rows:.1f} rows/s")
        results = {}
        fields = {
            "model": args.model,
            "device": args.device,
            "precision": args.precision,
            "max_batch_tokens": args.max_batch_tokens,
        }
        ours = Server("bidir-server", None if args.url else args.server, fields, args.url, tmp / "server.log")
        with ours:
            ep = Endpoint(ours.url, args.path, args.model, "", args.encoding_format)
            results["bidir-server"] = measure("bidir-server", ep, texts, want, args, strict=True)
        if args.infinity:
            copy = transformers4_copy(checkpoint, tmp)
            inf = Server(
                "infinity-emb",
                args.infinity,
                {"checkpoint": copy, "device": args.device},
                log=tmp / "infinity.log",
            )
            with inf:
                ep = Endpoint(inf.url, args.infinity_path, str(copy), prefix, args.encoding_format)
                results["infinity-emb"] = measure("infinity-emb", ep, texts, want, args, strict=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = table(results, ceiling_rows)
    if args.json:
        record = {
            "benchmark": PROG,
            **environment(busy),
            "shapes": {
                "texts": args.texts,
                "pool": len(texts),
                "median_tokens": lengths[len(lengths) // 2],
                "concurrency": args.concurrency,
                "sizes": args.sizes,
                "rows_per_cell": args.rows,
                "repeats": args.repeats,
                "max_batch_tokens": args.max_batch_tokens,
                "encoding_format": args.encoding_format,
            },
            "commands": {"bidir-server": args.url or args.server, "infinity-emb": args.infinity},
            "ceiling": {"rows_per_s": ceiling_rows, "seconds": ceiling_times},
            "servers": results,
            "ratios": ratios,
        }
        append_jsonl(args.json, record)


if __name__ == "__main__":
    main()
