"""`train(cfg)`: fine-tuning of a bidir model under torchrun (or as one plain process): contrastive, or the MNTP
adaptation stage (bidir_train.mntp) with the same loop, sharding, checkpoints and resume.

One process per device. The model is built on the meta device, sharded with FSDP2 (bidir_train.parallelize), and
rank 0's weights are broadcast into the shards, so no rank but 0 ever holds the whole model. Each optimizer step
takes `global_batch_size` queries: every rank embeds its micro-batches (queries in one forward, passages in one
more), the InfoNCE loss scores them against the whole micro-batch group, and gradients accumulate until the step.
An MNTP step takes `global_batch_size` texts instead and predicts their masked tokens.

Outputs under output_dir (bidir_train.run_folder): recipe.json, metrics.jsonl, checkpoints/step-NNNNNNNN/
(bidir_train.checkpoints: DCP, sharded: model, optimizer, scheduler, data position, RNG), final/ (a bidir
checkpoint that BiEncoder.from_pretrained loads).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
import warnings
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from bidir_core.checkpoint import EncoderConfig, write_checkpoint
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError, one_line
from bidir_core.model import LlamaBidirectionalModel
from bidir_core.pooling import pool
from bidir_core.sources import load_lm_head, load_model_weights, resolve_source
from bidir_core.tokenization import load_tokenizer
from bidir_train.checkpoints import CHECKPOINTS, load_latest, save_checkpoint
from bidir_train.config import TrainConfig
from bidir_train.data import Collator, EpochSampler, rank_micro_batches, warn_about
from bidir_train.loss import info_nce
from bidir_train.mntp import MaskingCollator, TextSampler, lm_head_weight, mntp_forward_backward
from bidir_train.parallelize import parallelize
from bidir_train.run_folder import FINAL, RunFolder, check_run_folder
from bidir_train.step import forward_backward

# ----------------------------------------------------------------------------------------------- distributed


def init_distributed() -> tuple[bool, torch.device]:
    """Join torchrun's process group (env:// from RANK, WORLD_SIZE, MASTER_ADDR...), or make a one-process group
    when started plainly. NCCL on GPU, gloo on CPU. Returns (whether this call created the group, device)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return False, device
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, device_id=device if cuda else None, timeout=timedelta(minutes=30))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True, device


def _agreed(fn, *args, run: bool = True, **kwargs):
    """fn(...) on the ranks where `run` (None elsewhere); a BidirError on any rank is raised on every rank, so a
    bad input seen by one rank stops all of them instead of leaving the others waiting in a collective."""
    out, error = None, None
    if run:
        try:
            out = fn(*args, **kwargs)
        except BidirError as e:
            error = e
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else one_line(error))
    if error is not None:
        raise error
    bad = next((m for m in messages if m is not None), None)
    if bad is not None:
        raise BidirError(bad)
    return out


def _mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


# -------------------------------------------------------------------------------------------------- the model


class TrainingEncoder(BiEncoder):
    """The BiEncoder being trained: its decoder stack runs under `autocast` (bf16 on CPU; pooling and the loss stay
    fp32)."""

    autocast = staticmethod(contextlib.nullcontext)

    def forward(self, input_ids, attention_mask, dim=None, normalize=None):
        with self.autocast():
            hidden = self.model(input_ids, attention_mask)  # (B, T, H)
        emb = pool(hidden.float(), attention_mask, self.config.pooling)  # (B, H) fp32
        if dim is not None:
            emb = emb[:, : self._check_dim(dim)]
        return (
            F.normalize(emb, dim=-1) if (self.config.normalize if normalize is None else normalize) else emb
        )


