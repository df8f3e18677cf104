"""LoRA vs full fine-tuning: bidir_train's training step on the embedded default, both ways, in the same run.

Same model, data (SNLI triplets from ../shared/data/snli_pairs, 1 positive + 1 hard negative per query), batches,
max length and dtype as benchmarks/bench_train_step.py (whose bidir step, BidirPath, this reuses); the optimizer is
the trainer's own (bidir_train.optim.make_optimizer: fused AdamW over the trainable parameters only). Steps
alternate between the two paths (noise hits both alike). Reported per path: trainable parameters, the training
state a step keeps (parameters + gradients + AdamW state, counted from the tensors), median s/step, and peak memory
(CUDA: peak allocated during a step; CPU: peak RSS during the steps of a child process that runs that path alone
(Linux), as a process's peak cannot be split between two models), and the LoRA / full ratios.

    python benchmarks/bench_lora_step.py [--lora-rank 16] [--batch-size 8] [--max-length 64] [--steps 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from bench_train_step import BidirPath, batches, load_examples
from harness import append_jsonl, check, environment, interleaved, medians

from bidir_core.errors import BidirError
from bidir_core.sources import resolve_source
from bidir_train.distributed import init_distributed


def _state_bytes(model, optimizer) -> int:
    """Bytes of the training state a step keeps: every parameter, a gradient per trainable one, AdamW's state."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    return params + grads + state


def _lora_path(ckpt: Path, args, device, lora_rank: int | None):
    """BidirPath, fully fine-tuned or with LoRA adapters of rank lora_rank, with the trainer's own optimizer
    (fused AdamW over the trainable parameters only)."""
    from bidir_train.optim import make_optimizer

    overrides = [f"lora.rank={lora_rank}", f"lora.alpha={2 * lora_rank}"] if lora_rank else []
    path = BidirPath(ckpt, args.max_length, args.dtype, device, overrides)
    path.opt = make_optimizer(path.cfg.optim, path.encoder.model)
    return path


def _peak_rss_child(args) -> None:
    """--peak-of: load one path alone, then print the peak RSS (MB) of its training steps: after loading, the
    memory the loader freed is given back (malloc_trim) and the kernel's high-water mark reset (clear_refs 5),
    so the peak is the model, its training state and the step's activations, not the checkpoint loader's."""
    import ctypes
    import gc

    _, examples, negatives = load_examples("snli", Path.cwd())  # SNLI triplets: nothing is written
    _, device = init_distributed()
    rank = None if args.peak_of == "full" else args.lora_rank
    path = _lora_path(resolve_source(args.model), args, device, rank)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    for rows in batches(examples, args.batch_size, args.steps, negatives):
        path.step(rows)
    status = Path("/proc/self/status").read_text()
    peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    print(f"peak_rss_mb {peak_kb / 1024:.1f}")


def _peak_rss(args, which: str) -> float:
    """Peak RSS (MB) of a process that runs one path alone (on CPU the only honest per-path peak)."""
    import subprocess

    cmd = [sys.executable, __file__, "--peak-of", which, "--model", args.model]
    cmd += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--dtype", args.dtype]
    cmd += ["--steps", str(args.steps), "--lora-rank", str(args.lora_rank)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.split("peak_rss_mb")[-1])


def bench_lora(args) -> dict:
    """LoRA vs full fine-tuning, bidir's step on both (same model, data and batches, interleaved): trainable
    parameters, training state (parameters + gradients + AdamW state), median s/step, peak memory (CUDA: peak
    allocated in the step; CPU: peak RSS of a process running that path alone)."""
    _, examples, negatives = load_examples("snli", Path.cwd())  # SNLI triplets: nothing is written
    ckpt = resolve_source(args.model)
    _, device = init_distributed()
    paths = {
        "full": _lora_path(ckpt, args, device, None),
        f"lora r={args.lora_rank}": _lora_path(ckpt, args, device, args.lora_rank),
    }
    data = batches(examples, args.batch_size, args.steps, negatives)
    # Warm-up and check: LoRA's B starts at zero, so both paths start as the same model and agree on the first loss.
    first = {name: path.step(data[0])[0] for name, path in paths.items()}
    a, b = first.values()
    check(
        "first-step loss",
        ", ".join(f"{name} {loss:.4f}" for name, loss in first.items()),
        abs(a - b) <= (1e-4 if args.dtype == "fp32" else 0.05) * max(abs(a), 1.0),
        "bench_lora_step: full and LoRA disagree on the first loss (they start from the same weights)",
    )
    peaks: dict[str, list[int]] = {name: [] for name in paths}

    def run(name):
        def step(rows):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            out = paths[name].step(rows)
            if device.type == "cuda":
                peaks[name].append(torch.cuda.max_memory_allocated(device))
            return out

        return step

    times = interleaved({name: run(name) for name in paths}, [(rows,) for rows in data[1:]], device=device)
    med = medians(times)
    full, lora_name = "full", f"lora r={args.lora_rank}"
    rows = {}
    for name, path in paths.items():
        model = path.encoder.model
        peak = (
            max(peaks[name]) / 2**20 if peaks[name] else _peak_rss(args, "full" if name == full else "lora")
        )
        rows[name] = {
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters()),
            "train_state_mb": _state_bytes(model, path.opt) / 2**20,
            "s_per_step": med[name],
            "peak_mb": peak,
            "peak_kind": "cuda max_memory_allocated" if peaks[name] else "peak RSS of its steps, own process",
            "first_loss": first[name],
        }
    print(
        f"\nLoRA vs full fine-tuning, bidir step, {device.type}, {args.dtype}, batch {args.batch_size} x (1 pos + 1 neg), "
        f"max length {args.max_length}, {args.steps} timed steps (interleaved), medians"
    )
    print(f"{'path':<12}{'trainable':>14}{'of total':>10}{'state MB':>10}{'s/step':>9}{'peak MB':>10}")
    for name, r in rows.items():
        share = r["trainable_params"] / r["total_params"]
        print(
            f"{name:<12}{r['trainable_params']:>14,}{share:>10.2%}{r['train_state_mb']:>10.0f}"
            f"{r['s_per_step']:>9.3f}{r['peak_mb']:>10.0f}"
        )
    print(f"peak memory: {rows[full]['peak_kind']}")
    print(
        f"ratio lora / full: s/step {rows[lora_name]['s_per_step'] / rows[full]['s_per_step']:.2f}x, "
        f"state {rows[lora_name]['train_state_mb'] / rows[full]['train_state_mb']:.2f}x, "
        f"peak {rows[lora_name]['peak_mb'] / rows[full]['peak_mb']:.2f}x"
    )
    return {"rank": args.lora_rank, "seconds": times, "paths": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="checkpoint folder or smollm2-135m (default)")
    ap.add_argument("--lora-rank", type=int, default=16, help="the adapters' rank (alpha = 2 x rank)")
    ap.add_argument("--batch-size", type=int, default=8, help="queries per step (each with 1 pos + 1 neg)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per path; the median is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line with all figures")
    ap.add_argument("--peak-of", choices=("full", "lora"), help=argparse.SUPPRESS)  # the peak-RSS child
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.peak_of:
            return _peak_rss_child(args)
        record = bench_lora(args)
    except BidirError as e:
        sys.exit(f"bench_lora_step: {e}")
    if args.json:
        record = {"benchmark": "bench_lora_step", **environment(), "batch_size": args.batch_size,
                  "max_length": args.max_length, "dtype": args.dtype, **record}  # fmt: skip
        append_jsonl(args.json, record, say=False)


if __name__ == "__main__":
    main()
