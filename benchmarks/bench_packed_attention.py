"""Packed attention kernels, one attention call: what bidir_core.packed_attention's "auto" choice rests on.

One packed batch of mixed lengths (--lengths, repeated --repeat times; default 32 texts of 12..250 tokens, the
short-sentence / long-abstract mix of the inference corpus), SmolLM2-135M's attention shape (9 heads of 64 after
the K/V heads are repeated), random q, k, v. Every kernel available on the device runs on it; each output is checked
against per-text SDPA first, then the kernels are timed interleaved (--rounds), medians and the ratio to the
fastest printed. FlexAttention runs compiled (its compile time printed apart) and, on CPU, uncompiled too.

    python benchmarks/bench_packed_attention.py [--dtype fp32|bf16] [--rounds 5] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import append_jsonl, check, environment, interleaved, medians

from bidir_core import packed_attention
from bidir_core.devices import default_device
from bidir_core.packed import pack
from bidir_core.packed_attention import PackedAttention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="20,15,250,30,12,200,18,22", help="comma-separated text lengths")
    ap.add_argument("--repeat", type=int, default=4, help="how many times the lengths repeat in the batch")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    lengths = [int(n) for n in args.lengths.split(",")] * args.repeat
    packed = pack([[1] * n for n in lengths]).to(device)
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 9, sum(lengths), 64, generator=g).to(device, DTYPES[args.dtype]) for _ in range(3)
    )
    spans = torch.tensor([0, *lengths]).cumsum(0).tolist()
    want = torch.cat(
        [
            F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
            for a, b in zip(spans[:-1], spans[1:], strict=True)
        ],
        dim=2,
    )
    kernels = ["gathered", "segments", "dense", "flex"]
    if device == "cuda":
        kernels.append("jagged")
        if importlib.util.find_spec("flash_attn") is not None and args.dtype != "fp32":
            kernels.append("varlen")  # flash-attn takes fp16 / bf16 only
    runs, compile_s = {}, {}
    for kernel in kernels:
        attend = PackedAttention(packed, kernel)
        t0 = time.perf_counter()
        got = attend(q, k, v)  # warm-up (compiles flex) and the check
        compile_s[kernel] = time.perf_counter() - t0
        diff = float((got.float() - want.float()).abs().max())
        check(
            kernel,
            f"max |diff| vs per-text SDPA {diff:.2e}",
            diff < (1e-4 if args.dtype == "fp32" else 3e-2),
            f"bench_packed_attention: the {kernel} kernel disagrees with per-text SDPA",
        )
        runs[kernel] = lambda attend=attend: attend(q, k, v)
    if device == "cpu":
        from torch.nn.attention.flex_attention import flex_attention

        eager = PackedAttention(packed, "flex")
        compiled = packed_attention._flex
        packed_attention._flex = lambda: flex_attention
        try:
            runs["flex eager"] = lambda: eager(q, k, v)
            with torch.no_grad():
                times = interleaved(runs, [()] * args.rounds, device=device)
        finally:
            packed_attention._flex = compiled
    else:
        times = interleaved(runs, [()] * args.rounds, device=device)
    med = medians(times)
    best = min(med, key=med.get)
    print(
        f"\n{device}, {args.dtype}, {len(lengths)} texts, {sum(lengths)} tokens, {torch.get_num_threads()} threads"
    )
    print(f"{'kernel':<12}{'median ms':>11}{'vs ' + best:>14}{'first call s':>14}")
    for name, s in med.items():
        print(f"{name:<12}{s * 1e3:>11.1f}{s / med[best]:>13.1f}x{compile_s.get(name, float('nan')):>14.2f}")
    print(f"fastest: {best}; the device's default (auto): {packed_attention.default_kernel(device)}")
    if args.json:
        record = {
            "benchmark": "bench_packed_attention",
            **environment(),
            "lengths": lengths,
            "dtype": args.dtype,
        }
        append_jsonl(args.json, record | {"median_s": med, "first_call_s": compile_s, "fastest": best})


if __name__ == "__main__":
    main()
