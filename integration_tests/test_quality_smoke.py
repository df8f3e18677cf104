"""benchmarks/README.md's `nox -s quality -- --only best` and `--only ablations` commands (their arguments read from
the README) in a quick smoke mode, on a tiny random model. best: every stage runs (contrastive, then CoSENT on STS-B train from it), the last one into
--out/best/final, and only that row is evaluated and tabled. ablations: each row's run changes the one thing its
label says. Needs the shared data (SNLI, MRPC, STS-B, Cranfield). A few minutes on 2 cores: each stage is a fresh
torchrun process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from readme import command

from bidir_core.testing import tiny_encoder

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BIDIR_DATA") or ROOT.parent / "shared" / "data")
SMOKE = ["--rows-per-source", "32", "--sts-limit", "30", "--cranfield-queries", "3", "--cranfield-docs", "40",
         "--stdlib-limit", "10", "--max-length", "32", "--dtype", "fp32"]  # fmt: skip
SHORT = ["schedule.max_steps=2", "schedule.warmup_steps=0", "checkpoint.every_steps=0", "model.precision=fp32",
         "schedule.global_batch_size=8", "schedule.micro_batch_size=8", "schedule.forward_chunk_size=4"]  # fmt: skip


NEEDS_DATA = pytest.mark.skipif(
    not all((DATA / d).is_dir() for d in ("snli_pairs", "mrpc", "stsb", "cranfield")),
    reason=f"needs the shared data folder {DATA} (set BIDIR_DATA)",
)


def run_quality(only: str, model: Path, out: Path, timeout: int) -> subprocess.CompletedProcess:
    """benchmarks/README.md's `nox -s quality -- --only ONLY ...` in smoke mode: the README's arguments as written,
    then --out, --model and SMOKE (which win over the README's values), every stage SHORT, run from out's parent;
    asserts it exits 0."""
    words = command("benchmarks/README.md", f"nox -s quality -- --only {only}")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), *words[words.index("--") + 1 :]]
    cmd += ["--out", str(out), "--model", str(model), *SMOKE]
    for stage in ("--train-override", "--mntp-override", "--cosent-override"):
        cmd += [stage, *SHORT]
    env = {**os.environ, "BIDIR_DATA": str(DATA), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@NEEDS_DATA
def test_only_best_trains_every_stage_and_scores_it(tmp_path):
    model = tmp_path / "tiny"
    tiny_encoder().save_pretrained(model)
    out = tmp_path / "quality"
    run_quality("best", model, out, timeout=600)

    # The contrastive stage started from the base model, and CoSENT continued from it into best/final.
    stages = ("best/stages/contrastive", "best")
    recipes = {s: json.loads((out / s / "recipe.json").read_text()) for s in stages}
    assert recipes["best/stages/contrastive"]["objective"] == "contrastive"
    assert recipes["best/stages/contrastive"]["model"]["path"] == str(model)
    assert recipes["best"]["objective"] == "cosent"
    assert recipes["best"]["model"]["path"] == str(out / "best/stages/contrastive/final")
    assert recipes["best"]["data"]["train"].endswith("sts-train.tsv")
    assert (out / "best" / "final" / "bidir.json").is_file()

    # Only the best row was evaluated and tabled, with every column and its training time.
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["best: contrastive (1 epoch) + CoSENT on STS-B train"]
    assert set(results[next(iter(results))]) >= {"sts_spearman", "cranfield_ndcg@10", "stdlib_ndcg@10"}
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 3 and "(best/stages/contrastive + best)" in table[2]
    # A second run finds every stage done and trains nothing.
    again = run_quality("best", model, out, timeout=600)
    assert "bidir_train" not in again.stdout


@NEEDS_DATA
def test_only_ablations_changes_one_thing_per_row(tmp_path):
    model = tmp_path / "tiny"
    tiny_encoder(tie_word_embeddings=True).save_pretrained(model)  # MNTP's LM head: the tied embeddings
    out = tmp_path / "quality"
    run_quality("ablations", model, out, timeout=900)

    def recipe(name):
        return json.loads((out / "ablations" / name / "recipe.json").read_text())

    reference = recipe("lr1e-3")
    assert reference["objective"] == "contrastive" and reference["model"]["path"] == str(model)
    assert reference["loss"]["temperature"] == 0.05
    for lr in ("1e-4", "2e-4", "5e-4", "2e-3"):
        assert recipe(f"lr{lr}")["optim"]["lr"] == float(lr)
    assert recipe("lr5e-4_t0.02")["loss"]["temperature"] == 0.02
    assert recipe("mntp")["objective"] == "mntp"
    assert recipe("mntp_contrastive")["model"]["path"] == str(out / "ablations" / "mntp" / "final")
    cosent = recipe("cosent_lr1e-4")
    assert cosent["objective"] == "cosent" and cosent["optim"]["lr"] == 1e-4
    assert cosent["model"]["path"] == str(out / "ablations" / "lr1e-3" / "final")
    # The installed-docstrings row trains on the same rows plus 3,000 docstring pairs.
    rows = (out / "data" / "train.jsonl").read_text().splitlines()
    mixed = (out / "data" / "train_installed.jsonl").read_text().splitlines()
    assert mixed[: len(rows)] == rows and len(mixed) == len(rows) + 3000
    assert recipe("installed")["data"]["train"] == str(out / "data" / "train_installed.jsonl")

    results = json.loads((out / "results.json").read_text())
    assert len(results) == 13 and all(
        set(r) >= {"sts_spearman", "cranfield_ndcg@10"} for r in results.values()
    )
    table = (out / "table.md").read_text()
    assert "| MNTP (80 steps), then contrastive 40 steps, lr 1e-3 |" in table
    assert "(ablations/mntp + ablations/mntp_contrastive)" in table


@NEEDS_DATA
def test_domain_generates_filters_mines_and_trains_every_row(tmp_path):
    """benchmarks/README.md's `nox -s quality -- domain` (quality_domain.py) in smoke mode: a tiny random causal LM
    generates from 12 Cranfield documents, the round-trip filter keeps what the general row's model finds, mining
    and every training row run from the base model (the distillation row on a tiny random reranker's scores), and
    each row is scored and tabled; a second run trains nothing."""
    from bidir_core.testing import tiny_cross_encoder, write_hf_llama

    model, generator, reranker = tmp_path / "tiny", write_hf_llama(tmp_path / "llama"), tmp_path / "reranker"
    tiny_encoder().save_pretrained(model)
    tiny_cross_encoder().save_pretrained(reranker)
    out = tmp_path / "domain"
    words = command("benchmarks/README.md", "nox -s quality -- domain")
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "quality_domain.py"),
        *words[words.index("domain") + 1 :],
    ]
    cmd += ["--out", str(out), "--model", str(model), "--generator", str(generator), "--docs", "12"]
    cmd += ["--general-rows", "12", "--filter-top-k", "6", "--max-steps", "2", "--sts-limit", "20"]
    cmd += ["--cranfield-queries", "3", "--stdlib-limit", "5", "--max-length", "32", "--no-minilm"]
    cmd += ["--reranker", str(reranker)]
    cmd += ["--train-override", *SHORT]
    env = {**os.environ, "BIDIR_DATA": str(DATA), "OMP_NUM_THREADS": "1"}

    def run():
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run()

    def rows(name):
        return [json.loads(line) for line in (out / name).read_text().splitlines()]

    raw, mix, general = rows("synth_raw.jsonl"), rows("mix.jsonl"), rows("general.jsonl")
    assert len(raw) <= 12 and len(general) == 12 and mix[len(mix) - 12 :] == general
    assert all(row in raw for row in mix[: len(mix) - 12])  # the filter only removes
    assert rows("mix_all.jsonl") == raw + general

    def recipe(name):
        return json.loads((out / name / "recipe.json").read_text())

    runs = ("general", "synth-64", "synth-256", "mined-256", "mined-256-all", "mined-256-2ep", "distill-256")
    runs += ("mined-256-kw", "mined-256-skip10")
    assert all(recipe(r)["model"]["path"] == str(model) for r in runs)
    assert recipe("general")["data"]["train"] == str(out / "general.jsonl")
    assert recipe("synth-64")["model"]["passage_max_length"] == 64
    assert recipe("synth-256")["model"]["passage_max_length"] == 256
    assert recipe("mined-256")["data"]["num_negatives"] == 1
    assert recipe("mined-256")["data"]["train"] == str(out / "mined.jsonl")
    results = json.loads((out / "results.json").read_text())
    assert recipe("mined-256-all")["data"]["train"] == str(out / "mined_all.jsonl")
    assert {row["query"] for row in rows("mined_all.jsonl")} <= {row["query"] for row in raw + general}
    assert recipe("mined-256-2ep")["data"]["train"] == str(out / "mined3.jsonl")
    assert recipe("mined-256-2ep")["schedule"]["epochs"] == 2
    assert recipe("mined-256-2ep")["data"]["num_negatives"] == 1
    assert all(1 <= len(r["neg_doc"]) <= 3 for r in rows("mined3.jsonl"))
    assert max(len(r["neg_doc"]) for r in rows("mined3.jsonl")) > 1
    cut = [{**r, "neg_doc": r["neg_doc"][:1], "neg_ids": r["neg_ids"][:1]} for r in rows("mined3.jsonl")]
    assert rows("mined.jsonl") == cut  # one negative: mined3's first (test_mine: what mining one writes)
    keywords, mix_kw = rows("synth_kw_raw.jsonl"), rows("mix_kw.jsonl")
    assert mix_kw[len(mix_kw) - len(mix) :] == mix  # the keyword queries that pass the filter, then mix.jsonl
    assert all(row in keywords for row in mix_kw[: len(mix_kw) - len(mix)])
    assert recipe("mined-256-kw")["data"]["train"] == str(out / "mined_kw.jsonl")
    assert recipe("mined-256-skip10")["data"]["train"] == str(out / "mined_skip10.jsonl")
    assert all(len(r["neg_doc"]) == 1 for r in rows("mined_skip10.jsonl"))
    assert {row["query"] for row in rows("mined_kw3.jsonl")} <= {row["query"] for row in mix_kw}
    rescored = rows("mined_rescored.jsonl")  # mined.jsonl, and the reranker's scores for distill-256
    assert [{k: r[k] for k in ("query", "neg_doc")} for r in rescored] == [
        {k: r[k] for k in ("query", "neg_doc")} for r in rows("mined.jsonl")
    ]
    assert all(len(r["neg_scores"]) == len(r["neg_doc"]) and "pos_score" in r for r in rescored)
    assert recipe("distill-256")["loss"]["distill"] == "kl"
    assert recipe("distill-256")["data"]["train"] == str(out / "mined_rescored.jsonl")
    assert len(results) == 12 and sum(label.startswith("hybrid: ") for label in results) == 1
    assert all(set(r) >= {"cranfield_ndcg@10", "stdlib_recall@100"} for r in results.values())
    table = (out / "table.md").read_text()
    assert "(synth + general + filter + synth-256 + mined3 + mined-256)" in table
    assert "(synth + general + filter + synth-256 + mined3 + rescore + distill-256)" in table
    assert "(synth + general + filter + synth-256 + synth_kw + filter_kw + mined_kw3 + mined-256-kw)" in table
    assert "(synth + general + filter + synth-256 + mined_skip10 + mined-256-skip10)" in table
    assert "bidir_train" not in run().stdout
