"""Training configuration: one frozen dataclass per recipe section, each checking its own values.

A recipe (bidir_train.recipe) is a YAML mapping with one sub-mapping per section (model, data, loss, mntp, rerank,
lora, optim, schedule, parallel, checkpoint, eval, logging) and `objective`. Field types are what the recipe
loader checks a value against (a `Literal` lists the choices); each section's `__post_init__` checks the ranges, naming the key as
a recipe spells it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bidir_core.errors import BidirError


def _at_least(config, section: str, minimum: int, *names: str) -> None:
    """Each field in names is None or >= minimum."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise BidirError(f"{section}.{name} must be >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """What to fine-tune and how it embeds."""

    path: str = "smollm2-135m"
    """A Llama / bidir checkpoint folder, a .gguf file, or "smollm2-135m" (the embedded default)."""
    pooling: str | None = None
    """Pooling of token states: avg, cls, last or weighted_avg (stored in the final checkpoint). None: the
    source's own (a bidir checkpoint's bidir.json: last for a causal embedder), avg for any other source; the
    trainer fills it in before recipe.json is written."""
    query_prefix: str = "query: "
    """Prepended to every query, in training and in the saved checkpoint."""
    passage_prefix: str = "passage: "
    """Prepended to every passage (positive and negative)."""
    query_max_length: int = 64
    """Queries are cut to this many tokens (counted and reported)."""
    passage_max_length: int = 256
    """Passages are cut to this many tokens (counted and reported); also the saved checkpoint's max_length."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype: bf16 (FSDP mixed precision on GPU, autocast on CPU; fp32 master weights), fp32, or auto: bf16
    where the device computes it in hardware (a GPU from Ampere on, a CPU with AMX or AVX512-BF16), fp32 elsewhere
    (bidir_core.devices). The trainer writes the one it chose into recipe.json."""

    def __post_init__(self):
        _at_least(self, "model", 1, "query_max_length", "passage_max_length")


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

    def __post_init__(self):
        _at_least(self, "data", 1, "max_examples")
        _at_least(self, "data", 0, "num_negatives")


@dataclass(frozen=True)
class LossConfig:
    """InfoNCE over positive, hard negatives, in-batch (and optionally all ranks') passages; CoSENT's scale."""

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
    cosent_scale: float = 20.0
    """objective: cosent: the scale on cosine differences in CoSENT (20, i.e. a temperature of 0.05, as in the
    paper and in sentence-transformers' CoSENTLoss)."""
    distill: Literal["none", "kl", "margin_mse"] = "none"
    """objective: contrastive: add a distillation term over each query's own group (positive + hard negatives)
    from the rows' teacher scores (pos_score / neg_scores; rows without them are refused): kl (the student's
    cosines / temperature against the teacher's scores / distill_temperature) or margin_mse (cosine margins
    against teacher margins). none: InfoNCE alone."""
    distill_weight: float = 1.0
    """The distillation term's weight: loss = InfoNCE + distill_weight * term."""
    distill_temperature: float = 1.0
    """T of the kl distillation loss (contrastive's loss.distill and objective: reranker's rerank.loss: kl): both
    sides' softmax at T, times T^2."""

    def __post_init__(self):
        _at_least(self, "loss", 1, "cache_chunk_size")
        if self.temperature <= 0:
            raise BidirError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.cosent_scale <= 0:
            raise BidirError(f"loss.cosent_scale must be > 0, got {self.cosent_scale}")
        if self.distill_weight <= 0 or self.distill_temperature <= 0:
            raise BidirError(
                "loss.distill_weight and loss.distill_temperature must be > 0, got "
                f"{self.distill_weight} and {self.distill_temperature}"
            )
        if any(d < 1 for d in self.matryoshka_dims):
            raise BidirError(f"loss.matryoshka_dims must be positive, got {list(self.matryoshka_dims)}")


@dataclass(frozen=True)
class MntpConfig:
    """Masked next-token prediction (objective: mntp), LLM2Vec's bidirectional adaptation stage."""

    mask_probability: float = 0.2
    """Fraction of each text's tokens that are chosen and predicted (LLM2Vec: 0.2 for Llama)."""
    mask_token: str | None = None
    """The token that replaces a chosen one (None: the tokenizer's mask token, or "_" when it has none)."""
    max_length: int = 128
    """Texts are cut to this many tokens (counted and reported)."""

    def __post_init__(self):
        _at_least(self, "mntp", 1, "max_length")
        if not 0 < self.mask_probability < 1:
            raise BidirError(f"mntp.mask_probability must be in (0, 1), got {self.mask_probability}")


