"""The only FSDP code of bidir: shard a LlamaBidirectionalModel with FSDP2 and apply the memory / speed options.

Order matters (as in torchtitan): activation checkpointing and torch.compile wrap each decoder layer first, then
`fully_shard` shards each layer (one all-gather per layer in forward and backward, overlapped with compute) and
finally the root (embeddings and the final norm). The model code itself stays single-device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from bidir_train.config import ParallelConfig


def parallelize(
    model: nn.Module,
    cfg: ParallelConfig,
    *,
    device: torch.device,
    bf16: bool,
    dropout: bool = False,
    root: nn.Module | None = None,
) -> nn.Module:
    """Shard `model` (a LlamaBidirectionalModel, possibly on the meta device) in place over the default process
    group and return it (a single CPU process is left unsharded). bf16 on CUDA: parameters are all-gathered in
    bf16, gradients reduced in fp32, and the sharded master weights stay fp32. (On CPU bf16 comes from autocast in the training step instead.) `dropout`:
    the model draws random numbers in forward (LoRA dropout), which activation checkpointing must replay.
    Frozen parameters (LoRA's base weights) are sharded like the others; FSDP2 reduces gradients only for the
    trainable ones. `root`: a module holding `model` and parameters of its own (a CrossEncoder's score head),
    sharded last as the root, in fp32 (no mixed precision: the head reads fp32 pooled states)."""
    layers = model.layers
    for i, layer in enumerate(layers):
        if cfg.activation_checkpointing:
            # Without dropout there is nothing random to replay, and saving the RNG state costs time.
            layer = checkpoint_wrapper(layer, preserve_rng_state=dropout)
        if cfg.compile:
            layer.compile(dynamic=True)  # in place: parameter names (and so checkpoints) are unchanged
        layers[i] = layer
    if device.type == "cpu" and dist.get_world_size() == 1:
        # One CPU process: nothing to shard, and FSDP's per-layer gather / reduce copies cost ~30% of a step.
        return model
    mp = None
    if bf16 and device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again at once in backward: keep them gathered.
        reshard = cfg.reshard_after_forward and i < len(layers) - 1
        fully_shard(layer, reshard_after_forward=reshard, **kwargs)
    # The root (embeddings, final norm) stays gathered from forward to backward, as FSDP2 advises: backward needs it
    # at once, and MNTP reads the embeddings again after the forward as its (tied) LM head.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    if root is not None:
        fully_shard(root, reshard_after_forward=False)
    return model
