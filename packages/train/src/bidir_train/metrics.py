"""What a run reports: a metrics.jsonl row every logging.every_steps (through the RunFolder), the progress bar on
rank 0, throughput, a warning counting truncated texts, and the closing summary line."""

from __future__ import annotations

import time
import warnings

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from bidir_train.checkpoints import CHECKPOINTS
from bidir_train.config import TrainConfig
from bidir_train.distributed import sum_over_ranks
from bidir_train.run_folder import RunFolder


class TrainingLog:
    """Built when the first step is about to run (its clock starts then); every rank calls each method."""

    def __init__(
        self, cfg: TrainConfig, folder: RunFolder, device: torch.device, *, step: int, stop: int, total: int
    ):
        self.cfg, self.folder, self.device, self.stop = cfg, folder, device, stop
        self.rank0 = dist.get_rank() == 0
        self.progress = tqdm(
            total=total,
            initial=step,
            desc=f"train {cfg.name}",
            unit="step",
            disable=not self.rank0 or not cfg.logging.progress,
        )
        self.tokens_total, self.truncated, self.t_start = 0, 0, time.perf_counter()
        self.last = {"loss": float("nan")}

    def step(self, row: dict, *, tokens: int, truncated: int, t0: float) -> None:
        """Optimizer step row["step"] is done (it started at t0; tokens and truncated texts: this rank's)."""
        tokens = sum_over_ranks(tokens, self.device)
        dt = time.perf_counter() - t0
        self.tokens_total += tokens
        self.truncated += truncated
        self.last = {**row, "tokens_per_s": tokens / dt}
        step, loss, lr = row["step"], row["loss"], row["lr"]
        if step % self.cfg.logging.every_steps == 0 or step == self.stop:
            self.folder.write(self.last)
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:,.0f}")
        self.progress.update(1)

    def close(self) -> float:
        """The loop is over: close the bar, count the truncated texts of all ranks; returns the seconds it ran."""
        self.progress.close()
        truncated = int(sum_over_ranks(self.truncated, self.device))
        if truncated and self.rank0:
            limit = {"reranker": "rerank.max_length (query and passage pairs)"}.get(
                self.cfg.objective, "model.query_max_length / passage_max_length"
            )
            warnings.warn(
                f"{truncated} training texts were longer than {limit} and were truncated",
                stacklevel=3,
            )
        return time.perf_counter() - self.t_start

    def summary(self, steps: int, dev: dict, final: str | None, elapsed: float) -> dict:
        """The summary train() returns; rank 0 prints it as one line."""
        summary = {
            "steps": steps,
            "loss": self.last["loss"],
            "tokens_per_s": self.tokens_total / elapsed if elapsed else 0.0,
            "dev": dev,
            "output_dir": str(self.cfg.output_dir),
            "final": final,
        }
        if self.rank0:
            print(_summary_line(self.cfg, summary, elapsed), flush=True)
        return summary


def _summary_line(cfg: TrainConfig, summary: dict, elapsed: float) -> str:
    dev = summary["dev"]
    line = f"{cfg.name}: {summary['steps']} steps in {elapsed:.0f}s, final loss {summary['loss']:.4f}"
    if dev:
        first, last = dev[min(dev)], dev[max(dev)]
        key = "dev/ndcg@10"
        if key in last:
            line += f", {key} {first[key]:.4f} (step {min(dev)}) -> {last[key]:.4f} (step {max(dev)})"
    where = (
        summary["final"]
        or f"{cfg.output_dir / CHECKPOINTS} (stopped at step {summary['steps']}; rerun to resume)"
    )
    return f"{line}; model: {where}"
