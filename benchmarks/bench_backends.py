"""Backend speed on the embedded default (SmolLM2-135M): torch fp32 / bf16 vs onnxruntime fp32 and dynamic int8.

Every backend runs the same (batch, seq) inputs (random token ids, full attention masks) through the whole
embedding path (model, mean pooling, L2 normalize):

- torch fp32 / torch bf16:   BiEncoder.forward under inference_mode (the baseline is torch fp32)
- onnxruntime fp32:          the export-onnx graph (opset 23: fused Attention / RMSNormalization), all graph
                             optimizations on, as many intra-op threads as torch uses
- onnxruntime int8 dynamic:  the same graph through onnxruntime.quantization.quantize_dynamic (int8 weights,
                             activations quantized per batch at run time); its cosine to torch fp32 is reported
- on a CUDA machine also torch on the GPU, and a TensorRT bf16 engine (export-trt) against torch bf16 at
  64 x 512 (target >= 2x) when tensorrt is importable; otherwise those rows say why they were skipped.

Each backend is first checked against torch fp32 (fp32: max |diff| <= 1e-4; others: cosine reported), then timed
--repeats times per shape, interleaved; the table gives medians and the speed ratio to torch fp32 (> 1: faster).

    python benchmarks/bench_backends.py [--shapes 32x128,1x512] [--repeats 3] [--threads N] [--json PATH]
                                        [--onnx DIR]   # reuse an existing fp32 export of the embedded default
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from harness import agreement, append_jsonl, environment, interleaved, medians, warn_if_busy

from bidir_core.artifacts import read_manifest
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_export.onnx_export import export_onnx
from bidir_export.profiles import parse_shape

MODEL = "smollm2-135m"


def inputs(vocab: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100003 + seq)
    return torch.randint(0, vocab, (batch, seq), generator=g), torch.ones(batch, seq, dtype=torch.long)


def ort_runner(path: Path, threads: int, providers: list[str]):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=providers)

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        return torch.from_numpy(session.run(["embeddings"], feeds)[0])

    return run


def torch_runner(encoder: BiEncoder, device: str):
    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = encoder(ids.to(device), mask.to(device))
            if device == "cuda":
                torch.cuda.synchronize()
        return out.float().cpu()

    return run


def trt_runner(onnx_dir: Path, work: Path, shapes: list[tuple[int, int]]):
    """A bf16 TensorRT engine (built by bidir_export.build_engine) over one profile covering every shape."""
    import tensorrt as trt

    from bidir_core.artifacts import Profile
    from bidir_export.tensorrt_build import ENGINE_FILE, EngineRunner, build_engine

    biggest = (max(b for b, _ in shapes), max(s for _, s in shapes))
    build_engine(onnx_dir, work / "engine", precision="bf16", profiles=[Profile((1, 1), biggest, biggest)])
    runner = EngineRunner(trt, (work / "engine" / ENGINE_FILE).read_bytes())

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return runner({"input_ids": ids, "attention_mask": mask}).cpu()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="32x128,1x512", help="comma-separated BATCHxSEQ")
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed runs per backend and shape (median reported)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime CPU threads")
    ap.add_argument(
        "--onnx", type=Path, default=None, help="an fp32 export-onnx folder of the embedded default"
    )
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line with all figures")
    args = ap.parse_args()
    try:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
    except BidirError as e:
        sys.exit(f"bench_backends: {e}")
    if args.repeats < 1:
        sys.exit("bench_backends: --repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {threads} CPU threads, CUDA: {cuda or 'none'}"
    )
    busy = warn_if_busy()

    work = Path(
        tempfile.mkdtemp(prefix="bench-backends-")
    )  # the export, int8 model, engine: ~1 GB, removed at exit
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    onnx_dir = args.onnx
    if onnx_dir is None:
        onnx_dir = work / "onnx"
        t0 = time.perf_counter()
        export_onnx(MODEL, onnx_dir, progress=lambda m: print(m, file=sys.stderr))
        print(f"exported in {time.perf_counter() - t0:.0f} s")
    manifest = read_manifest(onnx_dir, "onnx")
    if manifest.dtype != "fp32" or manifest.with_dims:
        sys.exit(f"bench_backends: {onnx_dir} must be a plain fp32 export (no --with-dims)")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8_path = work / "model.int8.onnx"
    # MatMul only: the quantizer takes the ONNX `Attention` op for com.microsoft's and would emit an invalid QAttention.
    quantize_dynamic(
        onnx_dir / manifest.model_file,
        int8_path,
        op_types_to_quantize=["MatMul"],
        weight_type=QuantType.QInt8,
    )

    fp32 = BiEncoder.from_pretrained(MODEL).eval()
    bf16 = BiEncoder.from_pretrained(MODEL, dtype=torch.bfloat16).eval()
    cpu = ["CPUExecutionProvider"]
    backends = {
        "torch fp32": torch_runner(fp32, "cpu"),
        "torch bf16": torch_runner(bf16, "cpu"),
        "onnxruntime fp32": ort_runner(onnx_dir / manifest.model_file, threads, cpu),
        "onnxruntime int8 dynamic": ort_runner(int8_path, threads, cpu),
    }
    skipped = {}
    if cuda:
        backends["torch fp32 cuda"] = torch_runner(
            BiEncoder.from_pretrained(MODEL, device="cuda").eval(), "cuda"
        )
        gpu_bf16 = BiEncoder.from_pretrained(MODEL, dtype=torch.bfloat16, device="cuda").eval()
        backends["torch bf16 cuda"] = torch_runner(gpu_bf16, "cuda")
        try:
            backends["tensorrt bf16"] = trt_runner(onnx_dir, work, [*shapes, (64, 512)])
            shapes = sorted(set(shapes) | {(64, 512)})
        except (ImportError, BidirError) as e:
            skipped["tensorrt bf16"] = str(e)
    else:
        skipped["torch cuda, tensorrt bf16"] = (
            "no CUDA GPU (torch.cuda.is_available() is False): measured on CPU only"
        )

    vocab = fp32.model.config.vocab_size
    results = {}
    for batch, seq in shapes:
        ids, mask = inputs(vocab, batch, seq)
        key = f"{batch}x{seq}"
        reference = backends["torch fp32"](ids, mask)  # also the warm-up of the baseline
        checks = {}
        for name, run in backends.items():
            out = reference if name == "torch fp32" else run(ids, mask)  # warm-up + correctness
            agree = agreement(out, reference)
            checks[name] = {"max_abs_diff": agree["max_abs_diff"], "min_cosine": agree["min_cosine"]}
        if checks["onnxruntime fp32"]["max_abs_diff"] > 1e-4:
            sys.exit(f"bench_backends: onnxruntime fp32 disagrees with torch fp32 at {key}: {checks}")
        times = interleaved(backends, [(ids, mask)] * args.repeats)  # each CUDA runner synchronizes itself
        med = medians(times)
        results[key] = {
            name: {
                "median_s": med[name],
                "seconds": times[name],
                "vs_torch_fp32": med["torch fp32"] / med[name],
                **checks[name],
            }
            for name in backends
        }
        if "tensorrt bf16" in med:
            results[key]["tensorrt bf16"]["vs_torch_bf16_cuda"] = (
                med["torch bf16 cuda"] / med["tensorrt bf16"]
            )

    print(
        f"\n{'shape':<8} {'backend':<26} {'median s':>9} {'x torch fp32':>13} {'min cos':>9} {'max |diff|':>11}"
    )
    for key, rows in results.items():
        for name, r in rows.items():
            extra = f"  ({r['vs_torch_bf16_cuda']:.2f}x torch bf16 cuda)" if "vs_torch_bf16_cuda" in r else ""
            print(
                f"{key:<8} {name:<26} {r['median_s']:>9.3f} {r['vs_torch_fp32']:>12.2f}x "
                f"{r['min_cosine']:>9.5f} {r['max_abs_diff']:>11.2e}{extra}"
            )
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    if args.json:
        record = {
            "benchmark": "bench_backends",
            **environment(busy_cores_start=busy),
            "model": MODEL,
            "repeats": args.repeats,
            "results": results,
            "skipped": skipped,
            "onnx_nodes": manifest.node_count,
        }
        append_jsonl(args.json, record)


if __name__ == "__main__":
    main()
