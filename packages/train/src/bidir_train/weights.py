"""Weights in and out of the sharded model: rank 0 reads a checkpoint and every rank receives its shards; at the end
the shards are gathered to rank 0, which writes final/. No rank but 0 ever holds the whole model. With a `lora`
section the model gets PEFT adapters (bidir_train.lora) and final/ holds the merged weights. objective: reranker
trains a CrossEncoder instead (load_reranker): the same decoder with a score head beside it, which trains fully
(with LoRA too, as PEFT's modules_to_save) and is sharded as the root's own parameter.

(Training checkpoints, sharded as they are, are bidir_train.checkpoints.)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from bidir_core.checkpoint import EncoderConfig, write_checkpoint
from bidir_core.cross_encoder import CrossEncoder
from bidir_core.devices import resolve_precision
from bidir_core.encoder import BiEncoder
from bidir_core.model import LlamaBidirectionalModel, load_model_weights
from bidir_core.reranker_config import RERANKER
from bidir_core.sources import load_lm_head, open_source, resolve_source
from bidir_train import lora
from bidir_train.config import TrainConfig
from bidir_train.distributed import agreed, from_rank0
from bidir_train.parallelize import parallelize
from bidir_train.run_inputs import with_source_pooling


def load_model(cfg: TrainConfig, device: torch.device) -> BiEncoder | CrossEncoder:
    """What the recipe trains: a CrossEncoder for objective: reranker, else a BiEncoder."""
    return load_reranker(cfg, device) if cfg.objective == "reranker" else load_encoder(cfg, device)


def trained_module(model: BiEncoder | CrossEncoder) -> nn.Module:
    """The module whose parameters the optimizer steps, the gradients are clipped over and checkpoints hold: a
    BiEncoder's decoder; a CrossEncoder whole (its decoder under `model.`, its head `score.weight`)."""
    return model if isinstance(model, CrossEncoder) else model.model


def _computes_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the model computes in bf16: the trainer has decided model.precision=auto by now (check_run_folder);
    a direct caller may not have, so it is resolved here the same way."""
    return resolve_precision(cfg.model.precision, device) == "bf16"


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
    bf16 = _computes_bf16(cfg, device)
    parallelize(model, cfg.parallel, device=device, bf16=bf16, dropout=dropout)
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
    cpu_bf16 = bf16 and device.type == "cpu"
    encoder = BiEncoder(model, tokenizer, encoder_config, autocast_dtype=torch.bfloat16 if cpu_bf16 else None)
    return encoder.train()


def load_reranker(cfg: TrainConfig, device: torch.device) -> CrossEncoder:
    """The cross-encoder to train, as load_encoder builds an encoder: a meta-device decoder and head, sharded; rank
    0 reads the weights (CrossEncoder.from_pretrained) and broadcasts them into every rank's shards. A reranker
    source keeps its head; any other (a plain decoder, an embedder, the embedded default) gets a fresh one drawn
    from schedule.seed. Settings are the source's reranker settings with rerank.template, model.pooling and
    rerank.max_length where given."""
    rank = dist.get_rank()
    agreed(resolve_source, cfg.model.path, run=rank == 0)  # rank 0 imports an embedded default first, once
    source = agreed(open_source, cfg.model.path)
    settings = agreed(
        source.reranker_config,
        template=cfg.rerank.template,
        pooling=cfg.model.pooling,
        max_length=cfg.rerank.max_length,
    )
    tokenizer = agreed(source.tokenizer)
    loaded = agreed(
        CrossEncoder.from_pretrained,
        source,
        config=settings,
        dtype=torch.float32,
        device="cpu",
        new_head=source.kind != RERANKER,
        seed=cfg.schedule.seed,
        run=rank == 0,
    )
    state_dict = loaded.state_dict() if rank == 0 else {}  # model.* (the decoder) and score.weight
    del loaded
    config = source.config
    with torch.device("meta"):
        model = LlamaBidirectionalModel(config)
        score = nn.Linear(config.hidden_size, 1, bias=False)
    if cfg.lora is not None:  # adapters in the decoder, its base frozen; the head stays trainable
        agreed(lora.add_adapters, model, cfg.lora)
        if rank == 0:
            head = state_dict["score.weight"]
            decoder = lora.initial_state_dict(
                config, _part(state_dict, "model."), cfg.lora, cfg.schedule.seed
            )
            state_dict = {f"model.{k}": v for k, v in decoder.items()} | {"score.weight": head}
    bf16 = _computes_bf16(cfg, device)
    cpu_bf16 = bf16 and device.type == "cpu"
    reranker = CrossEncoder(
        model, tokenizer, settings, score, autocast_dtype=torch.bfloat16 if cpu_bf16 else None, source=source
    )
    dropout = cfg.lora is not None and cfg.lora.dropout > 0
    parallelize(model, cfg.parallel, device=device, bf16=bf16, dropout=dropout, root=reranker)
    reranker.to_empty(device=device)  # also recomputes the decoder's (non-persistent) RoPE frequencies
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(reranker, state_dict, options=options)
    del state_dict
    return reranker.train()


def _part(state_dict: dict, prefix: str) -> dict:
    """The entries under prefix, with it taken off their keys."""
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}


def load_untied_head(cfg: TrainConfig, encoder: BiEncoder, device: torch.device) -> torch.Tensor | None:
    """An untied checkpoint's LM head (V, H), read by rank 0 and broadcast: frozen, whole on every rank (it is not
    sharded or trained, and not part of the saved embedder). None for a tied checkpoint, or when the checkpoint
    has none."""
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


def save_final(encoder: BiEncoder | CrossEncoder, target: Path, cfg: TrainConfig) -> None:
    """Gather the full state dict to rank 0 and write the bidir checkpoint there (atomically): an embedder, or for
    a CrossEncoder a reranker checkpoint (CrossEncoder.save_pretrained). With LoRA, the adapters are merged into the
    base weights first, and the adapter alone goes to output_dir/adapter/ (PEFT's format; a reranker's head is in
    final/ only)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    module = trained_module(encoder)
    state_dict = get_model_state_dict(module, options=options)  # collective: every rank calls it
    agreed(_write_final, encoder, state_dict, target, cfg, run=dist.get_rank() == 0)


def _write_final(encoder: BiEncoder | CrossEncoder, state_dict: dict, target: Path, cfg: TrainConfig) -> None:
    config = encoder.model.config
    reranker = isinstance(encoder, CrossEncoder)
    decoder = _part(state_dict, "model.") if reranker else state_dict
    if cfg.lora is None:
        model = LlamaBidirectionalModel.from_state_dict(config, decoder)
    else:
        adapted = lora.with_adapters(config, decoder, cfg.lora)
        adapted.peft_config["default"].base_model_name_or_path = cfg.model.path
        lora.write_adapter(adapted, target.parent / lora.ADAPTER)
        model = lora.merge(adapted)
    # A full disk is one line naming target from the writer, which removes its temporary folder; an earlier final/
    # stays as it was.
    if not reranker:
        write_checkpoint(target, model, encoder.tokenizer, encoder.config, overwrite=True)
        return
    score = nn.Linear(config.hidden_size, 1, bias=False)
    score.weight = nn.Parameter(state_dict["score.weight"].float())
    CrossEncoder(model, encoder.tokenizer, encoder.config, score).save_pretrained(target, overwrite=True)