@dataclass(frozen=True)
class RerankConfig:
    """objective: reranker (bidir_train.reranker): a cross-encoder scores each query's group of 1 positive and
    data.num_negatives hard negatives (no in-batch negatives)."""

    loss: Literal["group_ce", "bce", "kl", "margin_mse"] = "group_ce"
    """group_ce: softmax cross-entropy over the group, the positive the target (NeMo AutoModel's); bce: per pair,
    positive 1, negatives 0; kl and margin_mse: distillation from the rows' teacher scores (pos_score /
    neg_scores), kl at loss.distill_temperature (see bidir_train.rerank_loss)."""
    max_length: int | None = None
    """Each formatted (query, passage) pair is cut to this many tokens (None: the model's own, e.g. a reranker
    checkpoint's); saved in final/."""
    template: str | None = None
    """How a pair becomes one text, with {query} and {passage} (None: the model's own, else bidir_core's
    default); saved in final/."""

    def __post_init__(self):
        _at_least(self, "rerank", 1, "max_length")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every Linear module of a decoder layer (attention and MLP), the usual LoRA targets for embedders."""


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters through PEFT (bidir_train.lora): the base weights stay frozen, only the adapters train. The
    section is off unless given (`lora: {rank: 16}`, or `lora.rank=16` on the command line); `lora: null` turns
    it off again."""

    rank: int = 16
    """Rank r of each adapter (PEFT's `r`): B (out, r) @ A (r, in) is added to a frozen Linear's weight."""
    alpha: float = 32.0
    """Scaling numerator: the adapter's update is scaled by alpha / rank (PEFT's `lora_alpha`)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (PEFT's `lora_dropout`). Above 0 it draws from each rank's own RNG, so the
    losses depend on the number of ranks (resume stays exact)."""
    target_modules: tuple[str, ...] = LORA_TARGETS
    """Names of the Linear modules that get an adapter (the last part of the module name, as PEFT matches them)."""

    def __post_init__(self):
        _at_least(self, "lora", 1, "rank")
        if self.alpha <= 0:
            raise BidirError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise BidirError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise BidirError("lora.target_modules must name at least one Linear module")


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

    def __post_init__(self):
        if self.lr <= 0:
            raise BidirError(f"optim.lr must be > 0, got {self.lr}")
        if self.eps <= 0 or self.weight_decay < 0:
            raise BidirError("optim.eps must be > 0 and optim.weight_decay >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise BidirError(f"optim.betas must be in [0, 1), got {list(self.betas)}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise BidirError(f"optim.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")


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
    packing: Literal["auto", "packed", "padded"] = "auto"
    """packed: each forward's texts as one token stream of at most max_tokens_per_forward real tokens, no padding
    (and at most forward_chunk_size / loss.cache_chunk_size texts when those are set); padded: padded to the
    longest (of each chunk); the same result. auto: the faster by benchmarks/bench_train_step.py: packed on CPU;
    padded on CUDA, until benchmarks/gpu_suite.sh's packed rows decide it."""
    max_tokens_per_forward: int = 4096
    """Real tokens per packed forward."""
    max_steps: int | None = None
    """Optimizer steps to train (None: `epochs` epochs)."""
    epochs: int = 1
    """Epochs to train when max_steps is None."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many steps."""
    decay: Literal["linear", "cosine", "constant"] = "linear"
    """After warmup: linear (to 0), cosine (to 0) or constant."""
    seed: int = 0
    """Seed for the data order, negative sampling and torch."""
    stop_at_step: int | None = None
    """Stop after this step as if interrupted (time-boxed jobs); the schedule still spans max_steps; rerun resumes."""

    def __post_init__(self):
        positive = ("global_batch_size", "micro_batch_size", "forward_chunk_size", "max_steps", "epochs")
        _at_least(self, "schedule", 1, *positive, "stop_at_step", "max_tokens_per_forward")
        _at_least(self, "schedule", 0, "warmup_steps")
        if self.global_batch_size % self.micro_batch_size:
            raise BidirError(
                f"schedule.global_batch_size={self.global_batch_size} is not a multiple of "
                f"schedule.micro_batch_size={self.micro_batch_size}"
            )


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
    recipe.json up to bidir_train.run_folder.RESUMABLE, and the model and data files inputs.json); false: start
    over, deleting the folder's earlier checkpoints and final/."""

    def __post_init__(self):
        _at_least(self, "checkpoint", 1, "keep")
        _at_least(self, "checkpoint", 0, "every_steps")


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

    def __post_init__(self):
        _at_least(self, "eval", 1, "batch_size")
        _at_least(self, "eval", 0, "every_steps")


@dataclass(frozen=True)
class LoggingConfig:
    """Where outputs go and what is shown."""

    output_dir: str | None = None
    """Run folder (None: runs/<recipe name>/): metrics.jsonl, checkpoints/, final/."""
    every_steps: int = 1
    """Write a metrics.jsonl row every N steps."""
    progress: bool = True
    """Show a progress bar (rank 0)."""

    def __post_init__(self):
        _at_least(self, "logging", 1, "every_steps")


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run."""

    name: str = "default"
    """Recipe name (the file's stem): names the default output folder."""
    objective: Literal["contrastive", "mntp", "cosent", "reranker"] = "contrastive"
    """contrastive (InfoNCE on query / passage pairs), mntp (masked next-token prediction on raw text), cosent
    (CoSENT on graded pairs: an STS-style score, sentence1, sentence2 TSV) or reranker (a cross-encoder on the
    contrastive rows: final/ is a reranker)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The contrastive loss."""
    mntp: MntpConfig = field(default_factory=MntpConfig)
    """The MNTP objective."""
    rerank: RerankConfig = field(default_factory=RerankConfig)
    """The reranker objective."""
    lora: LoraConfig | None = None
    """LoRA adapters instead of full fine-tuning (None: every weight trains); final/ holds the merged weights."""
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
        return Path(self.logging.output_dir or Path("runs") / self.name).expanduser()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
