"""What every benchmark here shares, once: where the data is, how a run is timed (warm-up and parity check first,
then interleaved runs and their medians), the environment record every JSON line carries, and the model shapes.

- ``data_file(prog, *parts)``: a file under the shared data folder (``BIDIR_DATA``, else ``../shared/data`` beside
  the repository), or exit with one line saying what is missing; ``cranfield_docs(prog)`` (~250 tokens each) and
  ``stsb_sentences(prog, split)`` (~15 tokens each); ``mixed_corpus(prog, n)``: the two, shuffled (the
  mixed-length inference corpus).
- ``agreement(got, want)`` and ``check(what, figures, ok, fail)``: how far a path is from the baseline on the
  warm-up batch, printed as ``WHAT: FIGURES: OK`` (or ``MISMATCH``, then exit: a fast wrong answer is no result).
- ``timed`` / ``interleaved`` / ``medians``: the runs of one round go back to back, round after round, so drift on
  a noisy machine hits every path alike; CUDA is synchronized around each run. ``gemm_flops(dtype, k, n)``: the
  FLOP/s torch.matmul reaches at a model's projection shapes, the ceiling a throughput is set against.
- ``environment()``, ``busy_cores()``, ``warn_if_busy()`` and ``append_jsonl(path, record)``: one record format.
- ``SHAPES``: the Llama-3.2-1B and SmolLM2-135M configurations for random-weight runs; ``random_llama(config)``.

Scripts here run as ``python benchmarks/NAME.py``, so benchmarks/ is on sys.path and ``import harness`` works.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from bidir_core.model import LlamaBidirectionalModel

# --- data --------------------------------------------------------------------------------------------------------


def data_dir() -> Path:
    """The shared data folder: $BIDIR_DATA, else ../shared/data next to the repository."""
    return Path(os.environ.get("BIDIR_DATA") or Path(__file__).resolve().parents[1].parent / "shared/data")


def data_file(prog: str, *parts: str) -> Path:
    """data_dir()/parts..., or exit with one line naming what is missing."""
    path = data_dir().joinpath(*parts)
    if not path.exists():
        sys.exit(
            f"{prog}: {path} not found (set BIDIR_DATA to the shared data folder, which holds {parts[0]}/)"
        )
    return path


def cranfield_docs(prog: str) -> list[str]:
    """The Cranfield abstracts, title + text (~250 tokens each, 1,400 of them), in file order."""
    docs = []
    for line in data_file(prog, "cranfield", "corpus.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        text = f"{row.get('title', '')} {row.get('text', '')}".strip()
        if text:
            docs.append(text)
    return docs


def stsb_sentences(prog: str, split: str = "train") -> list[str]:
    """Both sentence columns of an STS-B split (~15 tokens each), row by row."""
    tsv = data_file(prog, "stsb", f"sts-{split}.tsv")
    sentences = []
    for line in tsv.read_text(encoding="utf-8").splitlines()[1:]:
        cols = line.split("\t")
        sentences += [s for s in cols[1:3] if s.strip()]
    return sentences


def mixed_corpus(prog: str, limit: int, seed: int = 0) -> list[str]:
    """Cranfield abstracts (title + text, ~250 tokens) and STS-B train sentences (~15 tokens), about 28 % long
    documents (1,400 of 5,000), in a seeded shuffle: lengths vary row to row, as in a real corpus."""
    docs, sentences = cranfield_docs(prog), stsb_sentences(prog)
    n_docs = min(len(docs), round(limit * 0.28))
    texts = docs[:n_docs] + sentences[: limit - n_docs]
    random.Random(seed).shuffle(texts)
    return texts


# --- warm-up and parity ------------------------------------------------------------------------------------------


def agreement(got, want) -> dict[str, float]:
    """max |got - want| and the min / median row cosine of two (rows, dim) arrays or tensors."""
    a, b = (
        np.asarray(x.detach().float().cpu() if isinstance(x, torch.Tensor) else x, np.float64)
        for x in (got, want)
    )
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "max_abs_diff": float(np.abs(a - b).max()),
        "min_cosine": float(cos.min()),
        "median_cosine": float(np.median(cos)),
    }


def check(what: str, figures: str, ok: bool, fail: str) -> None:
    """Print ``what: figures: OK``; on a mismatch print ``MISMATCH`` and exit with `fail` (timing a wrong result
    is no result)."""
    print(f"{what}: {figures}: {'OK' if ok else 'MISMATCH'}", flush=True)
    if not ok:
        sys.exit(fail)


# --- timing ------------------------------------------------------------------------------------------------------


def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable, *args, device=None) -> tuple[float, object]:
    """(seconds, result) of run(*args); on CUDA the queue is drained before and after, so the time is the run's."""
    _sync(device)
    start = time.perf_counter()
    out = run(*args)
    _sync(device)
    return time.perf_counter() - start, out


