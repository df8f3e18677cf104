"""The deployment artifacts: the ONNX export and the TensorRT engine folders.

bidir-export writes them, bidir-serve reads them; this module is the one definition of their manifest.json, so the
two packages never import each other. (The checkpoint folder is checkpoint.py; the embeddings folder is
embeddings_artifact.py.)

    <onnx export>/     model.onnx [+ model.onnx.data], tokenizer files, manifest.json (OnnxManifest)
    <engine>/          model.engine, tokenizer files, manifest.json (EngineManifest: the ONNX manifest + TensorRT)

Either holds an embedder (kind "embedder": EmbeddingGraph, `embeddings` (B, H) out, its EncoderConfig) or a reranker
(kind "reranker": ScoringGraph, `scores` (B,) out, its RerankerConfig, whose template every consumer applies). On disk
the model's kind is "model_kind" (the top-level "kind" says onnx or tensorrt); a manifest without it is an embedder.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from bidir_core.checkpoint import EncoderConfig
from bidir_core.errors import BidirError
from bidir_core.folders import TOKENIZER_FILES, interrupted_publish_hint
from bidir_core.jsonfile import parse_fields, read_versioned_json, write_json_atomic
from bidir_core.reranker_config import RERANKER, RerankerConfig
from bidir_core.sources import EMBEDDER, MODEL_KINDS, resolve_source

ARTIFACT_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Verification:
    """The result of running an exported artifact against PyTorch on a fixed set of shapes.

    Figures are against PyTorch in float64 (bidir-export's rule; older manifests compared with fp32 and have no
    error / reference_error / bound). A figure is None where the artifact's output was not finite."""

    passed: bool
    """Whether the rule held: error <= bound, every output finite."""
    max_abs_diff: float | None
    """Largest |artifact - reference| over all embedding entries (or scores) and shapes."""
    min_cosine: float | None
    """Smallest per-row cosine similarity between artifact and reference embeddings (None for scores)."""
    tolerance: str
    """The rule that was applied, in words."""
    shapes: tuple[tuple[int, int], ...] = ()
    """The (batch, seq) shapes that were checked."""
    runtime: str = ""
    """What ran the artifact, e.g. "onnxruntime 1.22.0 CPUExecutionProvider"."""
    error: float | None = None
    """The artifact's distance to float64 PyTorch: embeddings, the largest per-row ||x - x64|| / ||x64||; scores,
    max |s - s64| / max |s64| over every verified pair (bidir_export.verification)."""
    reference_error: float | None = None
    """The same for PyTorch computing in the artifact's precision: the scale the bound is set from."""
    bound: float | None = None
    """The largest error the rule allowed."""


