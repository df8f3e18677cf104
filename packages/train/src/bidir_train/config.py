"""Training configuration: frozen dataclasses, and the one loader that fills them from a YAML recipe.

A recipe is a YAML mapping with one sub-mapping per section (model, data, loss, mntp, optim, schedule, parallel,
checkpoint, eval, logging), and `objective` (contrastive or mntp). `load_recipe(path_or_name, overrides)` reads it, applies dotted command-line
overrides (`optim.lr=1e-5`), and builds a `TrainConfig`. Unknown keys are errors that name the nearest valid key;
every value is checked against its field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bidir_core.errors import BidirError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # installed: package data


@dataclass(frozen=True)
class ModelConfig:
    """What to fine-tune and how it embeds."""

    path: str = "smollm2-135m"
    """A Llama / bidir checkpoint folder, a .gguf file, or "smollm2-135m" (the embedded default)."""
    pooling: str = "avg"
    """Pooling of token states: avg, cls, last or weighted_avg (stored in the final checkpoint)."""
    query_prefix: str = "query: "
    """Prepended to every query, in training and in the saved checkpoint."""
    passage_prefix: str = "passage: "
    """Prepended to every passage (positive and negative)."""
    query_max_length: int = 64
    """Queries are cut to this many tokens (counted and reported)."""
    passage_max_length: int = 256
    """Passages are cut to this many tokens (counted and reported); also the saved checkpoint's max_length."""
    precision: str = "bf16"
    """Compute dtype: bf16 (FSDP mixed precision on GPU, autocast on CPU; fp32 master weights) or fp32."""


@dataclass(frozen=True)
class DataConfig:
    """Training examples."""

    train: str = "stdlib-docstrings"
    """JSONL / TSV file, or "stdlib-docstrings" (the embedded default dataset, train split). For MNTP also a .txt
    file (one text per line); every distinct text of the rows is trained on (stdlib-docstrings: its passages)."""
    text_fields: tuple[str, ...] = ()
    """MNTP on a JSONL file: the fields to read text from (a string or a list of strings each); empty: the query,
    pos_doc and neg_doc of training rows."""
    num_negatives: int = 0
    """Hard negatives per query, sampled from the row's neg_doc each epoch (seeded)."""
    max_examples: int | None = None
    """Use only the first N examples of the file (None: all)."""


@dataclass(frozen=True)
class LossConfig:
    """InfoNCE over positive, hard negatives, in-batch (and optionally all ranks') passages."""

    temperature: float = 0.02
    """Softmax temperature on cosine similarities."""
    in_batch_negatives: bool = True
    """Score every query against the other queries' passages too, not only its own."""
    gather_across_ranks: bool = True
    """With in-batch negatives: also score against the passages of every other rank (autograd-aware gather)."""
    mask_false_negatives: bool = True
    """Ignore passages whose document id (or text) equals one of the query's positives."""
    matryoshka_dims: tuple[int, ...] = ()
    """Average the loss over embeddings truncated to these dims (empty: full dimension only)."""
    cache_chunk_size: int | None = None
    """GradCache: forward at most this many texts at once, so the batch size is bounded by memory no more."""


@dataclass(frozen=True)
class MntpConfig:
    """Masked next-token prediction (objective: mntp), LLM2Vec's bidirectional adaptation stage."""

    mask_probability: float = 0.2
    """Fraction of each text's tokens that are chosen and predicted (LLM2Vec: 0.2 for Llama)."""
    mask_token: str | None = None
    """The token that replaces a chosen one (None: the tokenizer's mask token, or "_" when it has none)."""
    max_length: int = 128
    """Texts are cut to this many tokens (counted and reported)."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (fused) with gradient clipping."""

    lr: float = 2e-5
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam beta1, beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""


@dataclass(frozen=True)
class ScheduleConfig:
    """Batching, length of training and the learning-rate schedule."""

    global_batch_size: int = 128
    """Queries per optimizer step, summed over ranks and accumulation steps."""
    micro_batch_size: int = 8
    """Queries per rank per forward; the in-batch negative group is micro_batch_size x world size."""
    forward_chunk_size: int | None = None
    """Embed a micro-batch's texts in length-sorted chunks of this many, each padded only to its own longest
    text: the same result, far fewer padded tokens when lengths vary (None: one forward per side)."""
    max_steps: int | None = None
    """Optimizer steps to train (None: `epochs` epochs)."""
    epochs: int = 1
    """Epochs to train when max_steps is None."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many steps."""
    decay: str = "linear"
    """After warmup: linear (to 0), cosine (to 0) or constant."""
    seed: int = 0
    """Seed for the data order, negative sampling and torch."""
    stop_at_step: int | None = None
    """Stop after this step as if interrupted (time-boxed jobs); the schedule still spans max_steps; rerun resumes."""


