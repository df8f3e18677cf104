"""Weights in and out of the sharded model: rank 0 reads a checkpoint and every rank receives its shards; at the end
the shards are gathered to rank 0, which writes final/. No rank but 0 ever holds the whole model. With a `lora`
section the model gets PEFT adapters (bidir_train.lora) and final/ holds the merged weights.

(Training checkpoints, sharded as they are, are bidir_train.checkpoints.)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from bidir_core.checkpoint import EncoderConfig, write_checkpoint
from bidir_core.encoder import BiEncoder
from bidir_core.model import LlamaBidirectionalModel, load_model_weights
from bidir_core.sources import load_lm_head, open_source, resolve_source
from bidir_train import lora
from bidir_train.config import TrainConfig
from bidir_train.distributed import agreed, from_rank0
from bidir_train.parallelize import parallelize
from bidir_train.run_inputs import with_source_pooling


def load_encoder(cfg: TrainConfig, device: torch.device) -> BiEncoder:
    """The encoder to train: a meta-device model, sharded; rank 0 reads the weights and broadcasts them into every
    rank's shards. bf16 on CPU is autocast in its forward (on GPU, FSDP's MixedPrecisionPolicy casts)."""
    rank = dist.get_rank()
    if cfg.model.pooling is None:  # a recipe that did not come through check_run_folder
        cfg = from_rank0(agreed(with_source_pooling, cfg, run=rank == 0))
    agreed(resolve_source, cfg.model.path, run=rank == 0)  # rank 0 imports an embedded default first, once
    source = agreed(open_source, cfg.model.path)
    tokenizer = agreed(source.tokenizer)
    loaded = agreed(load_model_weights, source, torch.float32, run=rank == 0)
    state_dict = loaded if rank == 0 else {}
    config = source.config
    with torch.device("meta"):
        model = LlamaBidirectionalModel(config)
    if cfg.lora is not None:  # adapters in, base frozen; rank 0 draws their initial values
        agreed(lora.add_adapters, model, cfg.lora)
        if rank == 0:
            state_dict = lora.initial_state_dict(config, state_dict, cfg.lora, cfg.schedule.seed)
    dropout = cfg.lora is not None and cfg.lora.dropout > 0
    parallelize(model, cfg.parallel, device=device, bf16=cfg.model.precision == "bf16", dropout=dropout)
    model.to_empty(device=device)  # also recomputes the (non-persistent) RoPE frequencies
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state_dict, options=options)
    del state_dict
    encoder_config = agreed(
        EncoderConfig,
        pooling=cfg.model.pooling,
        normalize=True,
        query_prefix=cfg.model.query_prefix,
        passage_prefix=cfg.model.passage_prefix,
        matryoshka_dims=cfg.loss.matryoshka_dims,
        max_length=cfg.model.passage_max_length,
        # the source's attention mode: a causal checkpoint (its bidir.json) trains causally
        attention="causal" if model.causal else "bidirectional",
    )
    cpu_bf16 = cfg.model.precision == "bf16" and device.type == "cpu"
    encoder = BiEncoder(model, tokenizer, encoder_config, autocast_dtype=torch.bfloat16 if cpu_bf16 else None)
    return encoder.train()


def load_untied_head(cfg: TrainConfig, encoder: BiEncoder, device: torch.device) -> torch.Tensor | None:
    """An untied checkpoint's LM head (V, H), read by rank 0 and broadcast: frozen, whole on every rank (it is not
    sharded or trained, and not part of the saved embedder). None for a tied checkpoint, or when the checkpoint has none."""
    config = encoder.model.config
    if getattr(config, "tie_word_embeddings", False):
        return None
    source = resolve_source(cfg.model.path)
    head = agreed(load_lm_head, source, torch.float32, run=dist.get_rank() == 0)
    if not from_rank0(head is not None):
        return None
    if dist.get_rank() != 0:
        head = torch.empty(config.vocab_size, config.hidden_size)
    head = head.to(device)
    dist.broadcast(head, src=0)
    return head


def save_final(encoder: BiEncoder, target: Path, cfg: TrainConfig) -> None:
    """Gather the full state dict to rank 0 and write the bidir checkpoint there (atomically). With LoRA, the
    adapters are merged into the base weights first, and the adapter alone goes to output_dir/adapter/ (PEFT's
    format)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state_dict = get_model_state_dict(encoder.model, options=options)  # collective: every rank calls it
    agreed(_write_final, encoder, state_dict, target, cfg, run=dist.get_rank() == 0)


def _write_final(encoder: BiEncoder, state_dict: dict, target: Path, cfg: TrainConfig) -> None:
    config = encoder.model.config
    if cfg.lora is None:
        model = LlamaBidirectionalModel.from_state_dict(config, state_dict)
    else:
        adapted = lora.with_adapters(config, state_dict, cfg.lora)
        adapted.peft_config["default"].base_model_name_or_path = cfg.model.path
        lora.write_adapter(adapted, target.parent / lora.ADAPTER)
        model = lora.merge(adapted)
    # A full disk is one line naming target from write_checkpoint, which removes its temporary folder; an earlier
    # final/ stays as it was.
    write_checkpoint(target, model, encoder.tokenizer, encoder.config, overwrite=True)
