"""Training-step speed: bidir_train's step, padded, in sorted chunks and packed, vs sentence-transformers' MNRL step.

Same model (the embedded default checkpoint, which loads in sentence-transformers too), same rows, same batch, same
max length, same dtype (bf16 autocast on CPU, fp32 master weights), same optimizer (AdamW, lr 1e-5) and gradient
clipping, same loss (InfoNCE over positive, hard negatives and in-batch passages at temperature 0.02 = MNRL's
scale 50).

Data (--data, comma-separated):
- quality: the quality benchmark's training mixture (benchmarks/quality_data.py: SNLI triplets, MRPC paraphrases,
  STS-B pairs >= 4, from ../shared/data), in-batch negatives only (as benchmarks/recipes/quality_contrastive.yaml);
  short SNLI sentences beside long MRPC ones.
- stdlib: the embedded stdlib-docstrings train split (summary -> signature + docstring), in-batch negatives only.
- snli: SNLI (anchor, entailment, contradiction) triplets, 1 positive + 1 hard negative per query.

Paths:
- sentence-transformers: SentenceTransformer(checkpoint); per step model.tokenize() each column,
  MultipleNegativesRankingLoss(model, scale=50)(columns), backward, clip, AdamW step: the step its trainer runs,
  without the trainer's bookkeeping. Its own batches pad each column to that column's longest text.
- bidir padded: the step `bidir_train.trainer` runs with the default schedule: Collator, forward_backward (queries
  in one forward, passages in one more, each padded to its longest text), clip, AdamW step.
- bidir sorted chunks: the same with schedule.forward_chunk_size=--chunk (16: the quality recipe's): length-sorted
  chunks, each padded to its own longest text.
- bidir packed: the same with schedule.max_tokens_per_forward=--max-tokens: each forward one packed token stream, no
  padding (bidir_core.packed).

The first batch is the warm-up and the check: the four losses on it agree in fp32 (same weights and texts). Then steps
alternate between the paths (noise hits all alike); the table gives median seconds per step and real tokens/s (no
padding counted) and the ratios. With CUDA it also measures tokens/s/GPU and MFU of bidir's step on a random
Llama-3.2-1B-shaped model at sequence length 512: full-length rows, and mixed lengths padded vs packed.

    python benchmarks/bench_train_step.py [--data quality,stdlib] [--batch-size 32] [--max-length 64] [--steps 4]
                                          [--chunk 16] [--max-tokens 4096] [--threads N] [--json PATH]
    python benchmarks/bench_train_step.py --gpu-only      # the CUDA part alone (what gpu_suite.sh runs)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from harness import SHAPES, append_jsonl, check, data_dir, data_file, environment, interleaved, medians, timed

from bidir_core.datasets import read_training_examples, stdlib_train
from bidir_core.errors import BidirError
from bidir_core.sources import resolve_source
from bidir_train.contrastive import Collator, EpochSampler
from bidir_train.distributed import init_distributed
from bidir_train.loss import info_nce
from bidir_train.recipe import load_recipe
from bidir_train.step import Chunking, forward_backward
from bidir_train.weights import load_encoder

TEMPERATURE = 0.02
LR = 1e-5


def load_examples(name: str, tmp: Path) -> tuple[str, list, int]:
    """(description, training examples, hard negatives per query) of one --data choice."""
    if name == "snli":
        tsv = data_file("bench_train_step", "snli_pairs", "snli_triplets.tsv")
        return str(tsv), list(read_training_examples(tsv)), 1
    if name == "quality":
        from quality_data import write_training_rows

        rows = tmp / "quality_train.jsonl"
        counts = write_training_rows(data_dir(), rows)
        return f"quality mixture {counts}", list(read_training_examples(rows)), 0
    if name == "stdlib":
        return "stdlib-docstrings train", stdlib_train(), 0
    raise BidirError(f"unknown --data {name!r}: choose from quality, stdlib, snli")


def batches(examples, batch_size: int, steps: int, num_negatives: int):
    """steps + 1 batches (the first is the warm-up and check)."""
    sampler = EpochSampler(
        examples, global_batch_size=batch_size, num_negatives=num_negatives, seed=0, where="bench"
    )
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
        columns = [[qp + r.query for r in rows], [pp + r.positive for r in rows]]
        columns += [[pp + r.negatives[k] for r in rows] for k in range(len(rows[0].negatives))]
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

    def embed(self, ids, mask):  # (ids, mask) or (PackedBatch, None)
        mask = None if mask is None else mask.to(self.device)
        return self.encoder(ids.to(self.device), mask, normalize=False)

    def loss(self, q, p):
        return info_nce(q, p, num_negatives=p.shape[0] // q.shape[0] - 1, temperature=TEMPERATURE)

    def step(self, rows, forward_chunk=None, max_tokens=None, update=True) -> tuple[float, int]:
        return self.step_batch(
            self.collate(rows), dict(forward_chunk=forward_chunk, max_tokens=max_tokens), update
        )

    def step_batch(self, batch, kw: dict, update: bool = True) -> tuple[float, int]:
        forward_chunk, max_tokens = kw.get("forward_chunk"), kw.get("max_tokens")
        chunking = Chunking(forward_chunk=forward_chunk, max_tokens=max_tokens)
        loss = forward_backward(self.embed, self.loss, batch.groups, chunking=chunking)
        if update:
            torch.nn.utils.clip_grad_norm_(self.encoder.model.parameters(), 1.0)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss, batch.tokens


def bench_cpu(args) -> dict:
    import tempfile

    ckpt = resolve_source(args.model)
    _, device = init_distributed()
    # One bidir model for the three bidir paths: they differ only in how a micro-batch is cut into forwards.
    variants = {
        "bidir padded": {},
        "bidir sorted chunks": {"forward_chunk": args.chunk},
        "bidir packed": {"max_tokens": args.max_tokens},
    }
    record = {}
    for name in args.data.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            where, examples, negatives = load_examples(name.strip(), Path(tmp))
        data = batches(examples, args.batch_size, args.steps, negatives)
        # Fresh models per data set (the previous one's steps moved the weights, by different updates per path).
        ours = st = None
        ours = BidirPath(ckpt, args.max_length, args.dtype, device)
        prefixes = (ours.cfg.model.query_prefix, ours.cfg.model.passage_prefix)
        st = StPath(ckpt, args.max_length, args.dtype)
        # Warm-up and check, before any weight moves, in fp32 (bf16 rounding differs between padded and packed
        # kernels and between the two libraries, and InfoNCE at temperature 0.02 amplifies it): the same weights
        # and texts give the same loss on every path. Then one more warm-up step per path in the benchmark's dtype.
        autocast = ours.encoder.autocast_dtype
        ours.encoder.autocast_dtype, st.autocast = None, False
        exact = {path: ours.step(data[0], **kw, update=False)[0] for path, kw in variants.items()}
        exact["sentence-transformers"] = st.step(data[0], prefixes)
        ours.encoder.autocast_dtype, st.autocast = autocast, args.dtype == "bf16"
        ref = exact["bidir padded"]
        check(
            f"{name}: first-step loss, fp32",
            ", ".join(f"{k} {v:.5f}" for k, v in exact.items()),
            all(abs(v - ref) <= 1e-3 * max(abs(ref), 1.0) for v in exact.values()),
            "bench_train_step: the training steps disagree on the first loss",
        )
        for kw in variants.values():
            ours.step(data[0], **kw, update=False)
        st.step(data[0], prefixes)
        tokens = []  # real tokens per step (the same batches on every path)
        runs = {"sentence-transformers": lambda rows, st=st, pre=prefixes: st.step(rows, pre)}
        runs |= {path: (lambda rows, kw=kw, m=ours: m.step(rows, **kw)) for path, kw in variants.items()}
        times = interleaved(
            runs,
            [(rows,) for rows in data[1:]],
            after=lambda _, path, s, out, tokens=tokens: (
                tokens.append(out[1]) if path == "bidir packed" else None
            ),
        )
        med = medians(times)
        tok = statistics.median(tokens)
        tps = {k: tok / v for k, v in med.items()}
        ratios = {
            "packed_vs_sorted_chunks": tps["bidir packed"] / tps["bidir sorted chunks"],
            "packed_vs_padded": tps["bidir packed"] / tps["bidir padded"],
            "packed_vs_sentence_transformers": tps["bidir packed"] / tps["sentence-transformers"],
            "sorted_chunks_vs_sentence_transformers": tps["bidir sorted chunks"]
            / tps["sentence-transformers"],
        }
        print(
            f"\n{name} ({where}): CPU, {torch.get_num_threads()} threads, {args.dtype}, batch {args.batch_size} "
            f"queries x (1 pos + {negatives} neg), max length {args.max_length}, chunk {args.chunk} texts, packed "
            f"<= {args.max_tokens} tokens, {args.steps} timed steps, median real tokens/step {tok:.0f}"
        )
        print(f"{'path':<24}{'s/step':>10}{'tokens/s':>12}")
        for k in times:
            print(f"{k:<24}{med[k]:>10.3f}{tps[k]:>12.1f}")
        print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
        record[name] = {
            "data": where,
            "num_negatives": negatives,
            "seconds": times,
            "median_s": med,
            "tokens_per_s": tps,
            "ratios": ratios,
            "first_loss_fp32": exact,
        }
    return record


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
        forward_backward(ours.embed, ours.loss, batch.groups)
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
    mixed = bench_gpu_mixed(args, ours, n_params, peak, tokenizer.vocab_size)
    return {
        "gpu": name,
        "step_s": step_s,
        "tokens_per_s_per_gpu": tokens / step_s,
        "mfu": model_flops / (peak * 1e12) if peak else None,
        "hardware_flops_per_s": achieved,
        "hfu": mfu,
        "batch": B,
        "checkpointing": args.checkpointing,
        "mixed": mixed,
    }


def _median_step(ours: BidirPath, batch, steps: int, **kw) -> float:
    """Median seconds of a full step (forward, backward, clip, AdamW) after 2 warm-up steps, CUDA synchronized."""
    device = ours.device
    times = []
    for i in range(steps + 2):
        seconds, _ = timed(ours.step_batch, batch, kw, device=device)
        if i >= 2:
            times.append(seconds)
    return statistics.median(times)


def bench_gpu_mixed(args, ours: BidirPath, n_params: int, peak, vocab: int) -> dict:
    """The same step on mixed lengths (uniform 32..512 tokens, seeded): padded (each side one forward padded to its
    longest text) vs packed (schedule.max_tokens_per_forward=--gpu-max-tokens). tokens/s counts real tokens; MFU
    counts the model FLOPs of real tokens only (attention per text: 12 x layers x hidden x L_i^2, forward and
    backward), so padding earns nothing."""
    from bidir_core.batching import pad_batch
    from bidir_core.packed_attention import default_kernel
    from bidir_train.contrastive import MicroBatch

    B, cfg = args.gpu_batch_size, ours.encoder.model.config
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(32, 513, (3 * B,), generator=g).tolist()
    rows = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    (q_ids, q_mask), (p_ids, p_mask) = pad_batch(rows[:B], 0), pad_batch(rows[B:], 0)
    keys = torch.arange(2 * B)
    batch = MicroBatch(q_ids, q_mask, p_ids, p_mask, keys, keys[::2, None], sum(lengths), 0)
    tokens = sum(lengths)
    flops = 6 * n_params * tokens + 12 * cfg.num_hidden_layers * cfg.hidden_size * sum(n * n for n in lengths)
    out = {"lengths": lengths, "real_tokens": tokens, "kernel": default_kernel(ours.device)}
    for label, kw in (("padded", {}), ("packed", {"max_tokens": args.gpu_max_tokens})):
        step_s = _median_step(ours, batch, args.steps, **kw)
        out[label] = {
            "step_s": step_s,
            "tokens_per_s_per_gpu": tokens / step_s,
            "mfu": flops / step_s / (peak * 1e12) if peak else None,
        }
        mfu = f", MFU {out[label]['mfu']:.1%}" if peak else ""
        print(
            f"mixed lengths 32..512, {label}: median step {step_s:.3f}s, {tokens / step_s:,.0f} real tokens/s/GPU{mfu}"
        )
    out["packed_vs_padded"] = out["padded"]["step_s"] / out["packed"]["step_s"]
    print(f"packed / padded on mixed lengths: {out['packed_vs_padded']:.2f}x ({out['kernel']} kernel)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="checkpoint folder or smollm2-135m (default)")
    ap.add_argument("--data", default="quality,stdlib", help="comma-separated: quality, stdlib, snli")
    ap.add_argument("--batch-size", type=int, default=32, help="queries per step (each with its passages)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16, help="bidir sorted chunks: texts per forward")
    ap.add_argument("--max-tokens", type=int, default=4096, help="bidir packed: real tokens per forward")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per path; the median is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    ap.add_argument("--gpu-batch-size", type=int, default=16, help="GPU part: queries per step")
    ap.add_argument("--gpu-max-tokens", type=int, default=16384, help="GPU part: packed tokens per forward")
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
        "chunk": args.chunk,
        "max_tokens": args.max_tokens,
        "dtype": args.dtype,
        **record,
    }
    if args.json:
        append_jsonl(args.json, record, say=False)


if __name__ == "__main__":
    main()