@dataclass(frozen=True)
class ParallelConfig:
    """FSDP2 and memory / speed switches (bidir_train.parallelize)."""

    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (less memory, ~1/3 more compute)."""
    compile: bool = False
    """torch.compile each decoder layer."""
    reshard_after_forward: bool = True
    """FSDP2: free each decoder layer's gathered parameters after forward (ZeRO-3) instead of keeping them until
    backward (the root's embeddings and final norm are always kept)."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Sharded (DCP) training checkpoints under output_dir/checkpoints/."""

    every_steps: int = 0
    """Save every N steps (0: never; the final model is written regardless)."""
    keep: int = 2
    """Keep this many most recent checkpoints."""
    resume: bool = True
    """Resume from the newest checkpoint in output_dir that loads, when one exists (the recipe must match
    recipe.json up to bidir_train.run_folder.RESUMABLE); false: start over, deleting the folder's earlier
    checkpoints and final/."""


@dataclass(frozen=True)
class EvalConfig:
    """Retrieval evaluation on a dev set with bidir_core.evaluation."""

    dev: str | None = "stdlib-docstrings"
    """BEIR folder or "stdlib-docstrings" (dev split); None: no evaluation."""
    split: str = "test"
    """qrels split of a BEIR folder (stdlib-docstrings has one: dev, which "test" also names)."""
    every_steps: int = 0
    """Evaluate every N steps (0: only before training and at the end)."""
    before_training: bool = True
    """Evaluate the untrained model first (step 0), for a before/after comparison."""
    batch_size: int = 32
    """Texts per forward when encoding the dev set."""


@dataclass(frozen=True)
class LoggingConfig:
    """Where outputs go and what is shown."""

    output_dir: str | None = None
    """Run folder (None: runs/<recipe name>/): metrics.jsonl, checkpoints/, final/."""
    every_steps: int = 1
    """Write a metrics.jsonl row every N steps."""
    progress: bool = True
    """Show a progress bar (rank 0)."""


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run."""

    name: str = "default"
    """Recipe name (the file's stem): names the default output folder."""
    objective: str = "contrastive"
    """contrastive (InfoNCE on query / passage pairs) or mntp (masked next-token prediction on raw text)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The contrastive loss."""
    mntp: MntpConfig = field(default_factory=MntpConfig)
    """The MNTP objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Batch sizes, steps, learning-rate schedule, seed."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """FSDP2 settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Training checkpoints."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """In-loop evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Outputs and progress."""

    @property
    def output_dir(self) -> Path:
        return Path(self.logging.output_dir or Path("runs") / self.name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    ("", "objective"): ("contrastive", "mntp"),
    ("model", "precision"): ("bf16", "fp32"),
    ("schedule", "decay"): ("linear", "cosine", "constant"),
}
_POSITIVE = {
    ("model", "query_max_length"),
    ("model", "passage_max_length"),
    ("schedule", "global_batch_size"),
    ("schedule", "micro_batch_size"),
    ("schedule", "forward_chunk_size"),
    ("schedule", "max_steps"),
    ("schedule", "epochs"),
    ("schedule", "stop_at_step"),
    ("data", "max_examples"),
    ("loss", "cache_chunk_size"),
    ("mntp", "max_length"),
    ("eval", "batch_size"),
    ("logging", "every_steps"),
    ("checkpoint", "keep"),
}


def recipe_path(path_or_name: str | Path) -> Path:
    """A recipe file path, or the name of a packaged recipe ("default", "tiny", ...)."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    for folder in (RECIPES_DIR, Path(__file__).resolve().parents[2] / "recipes"):  # installed, then the repo
        candidate = folder / f"{path_or_name}.yaml"
        if "/" not in str(path_or_name) and candidate.is_file():
            return candidate
    known = ", ".join(available_recipes()) or "none found"
    raise BidirError(f"{path_or_name}: no such recipe file or packaged recipe (packaged: {known})")


def available_recipes() -> list[str]:
    for folder in (RECIPES_DIR, Path(__file__).resolve().parents[2] / "recipes"):
        if folder.is_dir():
            return sorted(p.stem for p in folder.glob("*.yaml"))
    return []


def load_recipe(path_or_name: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML recipe (a path or a packaged recipe's name), apply `section.key=value` overrides, and build
    the TrainConfig. Raises BidirError naming the file and key on an unknown key or a value of the wrong type."""
    path = recipe_path(path_or_name)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise BidirError(f"{path}: not a readable YAML file ({' '.join(str(e).split())})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BidirError(f"{path}: a recipe is a mapping of sections, got a {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    for override in overrides:
        _apply_override(raw, override)
    return _build(TrainConfig, raw, str(path))


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise BidirError(f"override {override!r}: expected section.key=value, e.g. optim.lr=1e-5")
    value = _Override(text)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise BidirError(f"override {override!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


class _Override(str):
    """A command-line value, typed once its field is known: YAML for numbers, lists, booleans and null; the text
    as typed (trailing spaces included) for a string field."""

    def typed(self, kind):
        try:
            parsed = yaml.safe_load(self) if self.strip() else None
        except yaml.YAMLError:
            parsed = str(self)  # a plain string that is not valid YAML on its own
        quoted = self.strip()[:1] in ("'", '"')
        if parsed is not None and not quoted and _accepts_str(kind):
            return str(self)
        return parsed


def _accepts_str(kind) -> bool:
    """str, or a union with str (str | None); not tuple[str, ...], whose override is a YAML list."""
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    return kind is str or (union and str in typing.get_args(kind))


def _build(cls, raw: dict, where: str, prefix: str = ""):
    if not isinstance(raw, dict):
        raise BidirError(f"{where}: {prefix.rstrip('.') or 'recipe'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f" (valid: {', '.join(names)})"
            raise BidirError(f"{where}: unknown key {prefix}{key}{hint}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        kind, value = hints[name], raw[name]
        if isinstance(value, _Override):
            value = value.typed(kind)
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value or {}, where, f"{prefix}{name}.")
        else:
            values[name] = _check_value(kind, value, where, f"{prefix}{name}")
    config = cls(**values)
    _check_ranges(config, where, prefix)
    return config


def _check_value(kind, value, where: str, key: str):
    """value as the field type `kind` (int, float, bool, str, X | None, tuple[X, ...], tuple[X, Y]), or raise."""
    ok, out = _coerce(kind, value)
    if not ok:
        raise BidirError(f"{where}: {key} must be {_type_name(kind)}, got {value!r}")
    if any(
        isinstance(v, float) and not math.isfinite(v) for v in (out if isinstance(out, tuple) else (out,))
    ):
        raise BidirError(f"{where}: {key} must be a finite number, got {value!r}")
    return out


def _coerce(kind, value):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, out = _coerce(arg, value)
            if ok:
                return True, out
        return False, None
    if kind is type(None):
        return value is None, None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, None
        items = args if not (len(args) == 2 and args[1] is Ellipsis) else (args[0],) * len(value)
        if len(items) != len(value):
            return False, None
        out = [_coerce(a, v) for a, v in zip(items, value, strict=True)]
        return all(ok for ok, _ in out), tuple(v for _, v in out)
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if kind is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config field type {kind}")


def _type_name(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if kind is type(None):
        return "null"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list [{', '.join(_type_name(a) for a in args)}]"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]


def _check_ranges(config, where: str, prefix: str) -> None:
    section = prefix.rstrip(".")
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        choices = _CHOICES.get((section, f.name))
        if choices and value not in choices:
            raise BidirError(f"{where}: {prefix}{f.name} must be one of {', '.join(choices)}, got {value!r}")
        if (section, f.name) in _POSITIVE and value is not None and value < 1:
            raise BidirError(f"{where}: {prefix}{f.name} must be >= 1, got {value!r}")
    if section == "loss":
        if config.temperature <= 0:
            raise BidirError(f"{where}: loss.temperature must be > 0, got {config.temperature}")
        if any(d < 1 for d in config.matryoshka_dims):
            raise BidirError(
                f"{where}: loss.matryoshka_dims must be positive, got {list(config.matryoshka_dims)}"
            )
    if section == "optim":
        if config.lr <= 0:
            raise BidirError(f"{where}: optim.lr must be > 0, got {config.lr}")
        if config.eps <= 0 or config.weight_decay < 0:
            raise BidirError(f"{where}: optim.eps must be > 0 and optim.weight_decay >= 0")
        if not all(0 <= b < 1 for b in config.betas):
            raise BidirError(f"{where}: optim.betas must be in [0, 1), got {list(config.betas)}")
        if config.max_grad_norm is not None and config.max_grad_norm <= 0:
            raise BidirError(f"{where}: optim.max_grad_norm must be > 0 or null, got {config.max_grad_norm}")
    if section == "mntp" and not 0 < config.mask_probability < 1:
        raise BidirError(f"{where}: mntp.mask_probability must be in (0, 1), got {config.mask_probability}")
    if section in ("data", "schedule", "checkpoint", "eval"):
        for name in ("num_negatives", "warmup_steps", "every_steps"):
            if getattr(config, name, 0) < 0:
                raise BidirError(f"{where}: {prefix}{name} must be >= 0, got {getattr(config, name)}")
    if section == "schedule" and config.global_batch_size % config.micro_batch_size:
        raise BidirError(
            f"{where}: schedule.global_batch_size={config.global_batch_size} is not a multiple of "
            f"schedule.micro_batch_size={config.micro_batch_size}"
        )