def interleaved(
    runs: dict[str, Callable],
    rounds: Iterable[tuple],
    device=None,
    after: Callable[[int, str, float, object], None] | None = None,
) -> dict[str, list[float]]:
    """{name: seconds per round}: each round calls every run once with that round's arguments, back to back.
    after(round, name, seconds, result) sees each result (to print progress or check the first round)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i, args in enumerate(rounds):
        for name, run in runs.items():
            seconds, out = timed(run, *args, device=device)
            times[name].append(seconds)
            if after is not None:
                after(i, name, seconds, out)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def gemm_flops(
    dtype: torch.dtype,
    k: int,
    n: int,
    m: int = 4096,
    device="cpu",
    threads: int | None = None,
    repeats: int = 3,
) -> float:
    """Measured FLOP/s of torch.matmul (m, k) @ (k, n) at dtype on device (2 m k n FLOPs a run), the median of
    `repeats` runs after a warm-up; with `threads`, on that many CPU threads. At a model's projection shapes (m
    token rows, k = hidden, n = intermediate) it is the ceiling the model's matmuls can reach on this machine."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(m, k, generator=g, device=device).to(dtype)
        b = torch.randn(k, n, generator=g, device=device).to(dtype)
        torch.matmul(a, b)  # warm-up: the kernel choice and first-touch of the output
        seconds = [timed(torch.matmul, a, b, device=device)[0] for _ in range(repeats)]
    finally:
        torch.set_num_threads(before)
    return 2 * m * k * n / statistics.median(seconds)


# --- the environment record --------------------------------------------------------------------------------------

VERSIONED = ("torch", "transformers", "sentence-transformers", "onnxruntime", "tensorrt")


def busy_cores(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes while this one sleeps, from /proc/stat; 0.0 where unreadable."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return 0.0
    a = [int(v) for v in stat.read_text().split("\n")[0].split()[1:]]
    time.sleep(seconds)
    b = [int(v) for v in stat.read_text().split("\n")[0].split()[1:]]
    idle = (b[3] + b[4]) - (a[3] + a[4])  # idle + iowait jiffies
    return round((1 - idle / max(sum(b) - sum(a), 1)) * (os.cpu_count() or 1), 2)


def warn_if_busy() -> float:
    """busy_cores(), with a warning when other processes keep cores busy (on a small machine that skews every
    figure); returns the count for the record."""
    busy = busy_cores()
    if busy > 0.3:
        print(f"warning: {busy:.1f} cores busy with other processes; timings will be skewed")
    return busy


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform says."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), None
    )
    return name or platform.processor() or platform.machine()


def environment(busy_cores_start: float | None = None) -> dict:
    """{"time", "hardware", "versions"}: what every JSON line records about where it ran. With busy_cores_start (from
    warn_if_busy at the start), hardware also has it and busy_cores_end, measured now."""
    cuda = torch.cuda.is_available()
    hardware = {
        "device": "cuda" if cuda else "cpu",
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
        "cpu": cpu_name(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if busy_cores_start is not None:
        hardware |= {"busy_cores_start": busy_cores_start, "busy_cores_end": busy_cores()}
    versions = {"python": platform.python_version()}
    for dist in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):  # record what is installed
            versions[dist] = metadata.version(dist)
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hardware": hardware, "versions": versions}


def append_jsonl(path: Path | str, record: dict, say: bool = True) -> None:
    """Append one JSON line to path (parents made) and, with `say`, print where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if say:
        print(f"appended to {path}")


# --- model shapes for random-weight runs -------------------------------------------------------------------------

SHAPES = {
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=100000.0),
    ),
}


def random_llama(config, seed: int = 0) -> LlamaBidirectionalModel:
    """A LlamaBidirectionalModel of `config` with Llama's initialization: weights normal(0, 0.02), norms at 1
    (throughput and error studies depend on shapes and scale, not on trained values)."""
    torch.manual_seed(seed)
    model = LlamaBidirectionalModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model
