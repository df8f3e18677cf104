"""The optimizer side of a step: fused AdamW, the learning-rate schedule (warmup, then decay) and gradient clipping."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.distributed.tensor import DTensor

from bidir_train.config import OptimConfig, ScheduleConfig


def make_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (with LoRA: the adapters; the frozen base holds no state)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=True,  # one pass over all parameters; on CPU too: 135M params take 0.3 s instead of 2.2 s a step
    )


def make_scheduler(optimizer, cfg: ScheduleConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr_factor of the peak lr for a run of `total` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=cfg.warmup_steps, total=total, decay=cfg.decay)
    )


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


def clip_grad_norm(model: torch.nn.Module, max_norm: float | None) -> float:
    """Clip the global gradient norm to max_norm (None: only measure it); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    if isinstance(norm, DTensor):  # sharded gradients: the norm of the whole
        norm = norm.full_tensor()
    return norm.item()