def load_encoder(cfg: TrainConfig, device: torch.device) -> TrainingEncoder:
    """Meta-device model, sharded; rank 0 reads the weights and broadcasts them into every rank's shards."""
    rank = dist.get_rank()
    _agreed(resolve_source, cfg.model.path, run=rank == 0)  # rank 0 imports an embedded default first, once
    source = _agreed(resolve_source, cfg.model.path)
    tokenizer = _agreed(load_tokenizer, source)
    loaded = _agreed(load_model_weights, source, torch.float32, run=rank == 0)
    config, state_dict = loaded if rank == 0 else (None, {})
    box = [config]
    dist.broadcast_object_list(box, src=0)
    config = box[0]
    with torch.device("meta"):
        model = LlamaBidirectionalModel(config)
    parallelize(model, cfg.parallel, device=device, bf16=cfg.model.precision == "bf16")
    model.to_empty(device=device)  # also recomputes the (non-persistent) RoPE frequencies
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state_dict, options=options)
    del state_dict
    encoder_config = _agreed(
        EncoderConfig,
        pooling=cfg.model.pooling,
        normalize=True,
        query_prefix=cfg.model.query_prefix,
        passage_prefix=cfg.model.passage_prefix,
        matryoshka_dims=cfg.loss.matryoshka_dims,
        max_length=cfg.model.passage_max_length,
    )
    encoder = TrainingEncoder(model, tokenizer, encoder_config)
    if cfg.model.precision == "bf16" and device.type == "cpu":  # on GPU, FSDP's MixedPrecisionPolicy casts
        encoder.autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    return encoder.train()


