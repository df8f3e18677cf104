"""How far exported graphs are from float64 PyTorch, next to PyTorch's own error: the table behind bidir-export's
verification rule (packages/export/README.md).

For each model and export dtype: export to ONNX (no verification), then on the verification batches (1x1, padded
right and left, and the largest shape) measure, against the same weights run by PyTorch in float64,

- PyTorch's own error computing in that dtype (the rule's scale),
- the export's error on onnxruntime CPU (or "no kernel" where onnxruntime CPU cannot run the graph),
- their ratio, the bound the rule sets (FACTOR x PyTorch's error, at least the unit roundoff) and the verdict,
- and, for context, the old fixed rule's figure: max |export - PyTorch fp32|.

error = max over rows of ||x - x64|| / ||x64||. Models: the tiny test model, the embedded default untrained, any
checkpoint folders given with --checkpoint NAME=PATH (e.g. the demo's trained model), and --llama-1b: a
Llama-3.2-1B-shaped random model (benchmarks/harness.py's SHAPES and random_llama) at
4 x 512 (--llama-1b-shape). The 1B rows need about 16 GB of memory and several minutes per dtype on 2 cores.

--reranker measures rerankers instead, on real (query, passage) pairs in each checkpoint's template
(bidir_export.verification.pair_batches) with the scores' error, max |s - s64| / max |s64|: the tiny reranker, the
--checkpoint reranker folders, and with --llama-1b a Llama-3.2-1B-shaped random reranker (the same random decoder
and a fresh head, normal(0, 0.02), avg pooling, NeMo's template). Each checkpoint is measured as what it is (an
embedder or a reranker), so --checkpoint takes either kind in both modes.

    python benchmarks/verification_error.py [--checkpoint trained=runs/demo/train/final] [--llama-1b]
        [--dtypes fp32,fp16,bf16] [--shape 4x128] [--json PATH]
    python benchmarks/verification_error.py --reranker --checkpoint reranker=runs/rr/final [--llama-1b]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from harness import SHAPES, random_llama

from bidir_core.checkpoint import EncoderConfig, write_checkpoint, write_reranker
from bidir_core.cross_encoder import new_score_head
from bidir_core.reranker_config import RerankerConfig
from bidir_core.sources import open_source
from bidir_core.testing import tiny_cross_encoder, tiny_encoder
from bidir_export.onnx_export import (
    NotVerifiable,
    export_onnx,
    fixed_batches,
    load_graph,
    onnxruntime_session,
    run_verification,
)
from bidir_export.verification import FACTOR, UNIT_ROUNDOFF, output_error, reference_outputs


def llama_1b_checkpoint(folder: Path, tokenizer_source: Path, reranker: bool = False) -> Path:
    """Random weights shaped like Llama-3.2-1B (normal(0, 0.02), norms at 1, as random_checkpoint.py), saved with
    the embedded default's tokenizer (token ids are drawn below the tokenizer's vocabulary anyway); with reranker,
    a reranker checkpoint: the same decoder and a fresh head (CrossEncoder's new_score_head, seed 0)."""
    from transformers import LlamaConfig

    from bidir_core.tokenization import load_tokenizer

    config = LlamaConfig(**SHAPES["llama-3.2-1b"])
    config.is_causal = False
    config.initializer_range = 0.02  # the head's std, as the decoder's weights
    model = random_llama(config, seed=0)
    tokenizer = load_tokenizer(tokenizer_source)
    if reranker:
        head = new_score_head(config, seed=0).weight.detach()
        return write_reranker(folder, model, head, tokenizer, RerankerConfig(max_length=512))
    write_checkpoint(folder, model, tokenizer, EncoderConfig(max_length=512))
    return folder


def measure(name: str, source, dtype: str, shape: tuple[int, int], work: Path) -> dict:
    """One row of the table: an embedder's or a reranker's export (as the checkpoint is) in dtype vs PyTorch."""
    out = work / f"{name}-{dtype}"
    manifest = export_onnx(source, out, dtype=dtype, verify=False, overwrite=True)
    reference = load_graph(open_source(source), with_dims=manifest.with_dims)
    row = {"model": name, "kind": manifest.kind, "dtype": dtype, "shape": f"{shape[0]}x{shape[1]}"}
    try:
        result = run_verification(out / manifest.model_file, manifest, reference, shape)
    except NotVerifiable:
        row.update(export_error=None, note="onnxruntime CPU has no kernel")
        # PyTorch's own error still tells what the rule would allow
        ref = reference_outputs(reference, fixed_batches(reference, manifest, shape), dtype)
        same, truth = torch.cat(ref.same_dtype), torch.cat(ref.float64)
        row["torch_error"] = output_error(same, truth) if torch.isfinite(same).all() else None
        return row
    row.update(
        torch_error=result.reference_error,
        export_error=result.error,
        bound=result.bound,
        passed=result.passed,
        max_abs_vs_fp64=result.max_abs_diff,
    )
    if dtype == "fp32":  # the old rule's figure: |onnxruntime - PyTorch fp32|
        session, _ = onnxruntime_session(out / manifest.model_file)
        worst = 0.0
        for b in fixed_batches(reference, manifest, shape):
            with torch.no_grad():
                want = reference(**b.feeds())
            got = session.run([manifest.output], {k: np.asarray(v) for k, v in b.feeds().items()})[0]
            worst = max(worst, float((torch.from_numpy(got) - want).abs().max()))
        row["old_rule_max_abs_vs_fp32"] = worst
    return row


def fmt(value, spec=".2e") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--checkpoint", action="append", default=[], help="NAME=PATH, a bidir checkpoint to measure"
    )
    ap.add_argument(
        "--llama-1b", action="store_true", help="also a Llama-3.2-1B-shaped random model at 4x512"
    )
    ap.add_argument("--no-default", action="store_true", help="skip the tiny model and the embedded default")
    ap.add_argument(
        "--reranker", action="store_true", help="rerankers: the tiny reranker, and --llama-1b as a reranker"
    )
    ap.add_argument("--llama-1b-shape", default="4x512", help="largest verification shape of the 1B model")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--shape", default="4x128", help="largest verification shape for the small models")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    shape = tuple(int(x) for x in args.shape.split("x"))
    shape_1b = tuple(int(x) for x in args.llama_1b_shape.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models: list[tuple[str, object, tuple[int, int]]] = []
        if not args.no_default and args.reranker:
            tiny = tiny_cross_encoder(RerankerConfig(temperature=0.5)).save_pretrained(work / "tiny-rr")
            models.append(("tiny reranker", tiny, (3, 40)))
        elif not args.no_default:
            tiny = work / "tiny-ckpt"
            enc = tiny_encoder()
            write_checkpoint(tiny, enc.model, enc.tokenizer, enc.config)
            models += [("tiny", tiny, (3, 40)), ("smollm2-135m untrained", "smollm2-135m", shape)]
        for spec in args.checkpoint:
            name, _, path = spec.partition("=")
            models.append((name, Path(path), shape))
        if args.llama_1b:
            from bidir_core.sources import resolve_source

            what = "reranker" if args.reranker else "model"
            folder = llama_1b_checkpoint(work / "1b", resolve_source("smollm2-135m"), reranker=args.reranker)
            models.append((f"llama-3.2-1b-shaped random {what}", folder, shape_1b))
        for name, source, model_shape in models:
            for dtype in dtypes:
                row = measure(name.replace(" ", "_"), source, dtype, model_shape, work)
                row["model"] = name
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nrule: error <= {FACTOR:g} x max(PyTorch error in dtype, unit roundoff {UNIT_ROUNDOFF})")
    print("error: embeddings max row ||x - x64|| / ||x64||; scores max |s - s64| / max |s64| over every pair")
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}\n"
    )
    print(
        "| model | dtype | largest shape | PyTorch in dtype vs fp64 | export vs fp64 | ratio | bound | verdict | old rule: max abs vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = None
        if r.get("export_error") is not None and r.get("torch_error"):
            ratio = r["export_error"] / r["torch_error"]
        verdict = r.get("note") or ("pass" if r.get("passed") else "FAIL")
        print(
            f"| {r['model']} | {r['dtype']} | {r['shape']} | {fmt(r.get('torch_error'))} | {fmt(r.get('export_error'))} "
            f"| {fmt(ratio, '.2f')} | {fmt(r.get('bound'))} | {verdict} | {fmt(r.get('old_rule_max_abs_vs_fp32'))} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
