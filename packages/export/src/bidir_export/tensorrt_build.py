"""TensorRT engines from an ONNX export (or a checkpoint, exported first), verified against PyTorch.

    build_engine("onnx/", "engine/", precision="bf16", profiles=(Profile((1, 1), (32, 128), (64, 512)),))
    -> engine/{model.engine, tokenizer files, manifest.json (EngineManifest)}

Written against the TensorRT 10 and 11 Python APIs (name-based I/O, execute_async_v3):

- TensorRT 11 networks are always strongly typed: every tensor's type comes from the ONNX graph, and the builder
  precision flags are gone. The precision is therefore baked into the ONNX (`export-onnx --dtype bf16`); a checkpoint
  source is exported in the requested precision.
- TensorRT 10 builds a graph exported in the requested precision as a STRONGLY_TYPED network as well, and an fp32
  graph with the BF16 / FP16 builder flag (TensorRT then picks per layer).

Needs an importable `tensorrt` and a CUDA GPU; without them build_engine raises one line saying how to get them. The
engine runs on torch CUDA tensors (set_tensor_address / execute_async_v3 on a torch stream), so nothing beyond
torch and tensorrt is needed.

A reranker (an ONNX export or checkpoint of kind "reranker") builds the same way: its engine outputs `scores` (B,),
its manifest carries the reranker's settings (template included), and it is verified on real pairs per profile
with the scores' error measure (bidir_export.verification).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from bidir_core.artifacts import (
    DTYPES,
    EngineManifest,
    OnnxManifest,
    Profile,
    Verification,
    export_source,
    find_manifest,
    write_manifest,
)
from bidir_core.checkpoint import EncoderConfig
from bidir_core.errors import BidirError
from bidir_core.folders import TOKENIZER_FILES
from bidir_core.reranker_config import RERANKER
from bidir_core.sources import open_source
from bidir_export.onnx_export import (
    DEFAULT_OPSET,
    Progress,
    check_with_dims,
    describe,
    export_onnx,
    fixed_batches,
    load_graph,
)
from bidir_export.output_folder import check_target, staged_folder
from bidir_export.profiles import check_profiles
from bidir_export.verification import Batch, compare, reference_outputs

ENGINE_FILE = "model.engine"
TENSORRT_HELP = (
    "use NVIDIA's TensorRT container from NGC (nvcr.io/nvidia/tensorrt:<yy.mm>-py3) or "
    "`pip install tensorrt --extra-index-url https://pypi.nvidia.com` on a machine with a CUDA GPU"
)


def tensorrt_missing_message() -> str | None:
    """None when TensorRT can build here; else one line saying what is missing and how to get it."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"TensorRT is not installed (import tensorrt failed): {TENSORRT_HELP}"
    if not torch.cuda.is_available():
        return (
            "no CUDA GPU here (torch.cuda.is_available() is False): TensorRT builds and runs engines on a GPU"
        )
    return None


def precision_plan(trt_major: int, onnx_dtype: str, precision: str) -> str:
    """How to get `precision` from a graph exported in onnx_dtype: "strongly_typed" (the graph's own types) or
    "builder_flag" (an fp32 graph with the BF16 / FP16 flag, TensorRT 10 only). Raises BidirError otherwise."""
    if precision not in DTYPES:
        raise BidirError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    if onnx_dtype == precision:
        return "strongly_typed"
    if onnx_dtype == "fp32" and trt_major < 11:
        return "builder_flag"
    if onnx_dtype == "fp32":
        raise BidirError(
            f"TensorRT {trt_major} networks are strongly typed: the precision comes from the ONNX graph, which is "
            f"fp32; export it with `export-onnx --dtype {precision}` or pass the checkpoint"
        )
    raise BidirError(
        f"the ONNX graph is {onnx_dtype}; it cannot build a {precision} engine (export it again)"
    )


