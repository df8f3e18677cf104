"""ONNX export of a bidir checkpoint, verified against PyTorch (the ONNX artifact that bidir_core.artifacts defines).

    export_onnx("ckpt/", "onnx/")     -> onnx/{model.onnx [+ model.onnx.data], tokenizer files, manifest.json}
    verify_export("onnx/")            -> re-run the verification of an existing export

The exporter is torch.onnx's dynamo exporter (torch.export + onnxscript): at opset >= 23 each attention becomes
one ONNX `Attention` node and each RMSNorm one `RMSNormalization` node, which onnxruntime runs directly and
TensorRT recognizes; at opsets 18..22 attention is spelled out as MatMul / Softmax. The attention mode
(bidirectional or causal: the mask is part of the graph) is recorded in the manifest (encoder.attention) and in the
graph's own metadata (`bidir.attention`), which check_interface compares.

A reranker checkpoint (open_source(...).kind == "reranker") exports its ScoringGraph instead: the same inputs,
`scores` (B,) float32 out with pooling, head and temperature inside, its RerankerConfig (template included) in the
manifest, verified on real pairs (verification.pair_batches) with the scores' error measure.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from bidir_core.artifacts import (
    DTYPES,
    MANIFEST,
    OnnxManifest,
    Verification,
    checkpoint_fingerprint,
    export_source,
    read_manifest,
    write_manifest,
)
from bidir_core.checkpoint import EncoderConfig
from bidir_core.cross_encoder import CrossEncoder
from bidir_core.embedding_graph import EmbeddingGraph
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError, one_line
from bidir_core.reranker_config import RERANKER, RerankerConfig
from bidir_core.scoring_graph import SCORES, ScoringGraph
from bidir_core.sources import ModelSource, open_source
from bidir_export.output_folder import staged_folder
from bidir_export.profiles import check_verify_shape
from bidir_export.verification import (
    FACTOR,
    MAX_ERROR,
    Batch,
    compare,
    low_precision_copy,
    pair_batches,
    reference_outputs,
    verification_batches,
    verified_dims,
)

DEFAULT_OPSET = 23  # the first opset with the fused Attention and RMSNormalization ops
MIN_OPSET = 18  # the dynamo exporter's floor
DEFAULT_VERIFY_SHAPE = (4, 128)
# protobuf cannot hold a model over 2 GiB: above this many weight bytes they go to model.onnx.data.
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2
MODEL_FILE = "model.onnx"
ATTENTION_KEY = "bidir.attention"  # the ONNX model's metadata_props entry naming the attention mode

Progress = Callable[[str], None]
Graph = EmbeddingGraph | ScoringGraph


class NotVerifiable(BidirError):
    """The artifact cannot be run here (e.g. onnxruntime CPU has no bf16 kernels); says what would run it."""


def export_onnx(
    checkpoint: str | Path | ModelSource,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    with_dims: bool = False,
    verify: bool = True,
    verify_shape: tuple[int, int] = DEFAULT_VERIFY_SHAPE,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> OnnxManifest:
    """Export checkpoint (anything BiEncoder.from_pretrained loads, or a reranker CrossEncoder.from_pretrained loads;
    an opened source too) to out_dir and verify it.

    Raises BidirError for bad input or when onnxruntime disagrees with PyTorch beyond tolerance (then nothing is
    written to out_dir). When the graph cannot run here (bf16 on onnxruntime CPU) the export is written with
    verification None and the reason goes to progress.
    """
    say = progress or (lambda _msg: None)
    _check_options(dtype, opset, verify_shape)
    source = open_source(checkpoint)
    check_with_dims(source, with_dims)
    # The output folder is checked (and a temporary one made next to it) before the weights are read.
    with staged_folder(out_dir, "onnx", overwrite=overwrite) as tmp:
        reference = load_graph(source, with_dims=with_dims)  # fp32: also the PyTorch reference
        settings = graph_settings(reference)
        verify_shape = (verify_shape[0], min(verify_shape[1], settings.max_length))
        say(
            f"exporting {source.name} ({'reranker, ' if source.kind == RERANKER else ''}{dtype}, opset {opset}, "
            f"{settings.attention} attention{', with dimensions' if with_dims else ''})"
        )
        # a low-precision copy lives for the export only; verification makes its own
        graph = reference if dtype == "fp32" else low_precision_copy(reference, dtype)
        output = SCORES if isinstance(reference, ScoringGraph) else "embeddings"
        _export_graph(graph.eval(), tmp / MODEL_FILE, opset, {ATTENTION_KEY: settings.attention}, output)
        del graph
        histogram = _check_onnx(tmp / MODEL_FILE)
        manifest = OnnxManifest(
            encoder=settings if isinstance(settings, EncoderConfig) else None,
            hidden_size=reference.hidden_size if output == SCORES else reference.encoder.hidden_size,
            dtype=dtype,
            opset=opset,
            source=_source_name(source),
            source_fingerprint=checkpoint_fingerprint(source.path),
            model_file=MODEL_FILE,
            inputs=reference.input_names,
            output=output,
            node_count=sum(histogram.values()),
            op_histogram=histogram,
            kind=source.kind,
            reranker=settings if isinstance(settings, RerankerConfig) else None,
        )
        check_interface(tmp / MODEL_FILE, manifest)
        _tokenizer(reference).save_pretrained(tmp)
        if verify:
            say(
                f"verifying with onnxruntime against PyTorch (largest shape {verify_shape[0]}x{verify_shape[1]})"
            )
            try:
                result = run_verification(tmp / MODEL_FILE, manifest, reference, verify_shape)
            except NotVerifiable as e:
                say(f"not verified: {e}")
            else:
                if not result.passed:
                    raise BidirError(f"{out_dir}: not written: {describe(result)}")
                manifest = replace(manifest, verification=result)
        write_manifest(tmp, manifest)
    say(
        f"wrote {out_dir}: {manifest.node_count} nodes"
        + (f"; {describe(manifest.verification)}" if manifest.verification else "")
    )
    return manifest


def check_with_dims(source: ModelSource, with_dims: bool) -> None:
    """with_dims is an embedder's option: a reranker's graph outputs one score per pair, with no width to cut."""
    if with_dims and source.kind == RERANKER:
        raise BidirError(
            f"{source.name}: is a reranker (one score per pair); --with-dims (a per-row Matryoshka `dimensions` "
            "input) applies to an embedder"
        )


def load_graph(
    source: ModelSource,
    settings: EncoderConfig | RerankerConfig | None = None,
    *,
    with_dims: bool = False,
    device: str | None = None,
) -> Graph:
    """The fp32 PyTorch graph an export of source is (and is verified against): a reranker's ScoringGraph, else the
    EmbeddingGraph; settings (a manifest's) in place of the source's own."""
    if source.kind == RERANKER:
        return ScoringGraph(
            CrossEncoder.from_pretrained(source, config=settings, device=device).eval()
        ).eval()
    encoder = BiEncoder.from_pretrained(source, config=settings, device=device).eval()
    return EmbeddingGraph(encoder, with_dims).eval()


def graph_settings(graph: Graph) -> EncoderConfig | RerankerConfig:
    return graph.cross_encoder.config if isinstance(graph, ScoringGraph) else graph.encoder.config


def _tokenizer(graph: Graph):
    return graph.cross_encoder.tokenizer if isinstance(graph, ScoringGraph) else graph.encoder.tokenizer


def verify_export(
    folder: str | Path,
    *,
    verify_shape: tuple[int, int] = DEFAULT_VERIFY_SHAPE,
    progress: Progress | None = None,
) -> OnnxManifest:
    """Re-check an existing export against its source checkpoint; the manifest gets the new result.

    Raises BidirError when the folder, the graph or the source do not match the manifest, or the check fails."""
    say = progress or (lambda _msg: None)
    folder = Path(folder)
    manifest = read_manifest(folder, "onnx")
    _check_options(manifest.dtype, manifest.opset, verify_shape)
    check_interface(folder / manifest.model_file, manifest)
    source = open_source(export_source(manifest, where=folder / MANIFEST))
    if source.kind != manifest.kind:  # the fingerprint matched, so only a hand-edited manifest gets here
        raise BidirError(f"{folder / MANIFEST}: says {manifest.kind}, its source is a {source.kind}")
    reference = load_graph(source, manifest.settings, with_dims=manifest.with_dims)
    verify_shape = (verify_shape[0], min(verify_shape[1], manifest.settings.max_length))
    say(f"verifying {folder} with onnxruntime against PyTorch")
    result = run_verification(folder / manifest.model_file, manifest, reference, verify_shape)
    manifest = replace(manifest, verification=result)
    write_manifest(folder, manifest)
    if not result.passed:
        raise BidirError(f"{folder}: verification failed: {describe(result)}")
    say(f"{folder}: {describe(result)}")
    return manifest


def describe(result: Verification) -> str:
    """One line: the verdict, the figures the rule compared, and what ran."""
    verdict = "passed" if result.passed else "FAILED"
    where = f"over {len(result.shapes)} shapes on {result.runtime}"
    if result.error is None and result.reference_error is None and result.max_abs_diff is not None:
        # a manifest written before the float64 rule: only the fp32 comparison figures
        return f"verification {verdict} ({result.tolerance}): max |diff| {result.max_abs_diff:.2e} {where}"
    if result.reference_error is None:
        return (
            f"verification {verdict}: PyTorch's own output in this precision is not finite (overflow) {where}"
        )
    if result.error is None:
        return f"verification {verdict}: the artifact's output is not finite (NaN or inf) {where}"
    cosine = f", min cosine {result.min_cosine:.6f}" if result.min_cosine is not None else ""  # None: scores
    line = (
        f"verification {verdict}: error {result.error:.2e} vs float64 PyTorch, bound {result.bound:.2e} "
        f"({FACTOR:g} x PyTorch's own {result.reference_error:.2e}, at most {MAX_ERROR:g}); max |diff| "
        f"{result.max_abs_diff:.2e}{cosine} {where}"
    )
    if not result.passed and result.reference_error * FACTOR > MAX_ERROR:
        line += "; PyTorch itself is this far off in this precision: use a wider dtype for this model"
    return line


def _check_options(dtype: str, opset: int, verify_shape: tuple[int, int]) -> None:
    import onnx

    if dtype not in DTYPES:
        raise BidirError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise BidirError(
            f"opset must be an integer in {MIN_OPSET}..{newest} (onnx {onnx.__version__}), got {opset!r}"
        )
    check_verify_shape(verify_shape)


def _source_name(source: ModelSource) -> str:
    """The embedded default by its name (its cache path differs per machine), any other source as an absolute path."""
    return source.name if source.format == "embedded" else str(source.path.absolute())


def _export_graph(
    graph: Graph, path: Path, opset: int, metadata: dict[str, str], output: str = "embeddings"
) -> None:
    """torch.onnx dynamo export with named dynamic batch / sequence axes, optimized, saved to path with metadata
    in the model's metadata_props; the graph's one output is named output."""
    # An example with padding and batch, seq > 1: torch.export specializes a dimension whose example size is 1.
    ids = torch.full((2, 8), 3, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    args: tuple[torch.Tensor, ...] = (ids, mask)
    dynamic: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
    }
    if getattr(graph, "with_dims", False):  # an EmbeddingGraph with the dimensions input
        H = graph.encoder.hidden_size
        args += (torch.tensor([H, max(1, H // 2)], dtype=torch.long),)
        dynamic["dimensions"] = {0: "batch"}
    weight_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    with warnings.catch_warnings():
        # "axis name batch will not be used, since it shares the same shape constraints": the names are kept.
        warnings.filterwarnings("ignore", message=".*axis name.*")
        warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside torch.export
        try:
            program = torch.onnx.export(
                graph,
                args,
                input_names=list(graph.input_names),
                output_names=[output],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=dynamic,
                optimize=True,
                verbose=False,
                report=False,
            )
        except Exception as e:  # the exporter raises many types; name the step, fold to one line
            raise BidirError(f"torch.onnx export failed ({one_line(e)[:500]})") from None
        program.model.metadata_props.update(metadata)
        program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)


def _check_onnx(path: Path) -> dict[str, int]:
    """onnx.checker (full: includes strict shape inference), then shape inference written into the file.
    Returns the op histogram of the graph."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True)
    except Exception as e:
        raise BidirError(f"{path}: the exported graph fails the ONNX checker ({one_line(e)[:500]})") from None
    model = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(node.op_type for node in model.graph.node).most_common())


