"""The export-onnx and export-trt command lines: parse, call one library function, one line on a user error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bidir_core.cli import run_cli
from bidir_core.errors import BidirError

ONNX_EXAMPLE = """examples:
  export-onnx smollm2-135m runs/onnx                      # fp32, opset 23, verified against PyTorch
  export-onnx runs/ckpt runs/onnx-bf16 --dtype bf16 --with-dims
  export-onnx runs/reranker runs/rr-onnx --dtype fp16       # a reranker: `scores` out, verified on real pairs
  export-onnx --verify-only runs/onnx                     # re-check an existing export
"""

TRT_EXAMPLE = """examples:
  export-trt runs/onnx-bf16 runs/engine --precision bf16 --min 1x1 --opt 32x128 --max 64x512
  export-trt runs/ckpt runs/engine --precision bf16 --min 1x1 --opt 32x128 --max 64x512 \\
      --profile 1x1,1x2048,4x4096 --timing-cache runs/trt.cache
Needs an importable tensorrt and a CUDA GPU (NVIDIA's TensorRT container, or
pip install tensorrt --extra-index-url https://pypi.nvidia.com).
"""


def _shape(text: str) -> tuple[int, int]:
    from bidir_export.profiles import parse_shape

    try:
        return parse_shape(text)
    except BidirError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def onnx_main(argv: Sequence[str] | None = None) -> int:
    from bidir_export.onnx_export import DEFAULT_OPSET, DEFAULT_VERIFY_SHAPE

    ap = argparse.ArgumentParser(
        prog="export-onnx",
        description="Export a bidir checkpoint (an embedder: model, pooling, normalization; a reranker: model, "
        "pooling, head, temperature) to ONNX and verify it against PyTorch.",
        epilog=ONNX_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("checkpoint", nargs="?", help="checkpoint folder, Llama folder, .gguf or 'smollm2-135m'")
    ap.add_argument("out_dir", nargs="?", help="the export folder to write")
    ap.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="compute dtype of the graph"
    )
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    ap.add_argument(
        "--with-dims", action="store_true", help="embedders: add a per-row Matryoshka `dimensions` input"
    )
    ap.add_argument(
        "--verify-shape",
        type=_shape,
        default="x".join(map(str, DEFAULT_VERIFY_SHAPE)),  # argparse runs string defaults through type
        metavar="BxS",
        help="largest shape verified (default %(default)s, capped at the model's max_length)",
    )
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing export at OUT_DIR")
    ap.add_argument("--verify-only", metavar="OUT_DIR", help="re-check an existing export and exit")
    args = ap.parse_args(argv)

    from bidir_export.onnx_export import export_onnx, verify_export

    if args.verify_only:
        if args.checkpoint:
            ap.error("--verify-only takes the export folder only")
        return run_cli(
            "export-onnx",
            lambda: verify_export(args.verify_only, verify_shape=args.verify_shape, progress=_say),
        )
    if not args.checkpoint or not args.out_dir:
        ap.error("CHECKPOINT and OUT_DIR are required (or --verify-only OUT_DIR)")
    return run_cli(
        "export-onnx",
        lambda: export_onnx(
            args.checkpoint,
            args.out_dir,
            dtype=args.dtype,
            opset=args.opset,
            with_dims=args.with_dims,
            verify=not args.no_verify,
            verify_shape=args.verify_shape,
            overwrite=args.overwrite,
            progress=_say,
        ),
    )


def trt_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="export-trt",
        description="Build a TensorRT engine (dynamic batch and sequence) from an ONNX export or a checkpoint, "
        "an embedder's or a reranker's, and verify it against PyTorch.",
        epilog=TRT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("source", help="an export-onnx folder, or a checkpoint (exported to ONNX first)")
    ap.add_argument("out_dir", help="the engine folder to write")
    ap.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--min", metavar="BxS", help="smallest (batch x seq) of the first profile")
    ap.add_argument("--opt", metavar="BxS", help="the shape TensorRT tunes the first profile for")
    ap.add_argument("--max", metavar="BxS", help="largest (batch x seq) of the first profile")
    ap.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="MIN,OPT,MAX",
        help="another profile, e.g. 1x1,1x2048,4x4096",
    )
    ap.add_argument("--workspace", type=float, default=None, metavar="GB", help="builder workspace limit")
    ap.add_argument("--timing-cache", default=None, metavar="PATH", help="read and update this timing cache")
    ap.add_argument(
        "--with-dims", action="store_true", help="an embedder checkpoint source: add the `dimensions` input"
    )
    ap.add_argument(
        "--opset",
        type=int,
        default=23,
        help="checkpoint source: ONNX opset (18 if your parser lacks Attention)",
    )
    ap.add_argument("--no-verify", action="store_true", help="skip the engine-vs-PyTorch check")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing engine folder at OUT_DIR")
    args = ap.parse_args(argv)

    from bidir_export.tensorrt_build import build_engine

    def work():
        profiles = _profiles(args)
        return build_engine(
            args.source,
            args.out_dir,
            precision=args.precision,
            profiles=profiles,
            workspace_gb=args.workspace,
            timing_cache=args.timing_cache,
            with_dims=args.with_dims,
            opset=args.opset,
            verify=not args.no_verify,
            overwrite=args.overwrite,
            progress=_say,
        )

    return run_cli("export-trt", work)


def _profiles(args) -> list:
    """--min/--opt/--max (all three or none) then each --profile, parsed and ordered-checked."""
    from bidir_export.profiles import parse_profile

    given = [args.min, args.opt, args.max]
    profiles = []
    if any(given):
        if not all(given):
            raise BidirError("--min, --opt and --max go together (or use --profile MIN,OPT,MAX)")
        profiles.append(parse_profile(",".join(given)))
    profiles += [parse_profile(p) for p in args.profile]
    if not profiles:
        raise BidirError("give a profile: --min BxS --opt BxS --max BxS, or --profile MIN,OPT,MAX")
    return profiles


def onnx_entry() -> None:
    sys.exit(onnx_main())


def trt_entry() -> None:
    sys.exit(trt_main())