def build_engine(
    source: str | Path,
    out_dir: str | Path,
    *,
    precision: str = "bf16",
    profiles: Sequence[Profile],
    workspace_gb: float | None = None,
    timing_cache: str | Path | None = None,
    with_dims: bool = False,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> EngineManifest:
    """Build out_dir/model.engine from source (an ONNX export folder, or a checkpoint that is exported first).

    Profiles are checked (min <= opt <= max, within the model's max_length) before anything else happens. with_dims
    and opset apply to a checkpoint source only (an ONNX export has its inputs and opset already); opset 18 spells
    attention out for a TensorRT whose ONNX parser lacks the opset-23 Attention op."""
    say = progress or (lambda _msg: None)
    profiles = tuple(profiles)
    if precision not in DTYPES:
        raise BidirError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    if workspace_gb is not None and not workspace_gb > 0:
        raise BidirError(f"workspace must be a positive number of GB, got {workspace_gb!r}")
    onnx_manifest = find_manifest(source, "onnx")  # None: a checkpoint, opened here once
    checkpoint = None if onnx_manifest else open_source(source)
    if checkpoint is not None:
        check_with_dims(checkpoint, with_dims)
    check_profiles(profiles, _max_length(onnx_manifest, checkpoint))
    check_target(Path(out_dir).expanduser().absolute(), overwrite, "tensorrt")
    if missing := tensorrt_missing_message():
        raise BidirError(missing)
    import tensorrt as trt

    major = int(trt.__version__.split(".")[0])
    with staged_folder(out_dir, "tensorrt", overwrite=overwrite) as tmp:
        onnx_dir = Path(source).expanduser()
        if onnx_manifest is None:
            # TensorRT 11 needs the precision in the graph; TensorRT 10 builds it strongly typed too. The graph goes
            # inside the staged folder (beside out_dir, not in /tmp), so a killed build's leftovers are cleaned by
            # the next run like any other of our temp folders; it is removed before the folder is published.
            onnx_dir = tmp / ".onnx"
            say(f"exporting {source} to ONNX ({precision}) first")
            onnx_manifest = export_onnx(
                checkpoint, onnx_dir, dtype=precision, opset=opset, with_dims=with_dims, verify=False
            )
        plan = precision_plan(major, onnx_manifest.dtype, precision)
        say(
            f"building a {precision} TensorRT {trt.__version__} engine ({plan}, "
            f"{onnx_manifest.settings.attention} attention, {onnx_manifest.kind}), {len(profiles)} profile(s)"
        )
        engine_bytes = _build(
            trt,
            onnx_dir / onnx_manifest.model_file,
            onnx_manifest,
            precision,
            plan,
            profiles,
            workspace_gb,
            timing_cache,
        )
        (tmp / ENGINE_FILE).write_bytes(engine_bytes)
        _copy_tokenizer(onnx_dir, tmp)
        if onnx_dir == tmp / ".onnx":
            shutil.rmtree(onnx_dir)
        name = torch.cuda.get_device_name()
        cc = ".".join(map(str, torch.cuda.get_device_capability()))
        manifest = EngineManifest(
            onnx=onnx_manifest,
            precision=precision,
            profiles=profiles,
            tensorrt_version=trt.__version__,
            gpu_name=name,
            compute_capability=cc,
            engine_file=ENGINE_FILE,
        )
        if verify:
            say("verifying the engine against PyTorch")
            result = verify_engine(trt, engine_bytes, manifest)
            if not result.passed:
                raise BidirError(f"{out_dir}: not written: {describe(result)}")
            manifest = replace(manifest, verification=result)
        write_manifest(tmp, manifest)
    say(f"wrote {out_dir}" + (f"; {describe(manifest.verification)}" if manifest.verification else ""))
    return manifest


def _max_length(onnx_manifest: OnnxManifest | None, checkpoint) -> int:
    """The longest sequence the model takes: the ONNX export's, or what export_onnx will take from the checkpoint
    (its bidir.json's; a source without one has the defaults)."""
    if onnx_manifest is not None:
        return onnx_manifest.settings.max_length
    if checkpoint.kind == RERANKER:
        return checkpoint.reranker_config().max_length
    return (checkpoint.stored or EncoderConfig()).max_length


def _copy_tokenizer(onnx_dir: Path, target: Path) -> None:
    """The tokenizer files only: anything else in the ONNX folder would make the engine folder one that
    export-trt --overwrite refuses to replace (bidir_export.output_folder.check_target)."""
    for path in onnx_dir.iterdir():
        if path.is_file() and path.name in TOKENIZER_FILES:
            shutil.copy2(path, target / path.name)


def _build(
    trt,
    onnx_path: Path,
    manifest: OnnxManifest,
    precision: str,
    plan: str,
    profiles,
    workspace_gb,
    timing_cache,
) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if plan == "strongly_typed" and major < 11:  # TensorRT 11: always strongly typed, the flag is deprecated
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # also finds external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BidirError(f"{onnx_path}: TensorRT cannot parse it ({' '.join(errors.split())[:500]})")

    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 1024**3))
    if plan == "builder_flag":
        config.set_flag(trt.BuilderFlag.BF16 if precision == "bf16" else trt.BuilderFlag.FP16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 (on by default) rounds matmul inputs to a 10-bit mantissa: an "fp32" engine would be ~1e3x further
        # from float64 than PyTorch fp32 and fail verification. Ask for bf16 / fp16 for speed instead.
        config.clear_flag(trt.BuilderFlag.TF32)
    for profile in profiles:
        p = builder.create_optimization_profile()
        for name in ("input_ids", "attention_mask"):
            p.set_shape(name, profile.min, profile.opt, profile.max)
        if manifest.with_dims:
            p.set_shape("dimensions", (profile.min[0],), (profile.opt[0],), (profile.max[0],))
        config.add_optimization_profile(p)
    cache_path = Path(timing_cache).expanduser() if timing_cache else None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BidirError(f"{onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)")
    if cache_path is not None:  # save what this build timed, for the next one (temp name + rename)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        tmp.replace(cache_path)
    return bytes(serialized)


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
    }
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


