"""`train(cfg)`: fine-tuning of a bidir model under torchrun (or as one plain process). The recipe's `objective`
names what a step computes (bidir_train.contrastive: InfoNCE on query / passage rows; bidir_train.mntp: LLM2Vec's
masked next-token prediction; bidir_train.cosent: CoSENT on graded pairs; bidir_train.reranker: a cross-encoder
on the contrastive rows); the loop, sharding, checkpoints and resume are the same for all four. What is trained
is a BiEncoder, or a CrossEncoder for the reranker (bidir_train.weights.load_model: the one branch on it).

One process per device (bidir_train.distributed). The model is built on the meta device, sharded with FSDP2
(bidir_train.parallelize), and rank 0's weights are broadcast into the shards (bidir_train.weights), so no rank but
0 ever holds the whole model. Each optimizer step takes `global_batch_size` rows: every rank runs its micro-batches
through the objective and gradients accumulate until the step.

Outputs under output_dir (bidir_train.run_folder): recipe.json, inputs.json, metrics.jsonl (bidir_train.metrics,
bidir_train.validation), checkpoints/step-NNNNNNNN/ (bidir_train.checkpoints: DCP, sharded: model, optimizer,
scheduler, data position, RNG), final/ (a bidir checkpoint that BiEncoder.from_pretrained loads, or for the
reranker CrossEncoder.from_pretrained).
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from bidir_core.errors import BidirError
from bidir_train.checkpoints import Checkpointer
from bidir_train.config import ScheduleConfig, TrainConfig
from bidir_train.contrastive import Contrastive
from bidir_train.cosent import Cosent
from bidir_train.distributed import agreed, from_rank0, init_distributed, mean_over_ranks
from bidir_train.metrics import TrainingLog
from bidir_train.mntp import Mntp
from bidir_train.objective import Objective, rank_micro_batches
from bidir_train.optim import clip_grad_norm, make_optimizer, make_scheduler
from bidir_train.reranker import Reranker
from bidir_train.run_folder import FINAL, RunFolder, check_run_folder
from bidir_train.validation import Validator
from bidir_train.weights import load_model, save_final, trained_module

OBJECTIVES: dict[str, type[Objective]] = {
    "contrastive": Contrastive,
    "mntp": Mntp,
    "cosent": Cosent,
    "reranker": Reranker,
}
"""A recipe's `objective` -> the class that runs it (a new objective: a module with such a class, and its name here)."""


def train(cfg: TrainConfig) -> dict:
    """Run the training `cfg` describes; returns a summary (steps, final loss, dev metrics, paths)."""
    created, device = init_distributed()
    try:
        return _train(cfg, device)
    finally:
        if created:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, device: torch.device) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    sched = cfg.schedule
    torch.manual_seed(sched.seed + rank)
    accum = _accumulation_steps(sched, world)
    # Before any work: an unwritable folder or a changed recipe found after the model loaded costs minutes. The
    # recipe from here on has the source's pooling and its precision filled in (rank 0 read them).
    cfg, inputs = from_rank0(agreed(check_run_folder, cfg, device, run=rank == 0))

    # The data and the dev set are read before the model: bad input stops the run before the slow part.
    objective_class = OBJECTIVES[cfg.objective]
    sampler = agreed(objective_class.sampler, cfg)
    total = sched.max_steps or sched.epochs * sampler.steps_per_epoch
    stop = min(total, sched.stop_at_step or total)
    if rank == 0:
        sampler.warn(full_epochs=total >= sampler.steps_per_epoch)
    validator = agreed(Validator, cfg)

    encoder = load_model(cfg, device)  # a BiEncoder, or a CrossEncoder (objective: reranker)
    trained = trained_module(encoder)  # what the optimizer steps and checkpoints hold
    objective = objective_class(cfg, encoder, device)
    optimizer = make_optimizer(cfg.optim, trained)
    scheduler = make_scheduler(optimizer, sched, total)
    checkpointer = Checkpointer(cfg, trained, optimizer, scheduler)
    state = checkpointer.load()
    resumed = state["step"] if state is not None else None
    step = resumed or 0
    folder = RunFolder(
        cfg, resumed, inputs
    )  # nothing is written into output_dir before its first row or checkpoint
    agreed(folder.read_metrics, run=rank == 0)

    if step == 0 and validator.due(0, total):
        validator.run(encoder, 0, folder)
    log = TrainingLog(cfg, folder, device, step=step, stop=stop, total=total)
    while step < stop:
        epoch, in_epoch = divmod(step, sampler.steps_per_epoch)
        t0 = time.perf_counter()
        micro = rank_micro_batches(sampler.rows(epoch, in_epoch), sched.micro_batch_size, rank, world)
        step_loss, tokens, truncated = _accumulate(objective, trained, micro, accum)
        grad_norm = clip_grad_norm(trained, cfg.optim.max_grad_norm)
        loss = mean_over_ranks(step_loss / accum, device)  # both already read to the host: no extra sync
        _check_finite(step + 1, loss, grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        log.step(row, tokens=tokens, truncated=truncated, t0=t0)
        if validator.due(step, total):
            validator.run(encoder, step, folder)
        if checkpointer.due(step, stop=stop, total=total):
            folder.open()
            checkpointer.save({"step": step, "epoch": epoch, "step_in_epoch": in_epoch + 1})
    elapsed = log.close()

    final = None
    if step == total:
        folder.open()
        save_final(encoder, cfg.output_dir / FINAL, cfg)
        final = str(cfg.output_dir / FINAL)
    return log.summary(step, validator.scores, final, elapsed)


def _accumulation_steps(sched: ScheduleConfig, world: int) -> int:
    """Micro-batches per rank per optimizer step."""
    if sched.global_batch_size % (sched.micro_batch_size * world):
        raise BidirError(
            f"schedule.global_batch_size={sched.global_batch_size} is not a multiple of "
            f"schedule.micro_batch_size={sched.micro_batch_size} x {world} ranks"
        )
    return sched.global_batch_size // (sched.micro_batch_size * world)


def _accumulate(objective: Objective, model, micro_batches: list[list], accum: int) -> tuple[float, int, int]:
    """Forward + backward of this rank's micro-batches of one step, gradients accumulating in .grad; returns the sum
    of their losses, their real tokens and their truncated texts."""
    loss, tokens, truncated = 0.0, 0, 0
    for k, rows in enumerate(micro_batches):
        batch = objective.collate(rows)
        # Reduce-scatter gradients only after the last micro-batch's backward.
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP-sharded (not a lone CPU process)
            model.set_requires_gradient_sync(k == accum - 1)
        loss += objective.forward_backward(batch, scale=1 / accum)
        tokens += batch.tokens
        truncated += batch.truncated
    return loss, tokens, truncated


def _check_finite(step: int, loss: float, grad_norm: float) -> None:
    """A non-finite loss or gradient norm (the same on every rank: all stop) never reaches the weights."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise BidirError(
            f"step {step}: the loss is {loss} and the gradient norm {grad_norm}; stopped before the "
            "weights took them (checkpoints so far are intact); try a lower optim.lr or model.precision=fp32"
        )