@dataclass(frozen=True)
class OnnxManifest:
    """manifest.json of an ONNX export."""

    encoder: EncoderConfig | None
    """An embedder's pooling, normalization, prefixes, Matryoshka dims and max length; None for a reranker."""
    hidden_size: int
    """Width of the `embeddings` output (before any per-row `dimensions` truncation); a reranker's hidden width."""
    dtype: str
    """Compute dtype baked into the graph: fp32, bf16 or fp16. Inputs are int64, `embeddings` is float32."""
    opset: int
    """ONNX opset of the default domain."""
    source: str
    """The checkpoint the export was made from (as given)."""
    source_fingerprint: str
    """checkpoint_fingerprint() of the source, so a stale export can be recognized."""
    model_file: str = "model.onnx"
    """Graph file inside the folder (weights may sit next to it as external data)."""
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    """Graph inputs, in order; "dimensions" (int64, shape (B,)) is the optional per-row Matryoshka input."""
    output: str = "embeddings"
    """The graph output: `embeddings` (B, hidden_size) float32, or a reranker's `scores` (B,) float32."""
    node_count: int = 0
    """Nodes in the graph (after export); a fused attention keeps this small."""
    op_histogram: dict[str, int] = dataclasses.field(default_factory=dict)
    """Node count per op type."""
    verification: Verification | None = None
    """onnxruntime vs PyTorch at export time; None until verified."""
    kind: str = EMBEDDER
    """What the graph is: "embedder" or "reranker" (bidir_core.sources.MODEL_KINDS)."""
    reranker: RerankerConfig | None = None
    """A reranker's template, pooling, temperature, max length and attention; None for an embedder."""

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise BidirError(f"kind must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        want, other = ("reranker", "encoder") if self.kind == RERANKER else ("encoder", "reranker")
        if getattr(self, want) is None or getattr(self, other) is not None:
            raise BidirError(f"a {self.kind} manifest has {want} settings and no {other} settings")
        if self.kind == RERANKER and (
            self.inputs != ("input_ids", "attention_mask") or self.output != "scores"
        ):
            raise BidirError(
                f"a reranker graph takes input_ids, attention_mask and outputs scores, got {list(self.inputs)} -> "
                f"{self.output!r}"
            )
        if self.dtype not in DTYPES:
            raise BidirError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.inputs[:2] != ("input_ids", "attention_mask") or not set(self.inputs[2:]) <= {"dimensions"}:
            raise BidirError(
                f"inputs must be input_ids, attention_mask[, dimensions], got {list(self.inputs)}"
            )

    @property
    def with_dims(self) -> bool:
        return "dimensions" in self.inputs

    @property
    def settings(self) -> EncoderConfig | RerankerConfig:
        """The model's settings, whichever kind: both have attention and max_length."""
        return self.reranker if self.kind == RERANKER else self.encoder


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: (batch, seq) at its minimum, optimum and maximum."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    def fits(self, batch: int, seq: int) -> bool:
        return self.min[0] <= batch <= self.max[0] and self.min[1] <= seq <= self.max[1]


@dataclass(frozen=True)
class EngineManifest:
    """manifest.json of a TensorRT engine folder: the ONNX manifest it was built from plus the build."""

    onnx: OnnxManifest
    precision: str
    """bf16, fp16 or fp32."""
    profiles: tuple[Profile, ...]
    """Optimization profiles, in engine order."""
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    """e.g. "9.0": an engine only runs on the GPU architecture it was built for."""
    engine_file: str = "model.engine"
    verification: Verification | None = None
    """The engine vs PyTorch at build time."""

    @property
    def kind(self) -> str:
        """The model's kind, the ONNX graph's it was built from: "embedder" or "reranker"."""
        return self.onnx.kind


def checkpoint_fingerprint(folder: str | Path) -> str:
    """sha256 over a checkpoint's config, bidir.json and weight files (names and bytes): equal fingerprints mean
    the same model. Reads every weight byte once (about 1 s per GB). A .gguf file is fingerprinted by its bytes."""
    folder = Path(folder)
    digest = hashlib.sha256()
    if folder.is_file():  # a .gguf source: the one file is the model, whatever its name
        files = [(b"", folder)]
    else:
        names = ["config.json", "bidir.json"] + sorted(p.name for p in folder.glob("*.safetensors"))
        files = [(name.encode() + b"\0", folder / name) for name in names]
    for label, path in files:
        if not path.is_file():
            continue
        digest.update(label)
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _to_json(manifest) -> dict:
    return {"format_version": ARTIFACT_FORMAT_VERSION, "kind": _KIND[type(manifest)], **_encode(manifest)}


def _encode(value):
    if isinstance(value, EncoderConfig):
        return {k: v for k, v in value.to_json().items() if k != "format_version"}
    if isinstance(value, OnnxManifest):
        # "kind" at the top of manifest.json is the artifact's (onnx / tensorrt): the model's is "model_kind"
        raw = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        raw["model_kind"] = raw.pop("kind")
        if value.kind == EMBEDDER:  # as before kinds existed: older readers still read it
            del raw["model_kind"], raw["reranker"]
        return raw
    if dataclasses.is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    return value


def write_manifest(folder: str | Path, manifest: OnnxManifest | EngineManifest) -> Path:
    """Write folder/manifest.json atomically (a temp file renamed into place)."""
    return write_json_atomic(Path(folder) / MANIFEST, _to_json(manifest))


def _verification(raw) -> Verification | None:
    if raw is None:
        return None
    return Verification(**{**raw, "shapes": tuple(tuple(s) for s in raw.get("shapes", ()))})


def _onnx(raw: dict) -> OnnxManifest:
    raw = dict(raw)
    kind = raw.pop("model_kind", EMBEDDER)  # manifests written before rerankers are embedders
    encoder, reranker = raw.get("encoder"), raw.get("reranker")
    return OnnxManifest(
        **{
            **raw,
            "kind": kind,
            "encoder": EncoderConfig(**encoder) if encoder is not None else None,
            "reranker": RerankerConfig(**reranker) if reranker is not None else None,
            "inputs": tuple(raw.get("inputs", ("input_ids", "attention_mask"))),
            "verification": _verification(raw.get("verification")),
        }
    )


def _engine(raw: dict) -> EngineManifest:
    profiles = tuple(Profile(*(tuple(p[k]) for k in ("min", "opt", "max"))) for p in raw["profiles"])
    return EngineManifest(
        **{
            **raw,
            "onnx": _onnx(raw["onnx"]),
            "profiles": profiles,
            "verification": _verification(raw.get("verification")),
        }
    )


_KIND = {OnnxManifest: "onnx", EngineManifest: "tensorrt"}
_PARSE = {"onnx": _onnx, "tensorrt": _engine}


def read_manifest(folder: str | Path, kind: str | None = None) -> OnnxManifest | EngineManifest:
    """The one reader of an export's manifest.json. kind ("onnx" or "tensorrt") requires that kind; the file the
    manifest names must exist."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise BidirError(
            f"{folder}: no {MANIFEST} (not an ONNX export or TensorRT engine folder)"
            + interrupted_publish_hint(folder)
        )
    raw = read_versioned_json(path, ARTIFACT_FORMAT_VERSION)
    found = raw.pop("kind", None)
    if found not in _PARSE:
        raise BidirError(f"{path}: kind {found!r} is not onnx or tensorrt")
    if kind is not None and found != kind:
        raise BidirError(f"{path}: is a {found} artifact, expected {kind}")
    manifest = parse_fields(path, lambda: _PARSE[found](raw))
    artifact = manifest.model_file if isinstance(manifest, OnnxManifest) else manifest.engine_file
    if not (folder / artifact).is_file():
        raise BidirError(f"{folder}: manifest names {artifact}, which is missing")
    return manifest


def find_manifest(path: str | Path, kind: str | None = None) -> OnnxManifest | EngineManifest | None:
    """read_manifest(path, kind) when path is a folder with a manifest.json (an export), None otherwise (a
    checkpoint, a .gguf file or a name)."""
    folder = Path(path).expanduser()
    if folder.is_dir() and (folder / MANIFEST).is_file():
        return read_manifest(folder, kind)
    return None


def artifact_files(manifest: OnnxManifest | EngineManifest) -> frozenset[str]:
    """The files an export folder holds: the manifest, the graph (and its external data) or the engine, and the
    tokenizer files. A folder holding anything else is not one to replace."""
    if isinstance(manifest, OnnxManifest):
        return TOKENIZER_FILES | {MANIFEST, manifest.model_file, manifest.model_file + ".data"}
    return TOKENIZER_FILES | {MANIFEST, manifest.engine_file}


def export_source(manifest: OnnxManifest, where: str | Path | None = None) -> Path:
    """The checkpoint an ONNX export (or the engine built from it) was made from, resolved; a BidirError (prefixed
    by where) when its fingerprint has changed since the export, as the export no longer computes its outputs."""
    source = resolve_source(manifest.source)
    fingerprint = checkpoint_fingerprint(source)
    if fingerprint != manifest.source_fingerprint:
        raise BidirError(
            (f"{where}: " if where is not None else "")
            + f"source {manifest.source} has changed since the export (fingerprint {fingerprint[:19]}..., "
            f"manifest {manifest.source_fingerprint[:19]}...); export again"
        )
    return source