def _save_final(encoder: BiEncoder, target: Path) -> None:
    """Gather the full state dict to rank 0 and write the bidir checkpoint there (atomically)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state_dict = get_model_state_dict(encoder.model, options=options)  # collective: every rank calls it
    _agreed(_write_final, encoder, state_dict, target, run=dist.get_rank() == 0)


def _write_final(encoder: BiEncoder, state_dict: dict, target: Path) -> None:
    model = LlamaBidirectionalModel.from_state_dict(encoder.model.config, state_dict)
    # A full disk is one line naming target from write_checkpoint, which removes its temporary folder; an earlier
    # final/ stays as it was.
    write_checkpoint(target, model, encoder.tokenizer, encoder.config, overwrite=True)


# ---------------------------------------------------------------------------------------------- schedule


def lr_factor(step: int, *, warmup: int, total: int, decay: str) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then linear / cosine decay
    to 0 at `total`, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


# ------------------------------------------------------------------------------------------------ evaluation


def _evaluate(encoder, dev, cfg: TrainConfig) -> dict[str, float]:
    from bidir_core.evaluation import evaluate_retrieval

    t0 = time.perf_counter()
    scores = evaluate_retrieval(encoder, dev, batch_size=cfg.eval.batch_size)
    out = {f"dev/{k}": float(v) for k, v in scores.items()}
    if dist.get_rank() == 0:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in out.items())
        tqdm.write(
            f"dev ({len(dev.queries)} queries, {len(dev.corpus)} docs, {time.perf_counter() - t0:.0f}s): {shown}"
        )
    return out


# ------------------------------------------------------------------------------------------------- train


def train(cfg: TrainConfig) -> dict:
    """Run the training `cfg` describes; returns a summary (steps, final loss, dev metrics, paths)."""
    created, device = init_distributed()
    try:
        return _train(cfg, device)
    finally:
        if created:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, device: torch.device) -> dict:
    from bidir_core.datasets import load_retrieval

    rank, world = dist.get_rank(), dist.get_world_size()
    sched = cfg.schedule
    torch.manual_seed(sched.seed + rank)
    if sched.global_batch_size % (sched.micro_batch_size * world):
        raise BidirError(
            f"schedule.global_batch_size={sched.global_batch_size} is not a multiple of "
            f"schedule.micro_batch_size={sched.micro_batch_size} x {world} ranks"
        )
    accum = sched.global_batch_size // (sched.micro_batch_size * world)
    # Before any work: an unwritable folder or a changed recipe found after the model loaded costs minutes.
    _agreed(check_run_folder, cfg, run=rank == 0)

    sampler = _agreed(_sampler, cfg)
    total = sched.max_steps or sched.epochs * sampler.steps_per_epoch
    if rank == 0:
        warn_about(sampler, full_epochs=total >= sampler.steps_per_epoch)
    dev = _agreed(load_retrieval, cfg.eval.dev, cfg.eval.split) if cfg.eval.dev else None

    encoder = load_encoder(cfg, device)
    collate, step_fn = _objective(cfg, encoder, device)
    optimizer = torch.optim.AdamW(
        encoder.model.parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        fused=True,  # one pass over all parameters; on CPU too: 135M params take 0.3 s instead of 2.2 s a step
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=sched.warmup_steps, total=total, decay=sched.decay)
    )

    output_dir = cfg.output_dir
    step = 0
    resumed = None
    state = load_latest(output_dir, encoder.model, optimizer, scheduler) if cfg.checkpoint.resume else None
    if state is not None:
        step = resumed = state["step"]
    folder = RunFolder(cfg, resumed)  # nothing is written into output_dir before its first row or checkpoint
    _agreed(folder.read_metrics, run=rank == 0)

    dev_scores: dict[int, dict] = {}
    if dev is not None and cfg.eval.before_training and step == 0:
        dev_scores[0] = _evaluate(encoder, dev, cfg)
        folder.write({"step": 0, **dev_scores[0]})

    stop = min(total, sched.stop_at_step or total)
    progress = tqdm(
        total=total,
        initial=step,
        desc=f"train {cfg.name}",
        unit="step",
        disable=rank or not cfg.logging.progress,
    )
    truncated, tokens_total, t_start = 0, 0, time.perf_counter()
    last = {"loss": float("nan")}
    while step < stop:
        epoch, in_epoch = divmod(step, sampler.steps_per_epoch)
        t0 = time.perf_counter()
        micro = rank_micro_batches(sampler.rows(epoch, in_epoch), sched.micro_batch_size, rank, world)
        step_loss, step_tokens = 0.0, 0
        for k, rows in enumerate(micro):
            batch = collate(rows)
            # Reduce-scatter gradients only after the last micro-batch's backward.
            if hasattr(encoder.model, "set_requires_gradient_sync"):  # FSDP-sharded (not a lone CPU process)
                encoder.model.set_requires_gradient_sync(k == accum - 1)
            step_loss += step_fn(batch, scale=1 / accum)
            step_tokens += batch.tokens
            truncated += batch.truncated
        grad_norm = _clip(encoder.model, cfg.optim.max_grad_norm)
        loss = _mean_over_ranks(step_loss / accum, device)  # both already read to the host: no extra sync
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # the same on every rank: all stop
            raise BidirError(
                f"step {step + 1}: the loss is {loss} and the gradient norm {grad_norm}; stopped before the "
                "weights took them (checkpoints so far are intact); try a lower optim.lr or model.precision=fp32"
            )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        tokens = _mean_over_ranks(step_tokens, device) * world
        dt = time.perf_counter() - t0
        tokens_total += tokens
        last = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / dt,
        }
        if step % cfg.logging.every_steps == 0 or step == stop:
            folder.write(last)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:,.0f}")
        progress.update(1)

        at_end = step == total
        if dev is not None and (at_end or (cfg.eval.every_steps and step % cfg.eval.every_steps == 0)):
            dev_scores[step] = _evaluate(encoder, dev, cfg)
            folder.write({"step": step, **dev_scores[step]})
        periodic = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
        if not at_end and (periodic or step == stop):  # a stop_at_step stop always leaves a checkpoint
            state = {"step": step, "epoch": epoch, "step_in_epoch": in_epoch + 1}
            folder.open()
            save_checkpoint(output_dir, encoder.model, optimizer, scheduler, state, cfg.checkpoint.keep)
    progress.close()

    truncated = int(_mean_over_ranks(truncated, device) * world)
    if truncated and rank == 0:
        warnings.warn(
            f"{truncated} training texts were longer than model.query_max_length / passage_max_length and were "
            "truncated",
            stacklevel=2,
        )
    elapsed = time.perf_counter() - t_start
    summary = {
        "steps": step,
        "loss": last["loss"],
        "tokens_per_s": tokens_total / elapsed if elapsed else 0.0,
        "dev": dev_scores,
        "output_dir": str(output_dir),
        "final": None,
    }
    if step == total:
        folder.open()
        _save_final(encoder, output_dir / FINAL)
        summary["final"] = str(output_dir / FINAL)
    if rank == 0:
        _print_summary(cfg, summary, elapsed)
    return summary


def _sampler(cfg: TrainConfig):
    """The data of the run: training examples (contrastive) or distinct texts (mntp), in seeded epochs."""
    from bidir_core.datasets import read_texts, read_training_examples

    sched, where, world = cfg.schedule, cfg.data.train, dist.get_world_size()
    if cfg.objective != "mntp" and cfg.data.text_fields:
        raise BidirError("data.text_fields is for objective: mntp (contrastive rows have fixed fields)")
    if cfg.objective == "mntp":
        rows = read_texts(where, cfg.data.text_fields)
    else:
        rows = read_training_examples(where)
    rows = list(itertools.islice(rows, cfg.data.max_examples))
    if not rows:
        raise BidirError(f"{where}: no training examples")
    if world > len(rows):
        raise BidirError(f"{where}: {len(rows)} examples for {world} ranks: more ranks than rows")
    if cfg.objective == "mntp":
        return TextSampler(rows, global_batch_size=sched.global_batch_size, seed=sched.seed, where=where)
    return EpochSampler(
        rows,
        global_batch_size=sched.global_batch_size,
        num_negatives=cfg.data.num_negatives,
        seed=sched.seed,
        where=where,
    )


def _objective(cfg: TrainConfig, encoder: TrainingEncoder, device: torch.device):
    """(collate: rows -> micro-batch, step_fn(micro-batch, scale) -> loss after its backward) of the objective."""
    chunk = cfg.schedule.forward_chunk_size
    if cfg.objective == "mntp":
        collate = MaskingCollator(
            encoder.tokenizer,
            max_length=cfg.mntp.max_length,
            probability=cfg.mntp.mask_probability,
            mask_token=cfg.mntp.mask_token,
        )
        head = _untied_head(cfg, encoder, device)
        lm_head_weight(
            encoder.model, head
        )  # an untied checkpoint without its head is refused before any step
        step_fn = partial(
            mntp_forward_backward,
            encoder.model,
            device=device,
            autocast=encoder.autocast,
            head=head,
            chunk=chunk,
        )
        return collate, step_fn

    collate = Collator(
        encoder.tokenizer,
        query_prefix=cfg.model.query_prefix,
        passage_prefix=cfg.model.passage_prefix,
        query_max=cfg.model.query_max_length,
        passage_max=cfg.model.passage_max_length,
    )
    loss_fn = partial(
        _batch_loss,
        num_negatives=cfg.data.num_negatives,
        temperature=cfg.loss.temperature,
        in_batch=cfg.loss.in_batch_negatives,
        gather=cfg.loss.gather_across_ranks,
        mask=cfg.loss.mask_false_negatives,
        dims=cfg.loss.matryoshka_dims,
        device=device,
    )

    def embed(ids, mask):
        return encoder(ids.to(device), mask.to(device), normalize=False)

    step_fn = partial(
        forward_backward, embed, loss_fn, cache_chunk=cfg.loss.cache_chunk_size, forward_chunk=chunk
    )
    return collate, step_fn


def _untied_head(cfg: TrainConfig, encoder: TrainingEncoder, device: torch.device) -> torch.Tensor | None:
    """An untied checkpoint's LM head (V, H), read by rank 0 and broadcast: frozen, whole on every rank (it is not
    sharded or trained, and not part of the saved embedder). None for a tied checkpoint."""
    config = encoder.model.config
    if getattr(config, "tie_word_embeddings", False):
        return None
    source = resolve_source(cfg.model.path)
    head = _agreed(load_lm_head, source, torch.float32, run=dist.get_rank() == 0)
    found = [head is not None]
    dist.broadcast_object_list(found, src=0)
    if not found[0]:
        return None
    if dist.get_rank() != 0:
        head = torch.empty(config.vocab_size, config.hidden_size)
    head = head.to(device)
    dist.broadcast(head, src=0)
    return head


def _batch_loss(q, p, batch, *, num_negatives, temperature, in_batch, gather, mask, dims, device):
    return info_nce(
        q,
        p,
        num_negatives=num_negatives,
        temperature=temperature,
        in_batch_negatives=in_batch,
        gather=gather,
        passage_keys=batch.passage_keys.to(device) if mask else None,
        positive_keys=batch.positive_keys.to(device) if mask else None,
        dims=dims,
    )


def _clip(model, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.item()


def _print_summary(cfg: TrainConfig, summary: dict, elapsed: float) -> None:
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
    print(f"{line}; model: {where}", flush=True)
