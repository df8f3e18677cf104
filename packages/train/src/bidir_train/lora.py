"""LoRA through PEFT (recipe section `lora`): adapters on the decoder's Linear modules, the base weights frozen.

The model being trained stays a LlamaBidirectionalModel: PEFT's `inject_adapter_in_model` replaces each targeted
Linear in place by a LoRA layer (`q_proj.base_layer.weight` frozen, `q_proj.lora_A.default.weight` (r, in) and
`q_proj.lora_B.default.weight` (out, r) trainable), so sharding, the objectives and the dev evaluation see the same
module tree as in full fine-tuning. Adapters are built on the meta device with the rest of the model; their initial
values (PEFT's: A Kaiming-uniform, B zero, so training starts from the base model) are drawn once, on rank 0, from
`schedule.seed`, and broadcast with the base weights: the same on any number of ranks.

At the end, `merge` folds the adapters into the base weights (W + alpha / r * B @ A, PEFT's `merge_and_unload`):
final/ is a plain bidir checkpoint. `write_adapter` also writes the adapter alone in PEFT's own format
(adapter_config.json + adapter_model.safetensors), loadable with `peft.PeftModel.from_pretrained` on the base model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import peft
import torch
from torch import nn

from bidir_core.errors import BidirError
from bidir_core.folders import publish_folder, start_writing, unknown_files
from bidir_core.model import LlamaBidirectionalModel
from bidir_train.config import LoraConfig

ADAPTER = "adapter"
"""The adapter's folder in output_dir (beside final/)."""
ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md"})
"""What PEFT's save_pretrained writes (README.md: its model card); an adapter folder holding more is not replaced."""


def peft_config(cfg: LoraConfig, base: str | None = None) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",  # the decoder's Linears have none; nothing but the adapters trains
        base_model_name_or_path=base,
    )


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last name parts of the model's Linear modules (q_proj, ..., down_proj), sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def check_target_modules(model: nn.Module, cfg: LoraConfig) -> None:
    """Every lora.target_modules entry names a Linear module of the model, as PEFT matches a list entry (the
    module's full name, or its last dotted parts); else one line naming the model's Linear modules."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in cfg.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise BidirError(
            f"lora.target_modules: {', '.join(missing)} names no Linear module of the model; "
            f"its Linear modules are {', '.join(linear_names(model))}"
        )


def add_adapters(model: LlamaBidirectionalModel, cfg: LoraConfig) -> LlamaBidirectionalModel:
    """Put adapters (on the meta device, to be loaded) into `model` in place, freezing everything else."""
    check_target_modules(model, cfg)
    peft.inject_adapter_in_model(peft_config(cfg), model, low_cpu_mem_usage=True)
    return model


def initial_state_dict(config, base: dict[str, torch.Tensor], cfg: LoraConfig, seed: int) -> dict:
    """The full state dict of the model with adapters (PEFT's names) at their initial values: the base tensors
    themselves (no copy) and new adapter weights drawn from `seed` (the global RNG is left as it was)."""
    model = LlamaBidirectionalModel.from_state_dict(config, base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(peft_config(cfg), model)
    return model.state_dict()


def with_adapters(config, state_dict: dict[str, torch.Tensor], cfg: LoraConfig) -> peft.PeftModel:
    """A PeftModel over a LlamaBidirectionalModel holding `state_dict` (the names a trained model has; the tensors
    adopted, not copied): the adapter's own view of the trained model."""
    with torch.device("meta"):
        base = LlamaBidirectionalModel(config)
    model = peft.get_peft_model(base, peft_config(cfg), low_cpu_mem_usage=True)
    model.base_model.model.load_state_dict(state_dict, strict=True, assign=True)
    model.base_model.model.rotary_emb.reset_parameters()  # non-persistent: not in a state dict
    return model.eval()


def merge(model: peft.PeftModel) -> LlamaBidirectionalModel:
    """The base model with every adapter folded into its Linear weights (plain Linears again). In place: the base
    tensors given to with_adapters become the merged weights (no second copy of the model)."""
    merged = model.merge_and_unload()
    if hasattr(merged, "peft_config"):
        del merged.peft_config  # PEFT's bookkeeping attribute: the merged model has no adapters
    return merged


def check_adapter_replaceable(target: Path) -> None:
    """A run replaces output_dir/adapter/ only when it holds nothing but what write_adapter writes."""
    if target.exists() and not target.is_dir():
        raise BidirError(f"{target}: exists and is not a folder; refusing to replace it")
    if target.is_dir() and (unknown := unknown_files(target, ADAPTER_FILES)):
        raise BidirError(
            f"{target}: holds {unknown[0]}, which a PEFT adapter folder does not; refusing to replace it"
        )


def write_adapter(model: peft.PeftModel, target: Path) -> None:
    """Write the adapter alone in PEFT's format (safetensors) to target, atomically; an existing target is replaced
    only when it holds nothing but what this writes."""
    check_adapter_replaceable(target)
    tmp = start_writing(target)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        publish_folder(tmp, target)
    except OSError as e:
        raise BidirError(f"{target}: not written: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was published
