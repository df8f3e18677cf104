"""`python benchmarks/quality.py --only best` in its quick smoke mode, on a tiny random model: every stage of the best
recipe runs (MNTP, contrastive from it, CoSENT on STS-B train from that), the last one into --out/best/final, and
only that row is evaluated and tabled. Needs the shared data (SNLI, MRPC, STS-B, Cranfield). About a minute on 2
cores: three torchrun stages, each a fresh process, are what is tested."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bidir_core.testing import tiny_encoder

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BIDIR_DATA") or ROOT.parent / "shared" / "data")
SMOKE = ["--rows-per-source", "32", "--sts-limit", "30", "--cranfield-queries", "3", "--cranfield-docs", "40",
         "--stdlib-limit", "10", "--max-length", "32", "--dtype", "fp32"]  # fmt: skip
SHORT = ["schedule.max_steps=2", "schedule.warmup_steps=0", "checkpoint.every_steps=0", "model.precision=fp32",
         "schedule.global_batch_size=8", "schedule.micro_batch_size=8", "schedule.forward_chunk_size=4"]  # fmt: skip


@pytest.mark.skipif(
    not all((DATA / d).is_dir() for d in ("snli_pairs", "mrpc", "stsb", "cranfield")),
    reason=f"needs the shared data folder {DATA} (set BIDIR_DATA)",
)
def test_only_best_trains_every_stage_and_scores_it(tmp_path):
    model = tmp_path / "tiny"
    tiny_encoder(tie_word_embeddings=True).save_pretrained(
        model
    )  # MNTP needs an LM head: the tied embeddings
    out = tmp_path / "quality"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--only", "best", "--out", str(out)]
    cmd += ["--model", str(model), *SMOKE]
    for stage in ("--train-override", "--mntp-override", "--cosent-override"):
        cmd += [stage, *SHORT]
    env = {**os.environ, "BIDIR_DATA": str(DATA), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Each stage continued from the one before, and the last wrote best/final.
    recipes = {s: json.loads((out / s / "recipe.json").read_text()) for s in ("best/stages/mntp",
               "best/stages/contrastive", "best")}  # fmt: skip
    assert recipes["best/stages/mntp"]["objective"] == "mntp"
    assert recipes["best/stages/mntp"]["model"]["path"] == str(model)
    assert recipes["best/stages/contrastive"]["model"]["path"] == str(out / "best/stages/mntp/final")
    assert recipes["best"]["objective"] == "cosent"
    assert recipes["best"]["model"]["path"] == str(out / "best/stages/contrastive/final")
    assert recipes["best"]["data"]["train"].endswith("sts-train.tsv")
    assert (out / "best" / "final" / "bidir.json").is_file()

    # Only the best row was evaluated and tabled, with every column and its training time.
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["best: MNTP + contrastive + CoSENT on STS-B train"]
    assert set(results[next(iter(results))]) >= {"sts_spearman", "cranfield_ndcg@10", "stdlib_ndcg@10"}
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 3 and "best/stages/mntp + best/stages/contrastive + best" in table[2]
    # A second run finds every stage done and trains nothing.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert again.returncode == 0 and "bidir_train" not in again.stdout
