"""Inference throughput at production shapes: bidir's forward vs transformers' LlamaModel, same random weights.

Shapes (random weights; throughput depends on shapes, not values):

- llama-3.2-1b:   the Llama-3.2-1B config (hidden 2048, 16 layers, 32 heads / 8 KV, vocab 128256, llama3 RoPE)
- smollm2-135m:   the embedded default's config (hidden 576, 30 layers, 9 heads / 3 KV)

Each runs a full (B, S) batch of random token ids, half the rows right-padded to S/2 so the padding mask is real,
through (a) transformers `LlamaModel` (is_causal false, sdpa) + masked mean + normalize and (b) bidir's
`BiEncoder.forward` (SDPA with a padding mask, avg pooling, normalize), in bf16 on CUDA. Warm-up, then
--repeats timed runs interleaved; medians, tokens/s (real tokens) and the ratio (> 1: bidir faster). Without CUDA
it prints the rows as skipped: at these shapes a CPU run says nothing about a GPU.

    python benchmarks/bench_inference_shapes.py [--batch 64] [--seq 512] [--repeats 10] [--json PATH]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import transformers
from harness import SHAPES, agreement, append_jsonl, environment, interleaved, medians
from transformers import LlamaConfig, LlamaModel

from bidir_core.devices import default_device
from bidir_core.encoder import BiEncoder
from bidir_core.model import LlamaBidirectionalModel


def bench_shape(name: str, batch: int, seq: int, repeats: int, device: torch.device) -> dict:
    config = LlamaConfig(**SHAPES[name], attn_implementation="sdpa")
    config.is_causal = False
    torch.manual_seed(0)
    ours = LlamaBidirectionalModel(config).to(device=device, dtype=torch.bfloat16).eval()
    encoder = BiEncoder(ours, tokenizer=None)
    theirs = LlamaModel(config).to(device=device, dtype=torch.bfloat16).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)

    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    mask[batch // 2 :, seq // 2 :] = 0  # half the rows padded to half length
    tokens = int(mask.sum())

    def run_theirs():
        hidden = theirs(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        m = mask.unsqueeze(-1).float()
        return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)

    def run_ours():
        return encoder(ids, mask)

    with torch.inference_mode():
        cosine = agreement(run_theirs(), run_ours())["min_cosine"]  # the first run of each: also a warm-up
        for _ in range(2):
            run_theirs(), run_ours()
        times = interleaved({"transformers": run_theirs, "bidir": run_ours}, [()] * repeats, device=device)
    med = medians(times)
    return {
        "shape": name,
        "batch": batch,
        "seq": seq,
        "real_tokens": tokens,
        "min_cosine_vs_transformers": cosine,
        "transformers_s": med["transformers"],
        "bidir_s": med["bidir"],
        "transformers_tokens_per_s": tokens / med["transformers"],
        "bidir_tokens_per_s": tokens / med["bidir"],
        "ratio": med["transformers"] / med["bidir"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--json", help="append one JSON line per shape here")
    ap.add_argument(
        "--cpu", action="store_true", help="run on CPU anyway (to check the script, small shapes)"
    )
    args = ap.parse_args()

    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    if not torch.cuda.is_available() and not args.cpu:
        for name in args.shapes.split(","):
            print(
                f"{name:14s} {args.batch}x{args.seq} bf16: skipped (no CUDA; this benchmark measures GPUs only)"
            )
        return
    device = torch.device(default_device())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{gpu}, bf16, sdpa, batch {args.batch} x seq {args.seq} (half the rows padded to half length)")
    print(f"{'shape':14s} {'transformers tok/s':>19s} {'bidir tok/s':>12s} {'ratio':>6s} {'min cos':>8s}")
    for name in args.shapes.split(","):
        row = bench_shape(name, args.batch, args.seq, args.repeats, device)
        print(
            f"{name:14s} {row['transformers_tokens_per_s']:19,.0f} {row['bidir_tokens_per_s']:12,.0f}"
            f" {row['ratio']:5.2f}x {row['min_cosine_vs_transformers']:8.5f}"
        )
        if args.json:
            append_jsonl(
                args.json, {"benchmark": "bench_inference_shapes", **environment(), **row}, say=False
            )


if __name__ == "__main__":
    main()