_INT64, _FLOAT = 7, 1  # onnx.TensorProto.INT64 / FLOAT


def check_interface(path: Path, manifest: OnnxManifest) -> None:
    """The graph's inputs and output are the ones the manifest promises (names, order, types, ranks, width; a
    reranker's scores (batch,)), and so is its attention mode where the graph records one (exports before the
    causal mode did not)."""
    import onnx

    if not path.is_file():
        raise BidirError(f"{path}: missing")
    try:
        model = onnx.load(str(path), load_external_data=False)
        graph = model.graph
    except Exception as e:
        raise BidirError(f"{path}: not a readable ONNX model ({one_line(e)[:300]})") from None

    def describe_value(value) -> tuple[int, tuple]:
        t = value.type.tensor_type
        return t.elem_type, tuple(d.dim_param or d.dim_value for d in t.shape.dim)

    graph_attention = {p.key: p.value for p in model.metadata_props}.get(ATTENTION_KEY)
    if graph_attention is not None and graph_attention != manifest.settings.attention:
        raise BidirError(
            f"{path}: the graph's attention is {graph_attention} ({ATTENTION_KEY}), the manifest's "
            f"{manifest.settings.attention}"
        )
    inputs = [i.name for i in graph.input]
    if tuple(inputs) != manifest.inputs:
        raise BidirError(f"{path}: graph inputs {inputs} do not match the manifest's {list(manifest.inputs)}")
    for value in graph.input:
        elem, shape = describe_value(value)
        rank = 1 if value.name == "dimensions" else 2
        if elem != _INT64 or len(shape) != rank:
            raise BidirError(
                f"{path}: input {value.name} is not int64 of rank {rank} (type {elem}, shape {shape})"
            )
    outputs = [o.name for o in graph.output]
    if outputs != [manifest.output]:
        raise BidirError(f"{path}: graph outputs {outputs} do not match the manifest's [{manifest.output!r}]")
    elem, shape = describe_value(graph.output[0])
    if manifest.kind == RERANKER:
        if elem != _FLOAT or len(shape) != 1:
            raise BidirError(
                f"{path}: output {manifest.output} is type {elem} with shape {list(shape)}, a reranker's is "
                "float32 (batch,)"
            )
        return
    if elem != _FLOAT or len(shape) != 2 or shape[1] not in (manifest.hidden_size, "", 0):
        raise BidirError(
            f"{path}: output {manifest.output} is type {elem} with shape {list(shape)}, the manifest says "
            f"float32 (batch, {manifest.hidden_size})"
        )


