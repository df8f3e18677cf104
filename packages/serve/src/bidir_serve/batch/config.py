"""BatchEmbedConfig: the settings of one batch-embed job, each checked where it is declared (the backend's in
BackendSpec)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bidir_core.embeddings_artifact import EMBEDDING_DTYPES
from bidir_core.errors import BidirError
from bidir_serve.backends import BackendSpec
from bidir_serve.prompts import PROMPTS

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class BatchEmbedConfig:
    """One batch-embed job."""

    model: str
    """A checkpoint folder, a .gguf file, the embedded default 'smollm2-135m', an ONNX export or an engine folder
    (this and backend, device, precision, compile: the job's BackendSpec, where each is described and checked)."""
    input: str
    """A JSONL, Parquet or plain-text file, or a glob of them (files are taken in sorted order)."""
    output: str
    """The embeddings folder to write (created; resumed when it holds an unfinished job with the same fingerprint)."""
    id_field: str = "id"
    """JSONL key / Parquet column of the row id (plain text: the line number)."""
    text_field: str = "text"
    """JSONL key / Parquet column of the text."""
    prompt: str = "passage"
    """Which of the model's prefixes to prepend: passage, query or none."""
    dim: int | None = None
    """Matryoshka dimension to truncate to (re-normalized); None keeps the model's full width."""
    dtype: str = "float32"
    """Storage dtype of the embeddings: float32 or float16."""
    shard_size: int = 100_000
    """Rows per Parquet shard (the unit of resumption and of work split between ranks)."""
    backend: str = "auto"
    device: str | None = None
    precision: str | None = None
    compile: bool = False
    max_batch_tokens: int = 16384
    """Upper bound on rows x longest row (padded tokens) of a batch."""
    max_batch_size: int = 128
    """Upper bound on rows per batch."""
    window: int = 4096
    """Rows sorted by length together; memory is bounded by the window, whatever the corpus or shard size."""
    prefetch: int = 2
    """Windows tokenized and batched ahead of the model (the bounded queue between the tokenizer thread and the
    model); one is enough to overlap tokenizing with the model's work."""
    engine: str = "local"
    """local (this process, or torchrun ranks) or ray (a Ray cluster: bidir_serve.batch.ray_engine)."""
    ray_address: str | None = None
    """engine ray: the cluster to join (ray.init(address=...)); None starts a local one, or joins RAY_ADDRESS."""
    check_unique_ids: bool = False
    """Before any work, read the whole input once: every row validated and every id checked unique across all
    shards, in bounded memory (ids spilled to disk by hash). Without it ids are checked unique within each shard."""
    overwrite: bool = False
    """Replace existing embeddings in `output` (of other inputs or settings, or complete ones) instead of refusing."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    backend_spec: BackendSpec = field(init=False, repr=False, compare=False)
    """model, backend, device, precision and compile as one BackendSpec (which checks them), for load_backend."""

    def __post_init__(self):
        if self.prompt not in PROMPTS:
            raise BidirError(f"prompt must be one of {', '.join(PROMPTS)}, got {self.prompt!r}")
        if self.dtype not in EMBEDDING_DTYPES:
            raise BidirError(f"dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {self.dtype!r}")
        if self.engine not in ENGINES:
            raise BidirError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        spec = BackendSpec(self.model, self.backend, self.device, self.precision, self.compile)
        object.__setattr__(self, "backend_spec", spec)  # frozen: set once, here
        for name in ("shard_size", "max_batch_tokens", "max_batch_size", "window", "prefetch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BidirError(f"{name} must be a positive integer, got {value!r}")
