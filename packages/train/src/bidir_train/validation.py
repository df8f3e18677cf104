"""The dev evaluation of a run (eval.dev): retrieval scores of the model being trained, before training (step 0),
every eval.every_steps and at the end; each is a metrics.jsonl row and a line on rank 0's console."""

from __future__ import annotations

import time

import torch.distributed as dist
from tqdm.auto import tqdm

from bidir_core.datasets import load_retrieval
from bidir_core.encoder import BiEncoder
from bidir_core.evaluation import evaluate_retrieval
from bidir_train.config import TrainConfig
from bidir_train.run_folder import RunFolder


class Validator:
    """Loads the dev set when built (before the model, so a bad one costs nothing); `scores` maps step -> metrics."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.eval
        self.dev = load_retrieval(cfg.eval.dev, cfg.eval.split) if cfg.eval.dev else None
        self.scores: dict[int, dict[str, float]] = {}

    def due(self, step: int, total: int) -> bool:
        """Whether the model after optimizer step `step` of `total` is scored (step 0: the untrained model)."""
        if self.dev is None:
            return False
        if step == 0:
            return self.cfg.before_training
        return step == total or bool(self.cfg.every_steps and step % self.cfg.every_steps == 0)

    def run(self, encoder: BiEncoder, step: int, folder: RunFolder) -> None:
        """Score the model (collective: every rank calls it) and write the row."""
        t0 = time.perf_counter()
        scores = evaluate_retrieval(encoder, self.dev, batch_size=self.cfg.batch_size)
        out = {f"dev/{k}": float(v) for k, v in scores.items()}
        if dist.get_rank() == 0:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in out.items())
            tqdm.write(
                f"dev ({len(self.dev.queries)} queries, {len(self.dev.corpus)} docs, "
                f"{time.perf_counter() - t0:.0f}s): {shown}"
            )
        self.scores[step] = out
        folder.write({"step": step, **out})
