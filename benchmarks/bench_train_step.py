"""Training-step speed: bidir_train's step vs sentence-transformers' MultipleNegativesRankingLoss step.

Same model (the embedded default checkpoint, which loads in sentence-transformers too), same data (SNLI
(anchor, entailment, contradiction) triplets from ../shared/data/snli_pairs/snli_triplets.tsv: 1 positive + 1 hard
negative per query), same batch, same max length, same dtype (bf16 autocast on CPU, fp32 master weights), same
optimizer (AdamW, lr 1e-5) and gradient clipping, same loss (InfoNCE over positive, hard negative and in-batch
passages at temperature 0.02 = MNRL's scale 50).

- sentence-transformers: SentenceTransformer(checkpoint); per step model.tokenize() the queries and the passages,
  MultipleNegativesRankingLoss(model, scale=50)([q, pos, neg]), backward, clip, AdamW step: the training step its
  trainer runs, without the trainer's bookkeeping.
- bidir_train: the step `bidir_train.trainer` runs: its encoder (load_encoder; one CPU process: unsharded), Collator,
  forward_backward (queries in one forward, positives + negatives in one more), clip, AdamW step.

Each step's first batch checks that the two losses agree (same weights and texts). Steps alternate between the two
paths (noise hits both alike); the table gives median seconds per step and tokens/s (real tokens, no padding) and
the ratio (> 1: bidir faster). With CUDA it also measures tokens/s/GPU and MFU of bidir's step on a random
Llama-3.2-1B-shaped model at sequence length 512.

    python benchmarks/bench_train_step.py [--batch-size 8] [--max-length 64] [--steps 5] [--threads N] [--json PATH]
    python benchmarks/bench_train_step.py --gpu-only      # the CUDA part alone (what gpu_suite.sh runs)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from harness import SHAPES, append_jsonl, check, data_file, environment, interleaved, medians

from bidir_core.datasets import read_training_examples
from bidir_core.errors import BidirError
from bidir_core.sources import resolve_source
from bidir_train.contrastive import Collator, EpochSampler, forward_backward
from bidir_train.distributed import init_distributed
from bidir_train.loss import info_nce
from bidir_train.recipe import load_recipe
from bidir_train.weights import load_encoder

TEMPERATURE = 0.02
LR = 1e-5


def load_triplets():
    tsv = data_file("bench_train_step", "snli_pairs", "snli_triplets.tsv")
    return tsv, list(read_training_examples(tsv))


def batches(examples, batch_size: int, steps: int):
    """steps + 1 batches (the first is the warm-up and check), 1 positive + 1 negative each."""
    sampler = EpochSampler(examples, global_batch_size=batch_size, num_negatives=1, seed=0, where="snli")
    return [sampler.rows(0, i) for i in range(steps + 1)]


class StPath:
    def __init__(self, ckpt: Path, max_length: int, dtype: str):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.losses import MultipleNegativesRankingLoss

        self.model = SentenceTransformer(str(ckpt), device="cpu")
        self.model.max_seq_length = max_length
        self.model.train()
        self.loss = MultipleNegativesRankingLoss(self.model, scale=1 / TEMPERATURE)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.01)
        self.autocast = dtype == "bf16"

    def step(self, rows, prefixes: tuple[str, str]) -> float:
        qp, pp = prefixes
        columns = [
            [qp + r.query for r in rows],
            [pp + r.positive for r in rows],
            [pp + r.negatives[0] for r in rows],
        ]
        features = [self.model.tokenize(c) for c in columns]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class BidirPath:
    def __init__(self, ckpt: Path, max_length: int, dtype: str, device: torch.device, recipe_overrides=()):
        self.cfg = load_recipe(
            "default",
            [
                f"model.path={ckpt}",
                f"model.query_max_length={max_length}",
                f"model.passage_max_length={max_length}",
                f"model.precision={dtype}",
                *recipe_overrides,
            ],
        )
        self.device = device
        self.encoder = load_encoder(self.cfg, device)
        m = self.cfg.model
        self.collate = Collator(
            self.encoder.tokenizer,
            query_prefix=m.query_prefix,
            passage_prefix=m.passage_prefix,
            query_max=m.query_max_length,
            passage_max=m.passage_max_length,
        )
        self.opt = torch.optim.AdamW(
            self.encoder.model.parameters(), lr=LR, weight_decay=0.01, fused=device.type == "cuda"
        )

    def embed(self, ids, mask):
        return self.encoder(ids.to(self.device), mask.to(self.device), normalize=False)

    def loss(self, q, p, batch):
        return info_nce(q, p, num_negatives=1, temperature=TEMPERATURE)

    def step(self, rows) -> tuple[float, int]:
        batch = self.collate(rows)
        loss = forward_backward(self.embed, self.loss, batch)
        torch.nn.utils.clip_grad_norm_(self.encoder.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss, batch.tokens


def bench_cpu(args) -> dict:
    tsv, examples = load_triplets()
    ckpt = resolve_source(args.model)
    _, device = init_distributed()
    ours = BidirPath(ckpt, args.max_length, args.dtype, device)
    prefixes = (ours.cfg.model.query_prefix, ours.cfg.model.passage_prefix)
    st = StPath(ckpt, args.max_length, args.dtype)
    data = batches(examples, args.batch_size, args.steps)
    # Warm-up and check: both start from the same weights, so the first losses agree (bf16: loosely).
    first_st = st.step(data[0], prefixes)
    first_ours, _ = ours.step(data[0])
    check(
        "first-step loss",
        f"sentence-transformers {first_st:.4f}, bidir {first_ours:.4f}",
        abs(first_st - first_ours) <= (1e-3 if args.dtype == "fp32" else 0.05) * max(abs(first_st), 1.0),
        "bench_train_step: the two training steps disagree on the first loss",
    )
    tokens = []  # real tokens per bidir step (the same batches on both paths)
    runs = {"sentence-transformers": lambda rows: st.step(rows, prefixes), "bidir_train": ours.step}
    times = interleaved(
        runs,
        [(rows,) for rows in data[1:]],
        after=lambda _, name, s, out: tokens.append(out[1]) if name == "bidir_train" else None,
    )
    med = medians(times)
    tok = statistics.median(tokens)
    tps = {k: tok / s for k, s in med.items()}
    ratio = tps["bidir_train"] / tps["sentence-transformers"]
    print(
        f"\nCPU, {torch.get_num_threads()} threads, {args.dtype}, batch {args.batch_size} queries x (1 pos + 1 neg), "
        f"max length {args.max_length}, {args.steps} timed steps, median real tokens/step {tok:.0f}"
    )
    print(f"{'path':<24}{'s/step':>10}{'tokens/s':>12}")
    for k in times:
        print(f"{k:<24}{med[k]:>10.3f}{tps[k]:>12.1f}")
    print(f"ratio bidir_train / sentence-transformers: {ratio:.2f}x")
    return {
        "data": str(tsv),
        "seconds": times,
        "median_s": med,
        "tokens_per_s": tps,
        "ratio": ratio,
        "first_loss": {"sentence-transformers": first_st, "bidir_train": first_ours},
    }


# Dense bf16 tensor-core peaks (FLOP/s) for MFU; pass --peak-tflops for other GPUs.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def bench_gpu(args) -> dict:
    """tokens/s/GPU and MFU of bidir's step on a random Llama-3.2-1B-shaped model, seq 512 (1 GPU)."""
    import tempfile

    from bidir_core.testing import tiny_tokenizer, write_hf_llama

    _, device = init_distributed()
    folder = Path(tempfile.mkdtemp()) / "llama-1b-shaped"
    write_hf_llama(folder, causal_lm=False, **SHAPES["llama-3.2-1b"])
    overrides = [
        f"parallel.activation_checkpointing={str(args.checkpointing).lower()}",
        "parallel.compile=" + str(args.compile).lower(),
    ]
    ours = BidirPath(folder, 512, "bf16", device, overrides)
    tokenizer = tiny_tokenizer()
    g = torch.Generator().manual_seed(0)
    B = args.gpu_batch_size
    cfg = ours.encoder.model.config
    n_params = sum(p.numel() for p in ours.encoder.model.parameters()) - cfg.vocab_size * cfg.hidden_size
    # Full-length rows: every text is 512 real tokens, so MFU is not flattered or hurt by padding.
    ids = torch.randint(3, tokenizer.vocab_size, (B * 3, 512), generator=g)
    mask = torch.ones_like(ids)
    from bidir_train.contrastive import MicroBatch

    batch = MicroBatch(
        ids[:B],
        mask[:B],
        ids[B:],
        mask[B:],
        torch.arange(2 * B),
        torch.arange(0, 2 * B, 2)[:, None],
        3 * B * 512,
        0,
    )
    times = []
    for i in range(args.steps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        forward_backward(ours.embed, ours.loss, batch)
        torch.nn.utils.clip_grad_norm_(ours.encoder.model.parameters(), 1.0)
        ours.opt.step()
        ours.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = 3 * B * 512
    # 6 N per token for the matmuls (forward 2N, backward 4N), plus bidirectional attention: QK^T and AV are
    # 2 * T * d FLOPs each per token and layer forward, x3 with backward (no causal halving).
    flops_per_token = 6 * n_params + 12 * cfg.num_hidden_layers * 512 * cfg.hidden_size
    if args.checkpointing:
        flops_per_token += (
            2 * n_params + 4 * cfg.num_hidden_layers * 512 * cfg.hidden_size
        )  # the recomputed forward
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    achieved = tokens * flops_per_token / step_s
    mfu = achieved / (peak * 1e12) if peak else None
    # MFU conventionally counts the model's FLOPs, not the recomputation: report both.
    model_flops = tokens * (6 * n_params + 12 * cfg.num_hidden_layers * 512 * cfg.hidden_size) / step_s
    print(
        f"\nGPU {name}: Llama-3.2-1B-shaped ({n_params / 1e9:.2f}B non-embedding params), bf16, seq 512, "
        f"{B} queries + {2 * B} passages per step, activation checkpointing {args.checkpointing}"
    )
    print(
        f"median step {step_s:.3f}s, {tokens / step_s:,.0f} tokens/s/GPU, "
        f"MFU {model_flops / (peak * 1e12):.1%}"
        if peak
        else "MFU: unknown GPU peak (pass --peak-tflops)"
    )
    return {
        "gpu": name,
        "step_s": step_s,
        "tokens_per_s_per_gpu": tokens / step_s,
        "mfu": model_flops / (peak * 1e12) if peak else None,
        "hardware_flops_per_s": achieved,
        "hfu": mfu,
        "batch": B,
        "checkpointing": args.checkpointing,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="checkpoint folder or smollm2-135m (default)")
    ap.add_argument("--batch-size", type=int, default=8, help="queries per step (each with 1 pos + 1 neg)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per path; the median is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    ap.add_argument("--gpu-batch-size", type=int, default=16, help="GPU part: queries per step")
    ap.add_argument("--checkpointing", action="store_true", help="GPU part: activation checkpointing")
    ap.add_argument("--compile", action="store_true", help="GPU part: torch.compile each layer")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU part: the GPU's dense bf16 peak")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line with all figures")
    ap.add_argument(
        "--gpu-only", action="store_true", help="only the GPU part (random weights: no model or data needed)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        record = {} if args.gpu_only else {"cpu": bench_cpu(args)}
        if torch.cuda.is_available():
            record["gpu"] = bench_gpu(args)
        else:
            print("\nno CUDA: the GPU part (tokens/s/GPU, MFU at seq 512) was not run")
    except BidirError as e:
        sys.exit(f"bench_train_step: {e}")
    record = {
        "benchmark": "bench_train_step",
        **environment(),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "dtype": args.dtype,
        **record,
    }
    if args.json:
        append_jsonl(args.json, record, say=False)


if __name__ == "__main__":
    main()
