"""Fine-tuning on a corpus's own documents, measured on Cranfield: synthetic queries, mined negatives, reranker
distillation, against BM25, hybrid retrieval and all-MiniLM-L6-v2.

Only Cranfield's 1,400 documents make training data; its 225 judged queries stay evaluation-only. The flow is the
one the train README gives a user for their own corpus (generate -> mine -> train -> evaluate), each stage under
--out and skipped when its output is there, so an interrupted run continues where it stopped (a training stage from
its last checkpoint, saved every 25 steps):

  synth_raw.jsonl      bidir-synth GENERATOR --corpus cranfield (greedy, --dtype): one question per document
  synth_kw_raw.jsonl   the same with --prompt keywords: a second, keyword-style query per document
  general.jsonl        --general-rows stdlib-docstrings train pairs, a seeded sample (the default recipe's data)
  general/             the default recipe (train/recipes/default.yaml) on general.jsonl for one epoch
  mix.jsonl            the synthetic pairs that pass the round-trip filter with general/ (bidir-synth's
                       --filter-model, top --filter-top-k), and the general rows; mix_all.jsonl: every pair
  synth-64/, synth-256/
                       the default recipe on mix.jsonl for one epoch, passages cut at 64 / 256 tokens
  mined3.jsonl         bidir-mine synth-256 --train mix.jsonl (positive-aware), 3 negatives per query
  mined.jsonl          mined3.jsonl with each row's first negative only: what mining 1 negative writes (the miner
                       only stops sooner), without embedding the same corpus twice
  mined-256/           synth-256's run on mined.jsonl, one hard negative per query and step
  mined_skip10.jsonl, mined-256-skip10/
                       the same with bidir-mine --skip-top 10: the negative is the best candidate below the 10 best
                       (a Cranfield question's top ranks hold many unjudged relevant abstracts)
  mined-256-2ep/       the same run on mined3.jsonl for two epochs: each epoch draws a query's one negative of the
                       step afresh from its 3
  mix_kw.jsonl, mined_kw3.jsonl, mined_kw.jsonl, mined-256-kw/
                       the keyword queries that pass the same filter added to mix.jsonl, mined by synth-256 as
                       above, and mined-256's run on them
  mined_all.jsonl, mined-256-all/
                       the same from mix_all.jsonl: no round-trip filter
  mined_rescored.jsonl, distill-256/
                       (--reranker) mined.jsonl with the reranker's logits as teacher scores (bidir-rescore),
                       and mined-256's run on it plus loss.distill=kl

Every checkpoint is scored with its own settings (bidir.json: pooling, prefixes) on passages up to --max-length
tokens in --dtype: STS-B dev Spearman, and nDCG@10 / recall@100 on Cranfield and the stdlib dev split, beside the
untrained model, BM25, the hybrid (weighted, equal weights) of the best dense row, and all-MiniLM-L6-v2.

    python benchmarks/quality_domain.py                 # about 5 hours on 2 CPU cores with AMX (bf16)
    python benchmarks/quality_domain.py --dtype fp32    # fp32 where --dtype auto would pick bf16
    python benchmarks/quality_domain.py --out runs/domain-smoke --docs 40 --general-rows 32 --max-steps 2 \\
        --cranfield-queries 5 --stdlib-limit 10 --sts-limit 20 --no-minilm     # the plumbing, not the numbers
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import data_dir
from quality import DTYPES, add_dtype_argument, minilm
from quality_data import limit_retrieval

from bidir_core.bm25 import bm25_run
from bidir_core.datasets import load_retrieval, read_sts, stdlib_train
from bidir_core.datasets.lines import read_jsonl
from bidir_core.embedded import EMBEDDED_DEFAULT
from bidir_core.encoder import BiEncoder
from bidir_core.evaluation import evaluate_sts
from bidir_core.fusion import fuse
from bidir_core.jsonfile import write_jsonl_atomic
from bidir_core.metrics import retrieval_metrics
from bidir_core.runs import embedder_run

RECIPE = Path(__file__).resolve().parents[1] / "packages" / "train" / "recipes" / "default.yaml"
METRICS = ("ndcg@10", "recall@100")
CHECKPOINT_EVERY = 25  # steps: a killed stage loses at most this many
UNTRAINED, BM25, MINILM = "SmolLM2-135M untrained", "BM25 (reference)", "all-MiniLM-L6-v2 (reference)"
GENERAL = "default recipe: stdlib pairs only, passages 64"
SYNTH_64, SYNTH_256 = (
    "+ synthetic Cranfield queries, passages 64",
    "+ synthetic Cranfield queries, passages 256",
)
MINED, DISTILL = "+ mined negatives (1 per query), passages 256", "+ reranker distillation (kl), passages 256"
MINED_ALL = "+ mined negatives, no round-trip filter, passages 256"
MINED_2EP = "+ mined negatives (1 of 3 per query, drawn each epoch), 2 epochs, passages 256"
MINED_KW = "+ mined negatives (1 per query), + keyword queries, passages 256"
MINED_SKIP = "+ mined negatives (1 per query, the 10 best candidates skipped), passages 256"


class Pipeline:
    """The stages, each skipped when its output exists; wall times in out/timings.json."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.timings = self._read("timings.json")

    def _read(self, name):
        path = self.out / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def _timed(self, name, cmd):
        print(f"[{name}] {' '.join(map(str, cmd))}", flush=True)
        start = time.perf_counter()
        subprocess.run([str(c) for c in cmd], check=True)
        self._record(name, start)

    def _record(self, name: str, start: float) -> None:
        """A stage's wall time since `start`, into out/timings.json."""
        self.timings[name] = round(time.perf_counter() - start, 1)
        (self.out / "timings.json").write_text(json.dumps(self.timings, indent=2) + "\n")

    def _encoder(self, model) -> BiEncoder:
        """A trained row's model as it is scored (and filters): its own settings, --max-length tokens, --dtype."""
        a = self.args
        return BiEncoder.from_pretrained(str(model), max_length=a.max_length, dtype=DTYPES[a.dtype])

    def generate(self, name: str, prompt: str) -> Path:
        """out/NAME_raw.jsonl: bidir-synth's greedy query for each Cranfield document with a packaged prompt."""
        a, out = self.args, self.out
        synth = out / f"{name}_raw.jsonl"
        if not synth.is_file():
            corpus = data_dir() / "cranfield" / "corpus.jsonl"
            if a.docs:  # the first N documents (smoke runs)
                lines = corpus.read_text(encoding="utf-8").splitlines()[: a.docs]
                corpus = out / "corpus.jsonl"
                corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
            cmd = [
                sys.executable,
                "-m",
                "bidir_train.synth",
                a.generator,
                "--corpus",
                corpus,
                "--output",
                synth,
            ]
            cmd += ["--prompt", prompt, "--dtype", a.dtype, "--batch-size", "16", "--no-progress"]
            self._timed(name, cmd)
        return synth

    def data(self) -> tuple[Path, Path]:
        """(bidir-synth's questions, the general rows)."""
        synth, general = self.generate("synth", "question"), self.out / "general.jsonl"
        if not general.is_file():  # a seeded sample: the split is in module order
            rows = stdlib_train()
            random.Random(0).shuffle(rows)
            write_jsonl_atomic(
                general,
                (
                    {"query": e.query, "pos_doc": list(e.positives), "pos_ids": list(e.positive_ids)}
                    for e in rows[: self.args.general_rows]
                ),
            )
        return synth, general

    def filter(self, synth: Path, general: Path, model: Path) -> Path:
        """The round-trip filter bidir-synth's --filter-model runs (round_trip_filter), here on its output with
        the general row's model: a pair stays when its document is in the query's top --filter-top-k of the whole
        corpus. Then the general rows are mixed in (the trainer shuffles them)."""
        mix = self.out / "mix.jsonl"
        if not (self.out / "mix_all.jsonl").is_file():  # the ablation: every synthetic pair
            rows = [row for path in (synth, general) for _, row in read_jsonl(path)]
            write_jsonl_atomic(self.out / "mix_all.jsonl", rows)
        if not mix.is_file():
            kept = self._round_trip(synth, model, "filter")
            write_jsonl_atomic(mix, [*kept, *(row for _, row in read_jsonl(general))])
        return mix

    def filter_keywords(self, keywords: Path, mix: Path, model: Path) -> Path:
        """out/mix_kw.jsonl: the keyword queries that pass the same round-trip filter, then mix.jsonl's rows."""
        mix_kw = self.out / "mix_kw.jsonl"
        if not mix_kw.is_file():
            kept = self._round_trip(keywords, model, "filter_kw")
            write_jsonl_atomic(mix_kw, [*kept, *(row for _, row in read_jsonl(mix))])
        return mix_kw

    def _round_trip(self, synth: Path, model: Path, stage: str) -> list[dict]:
        """The rows of `synth` whose document `model` ranks in its query's top --filter-top-k of every document
        the file holds (the corpus it was generated from, less the passages with no query)."""
        from bidir_train.round_trip import round_trip_filter

        rows = [row for _, row in read_jsonl(synth)]
        corpus = list(dict.fromkeys(text for row in rows for text in row["pos_doc"]))
        index = {text: i for i, text in enumerate(corpus)}
        encoder = self._encoder(model)
        start = time.perf_counter()
        keep, counts = round_trip_filter(
            encoder,
            [row["query"] for row in rows],
            [index[row["pos_doc"][0]] for row in rows],
            corpus,
            top_k=self.args.filter_top_k,
        )
        self._record(stage, start)
        print(f"[{stage}] top {self.args.filter_top_k}: {counts}", flush=True)
        return [row for row, k in zip(rows, keep, strict=True) if k]

    def train(self, name: str, rows: Path, length: int, *overrides: str) -> Path:
        """The default recipe from --model on `rows` for one epoch (or --max-steps), passages cut at `length`
        tokens, queries at 64."""
        a, run = self.args, self.out / name
        if not (run / "final").is_dir():
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
            cmd += [
                "-m",
                "bidir_train",
                "--config",
                RECIPE,
                f"logging.output_dir={run}",
                f"data.train={rows}",
            ]
            cmd += [
                f"model.path={a.model}",
                f"model.passage_max_length={length}",
                "model.query_max_length=64",
                f"model.precision={a.dtype}",
            ]
            cmd += [
                f"schedule.max_steps={a.max_steps or 'null'}",
                "schedule.epochs=1",
                "schedule.warmup_steps=10",
                # a killed stage resumes from its latest checkpoint when the benchmark is run again
                f"checkpoint.every_steps={CHECKPOINT_EVERY}",
            ]
            self._timed(
                name, [*cmd, "eval.dev=null", "logging.progress=false", *overrides, *a.train_override]
            )
            # final/ is written: the stage's resume points (1.6 GB each for the 135M model) are spent
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
        return run / "final"

    def mine(self, model: Path, rows: Path, name: str, negatives: int = 1, skip_top: int = 0) -> Path:
        """bidir-mine's negatives for `rows` into out/NAME.jsonl, `negatives` per row below the `skip_top` best
        candidates; a row left with none (every candidate past the margin) cannot train a hard negative and is
        left out (--drop-empty-rows)."""
        mined = self.out / f"{name}.jsonl"
        if not mined.is_file():
            cmd = [sys.executable, "-m", "bidir_train.mine", model, "--train", rows, "--output", mined]
            cmd += ["--num-negatives", negatives, "--max-length", 256, "--drop-empty-rows", "--no-progress"]
            cmd += ["--skip-top", skip_top]
            self._timed(name, cmd)
        return mined

    def first_negatives(self, mined: Path, name: str, negatives: int = 1) -> Path:
        """out/NAME.jsonl: the rows of `mined` cut to their first `negatives` negatives (their ids and scores with
        them). bidir-mine takes negatives best first and stops at --num-negatives, so this is what mining fewer
        writes for rows like mix.jsonl's: no negatives of their own (bidir-mine keeps those whole), and an id on
        every passage or on none (test_mine's test_fewer_negatives_are_the_first_of_more)."""
        out = self.out / f"{name}.jsonl"
        if not out.is_file():
            rows = [row for _, row in read_jsonl(mined)]
            for row in rows:
                for key in ("neg_doc", "neg_ids", "neg_scores"):
                    if key in row:
                        row[key] = row[key][:negatives]
            write_jsonl_atomic(out, rows)
        return out

    def rescore(self, mined: Path, reranker: str) -> Path:
        """The mined rows with the reranker's logits as teacher scores, into out/mined_rescored.jsonl
        (bidir-rescore: the same rows, not mined again)."""
        rescored = self.out / "mined_rescored.jsonl"
        if not rescored.is_file():
            cmd = [sys.executable, "-m", "bidir_train.rescore", reranker, "--train", mined]
            self._timed("rescore", [*cmd, "--output", rescored, "--no-progress"])
        return rescored

    @functools.cached_property
    def sets(self) -> dict:
        a = self.args
        return {
            "cranfield": limit_retrieval(load_retrieval(data_dir() / "cranfield"), a.cranfield_queries, None),
            "stdlib": limit_retrieval(load_retrieval("stdlib-docstrings"), a.stdlib_limit, None),
        }

    def evaluate(self, label: str, model) -> None:
        """STS-B dev and both retrieval sets for one system, into out/results.json."""
        if label in self._read("results.json"):
            return
        start = time.perf_counter()
        sts = read_sts(data_dir() / "stsb" / "sts-dev.tsv")[: self.args.sts_limit]
        if model == BM25:
            from bm25 import bm25_sts

            search, sts_score = bm25_run, bm25_sts(sts)["spearman"]
        else:
            encoder = minilm() if model == MINILM else self._encoder(model)
            sts_score = evaluate_sts(encoder, sts, batch_size=32)["spearman"]

            def search(data):
                return embedder_run(encoder, data, batch_size=32)

        self._score(label, search, sts_score, start)

    def hybrid(self, best: str, model: Path) -> None:
        """A dense row fused with BM25 (STS-B has no run to fuse: None)."""
        label = f"hybrid: {best} + BM25 (weighted, equal weights)"
        if label in self._read("results.json"):
            return
        start = time.perf_counter()
        encoder = self._encoder(model)

        def search(data):
            return fuse([embedder_run(encoder, data, batch_size=32), bm25_run(data)], "weighted")

        self._score(label, search, None, start)

    def _score(self, label: str, search, sts_score: float | None, start: float) -> None:
        """The row of one system: its STS-B score, the metrics of search(dataset) on both retrieval sets and the
        seconds since `start`, into out/results.json."""
        row = {"sts_spearman": sts_score}
        for name, data in self.sets.items():
            metrics = retrieval_metrics(search(data), data.qrels)
            row.update({f"{name}_{m}": metrics[m] for m in METRICS})
        row["eval_s"] = round(time.perf_counter() - start, 1)
        print(f"[eval] {label}: {row}", flush=True)
        results = {**self._read("results.json"), label: row}
        (self.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    def run(self) -> dict:
        """Each row is scored as soon as it is trained, the most telling first."""
        a = self.args
        synth, general = self.data()
        self.evaluate(GENERAL, self.train("general", general, 64))
        mix = self.filter(synth, general, self.out / "general" / "final")
        self.evaluate(SYNTH_256, self.train("synth-256", mix, 256))
        self.evaluate(BM25, BM25)
        miner = self.out / "synth-256" / "final"
        # the keyword queries first: the rows that add the most data to the best recipe
        mix_kw = self.filter_keywords(
            self.generate("synth_kw", "keywords"), mix, self.out / "general" / "final"
        )
        mined_kw3 = self.mine(miner, mix_kw, "mined_kw3", negatives=3)
        mined_kw = self.first_negatives(mined_kw3, "mined_kw")
        self.evaluate(MINED_KW, self.train("mined-256-kw", mined_kw, 256, "data.num_negatives=1"))
        mined3 = self.mine(miner, mix, "mined3", negatives=3)
        mined = self.first_negatives(mined3, "mined")
        self.evaluate(MINED, self.train("mined-256", mined, 256, "data.num_negatives=1"))
        skipped = self.mine(miner, mix, "mined_skip10", skip_top=10)
        self.evaluate(MINED_SKIP, self.train("mined-256-skip10", skipped, 256, "data.num_negatives=1"))
        self.evaluate(
            MINED_2EP, self.train("mined-256-2ep", mined3, 256, "data.num_negatives=1", "schedule.epochs=2")
        )
        self.evaluate(SYNTH_64, self.train("synth-64", mix, 64))
        mined_all = self.mine(miner, self.out / "mix_all.jsonl", "mined_all")
        self.evaluate(MINED_ALL, self.train("mined-256-all", mined_all, 256, "data.num_negatives=1"))
        if a.reranker:
            rescored = self.rescore(mined, a.reranker)
            distill = self.train("distill-256", rescored, 256, "data.num_negatives=1", "loss.distill=kl")
            self.evaluate(DISTILL, distill)
        results = self._read("results.json")
        dense = [label for label in RUN_OF if label in results]
        best = max(dense, key=lambda label: results[label]["cranfield_ndcg@10"])
        self.hybrid(best, self.out / RUN_OF[best] / "final")
        self.evaluate(UNTRAINED, a.model)
        if not a.no_minilm:
            self.evaluate(MINILM, MINILM)
        return self._read("results.json")


RUN_OF = {
    GENERAL: "general",
    SYNTH_64: "synth-64",
    SYNTH_256: "synth-256",
    MINED: "mined-256",
    MINED_ALL: "mined-256-all",
    MINED_2EP: "mined-256-2ep",
    MINED_KW: "mined-256-kw",
    MINED_SKIP: "mined-256-skip10",
    DISTILL: "distill-256",
}


def table(results: dict, timings: dict) -> str:
    """Markdown: a row per system, its training wall time (generation and mining included where it used them)."""
    filtered = ("synth", "general", "filter")  # the filter runs the general row's model
    mined = (*filtered, "synth-256")  # synth-256 is the miner
    stages = {
        SYNTH_64: filtered,
        SYNTH_256: filtered,
        MINED: (*mined, "mined3"),  # mined.jsonl is mined3.jsonl cut to one negative
        MINED_ALL: (*mined, "mined_all"),
        MINED_2EP: (*mined, "mined3"),
        MINED_KW: (*mined, "synth_kw", "filter_kw", "mined_kw3"),
        MINED_SKIP: (*mined, "mined_skip10"),
        DISTILL: (*mined, "mined3", "rescore"),
    }
    lines = [
        "| system | STS-B dev x100 | Cranfield nDCG@10 | Cranfield recall@100 | stdlib dev nDCG@10 | "
        "stdlib dev recall@100 | training wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        run = RUN_OF.get(label)
        parts = [*stages.get(label, ()), run] if run else []
        wall = sum(timings.get(p, 0.0) for p in parts)
        shown = f"{wall / 60:.1f} min ({' + '.join(parts)})" if parts else "-"
        sts = "-" if r["sts_spearman"] is None else f"{100 * r['sts_spearman']:.2f}"
        cells = " | ".join(f"{r[f'{s}_{m}']:.4f}" for s in ("cranfield", "stdlib") for m in METRICS)
        lines.append(f"| {label} | {sts} | {cells} | {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/domain", help="run folder (default runs/domain)")
    p.add_argument("--model", default=EMBEDDED_DEFAULT, help="base model of every run (default smollm2-135m)")
    p.add_argument(
        "--generator", default=EMBEDDED_DEFAULT, help="bidir-synth's generator (default smollm2-135m)"
    )
    p.add_argument(
        "--reranker", help="a reranker checkpoint: rescore the mined rows and add the distillation row"
    )
    p.add_argument("--general-rows", type=int, default=800, help="stdlib train pairs mixed in (default 800)")
    p.add_argument(
        "--filter-top-k",
        type=int,
        default=10,
        help="round-trip filter: the document in the top K (default 10)",
    )
    p.add_argument("--docs", type=int, help="generate from the first N Cranfield documents (default: all)")
    p.add_argument("--train-override", nargs="*", default=(), help="key=value for every training run")
    p.add_argument("--max-steps", type=int, help="steps per training run (default: one epoch)")
    p.add_argument("--sts-limit", type=int, help="first N STS-B dev pairs (default: all 1500)")
    p.add_argument("--cranfield-queries", type=int, help="first N Cranfield queries (default: all 225)")
    p.add_argument("--stdlib-limit", type=int, help="first N stdlib dev queries (default: all 361)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text at evaluation (default 256)")
    add_dtype_argument(p, "generation, training and evaluation dtype")
    p.add_argument("--no-minilm", action="store_true", help="leave out the all-MiniLM-L6-v2 row")
    args = p.parse_args(argv)
    print(f"dtype: {args.dtype}", flush=True)
    pipeline = Pipeline(args)
    text = table(pipeline.run(), pipeline.timings)
    print(text)
    (pipeline.out / "table.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