def onnxruntime_session(path: Path):
    """An onnxruntime session on the best provider here (CUDA when onnxruntime-gpu has it, else CPU), with all
    graph optimizations. Raises NotVerifiable when no provider here has kernels for the graph."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:
        message = one_line(e)
        if "NOT_IMPLEMENTED" in message or "Could not find an implementation" in message:
            raise NotVerifiable(
                f"onnxruntime {ort.__version__} ({', '.join(providers)}) has no kernel for this graph "
                f"({message[message.find('Could not') :][:160] or message[:160]}); onnxruntime CPU has no bf16 "
                "MatMul: verify on a GPU with onnxruntime-gpu (export-onnx --verify-only) or build a TensorRT "
                "engine (export-trt verifies the engine)"
            ) from None
        raise BidirError(f"{path}: onnxruntime cannot load it ({message[:300]})") from None
    return session, f"onnxruntime {ort.__version__} {session.get_providers()[0]}"


def run_verification(
    path: Path, manifest: OnnxManifest, reference: Graph, largest: tuple[int, int]
) -> Verification:
    """onnxruntime on the graph at path vs PyTorch (reference: the fp32 graph, run in float64 and in the export's
    dtype) on the fixed batches (a reranker's: real pairs)."""
    session, runtime = onnxruntime_session(path)
    batches = fixed_batches(reference, manifest, largest)
    expected = reference_outputs(reference, batches, manifest.dtype)

    def run_onnx(batch: Batch) -> torch.Tensor:
        feeds = {name: t.numpy() for name, t in batch.feeds().items()}
        return torch.from_numpy(session.run([manifest.output], feeds)[0])

    return compare(batches, expected, run_onnx, manifest.dtype, runtime)


def fixed_batches(
    reference: Graph, manifest: OnnxManifest, largest: tuple[int, int], seed: int = 0
) -> list[Batch]:
    """The verification batches up to largest for this graph: real pairs for a reranker (pair_batches), seeded
    random tokens for an embedder (verification_batches, with each row's dimension when the graph takes them)."""
    if isinstance(reference, ScoringGraph):
        return pair_batches(reference.cross_encoder, largest)
    dims = verified_dims(manifest) if manifest.with_dims else None
    return verification_batches(reference.encoder.model.config.vocab_size, largest, dims, seed=seed)