class EngineRunner:
    """Runs a deserialized engine on torch CUDA tensors: (input feeds) -> its output, embeddings (B, H) or a
    reranker's scores (B,)."""

    def __init__(self, trt, engine_bytes: bytes, output: str = "embeddings"):
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise BidirError("TensorRT could not deserialize the engine (built for another TensorRT or GPU?)")
        self.context = self.engine.create_execution_context()
        self.output = output
        self.out_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(output))
        self.stream = torch.cuda.Stream()

    def __call__(self, feeds: dict[str, torch.Tensor], profile: int = 0) -> torch.Tensor:
        ctx, stream = self.context, self.stream
        with torch.cuda.stream(stream):
            ctx.set_optimization_profile_async(profile, stream.cuda_stream)
            inputs = {name: t.to("cuda", torch.int64).contiguous() for name, t in feeds.items()}  # kept alive
            for name, tensor in inputs.items():
                ctx.set_input_shape(name, tuple(tensor.shape))
                ctx.set_tensor_address(name, tensor.data_ptr())
            out = torch.empty(tuple(ctx.get_tensor_shape(self.output)), dtype=self.out_dtype, device="cuda")
            ctx.set_tensor_address(self.output, out.data_ptr())
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise BidirError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return out.float()


def verify_engine(trt, engine_bytes: bytes, manifest: EngineManifest) -> Verification:
    """The engine vs PyTorch on CUDA (float64 and the engine's precision; verification.py's rule): per profile,
    the fixed batches that fit it plus its min and max shapes."""
    onnx_manifest = manifest.onnx
    source = open_source(export_source(onnx_manifest))
    reference = load_graph(source, onnx_manifest.settings, with_dims=onnx_manifest.with_dims, device="cuda")
    runner = EngineRunner(trt, engine_bytes, onnx_manifest.output)
    batches, profile_of = profile_batches(
        manifest.profiles, lambda largest, seed: fixed_batches(reference, onnx_manifest, largest, seed)
    )
    # the same rule as the ONNX export: float64 PyTorch is the truth, PyTorch in the engine's precision the scale
    expected = reference_outputs(reference, batches, manifest.precision, device="cuda")
    index_of = {id(b): i for b, i in zip(batches, profile_of, strict=True)}

    def run_engine(batch: Batch) -> torch.Tensor:
        return runner(batch.feeds(), profile=index_of[id(batch)])

    runtime = f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"
    return compare(batches, expected, run_engine, manifest.precision, runtime)


def profile_batches(
    profiles: Sequence[Profile], make: Callable[[tuple[int, int], int], list[Batch]]
) -> tuple[list[Batch], list[int]]:
    """(batches, the profile index each runs on): for every profile, the fixed batches up to its max shape that fit
    it, plus a batch of its min shape. make(largest, seed) builds the fixed batches (onnx_export.fixed_batches)."""
    batches, profile_of = [], []
    for index, profile in enumerate(profiles):
        mine = make(profile.max, index) + make(profile.min, index)[-1:]
        mine = [b for b in mine if profile.fits(*b.shape)]
        batches += mine
        profile_of += [index] * len(mine)
    return batches, profile_of
