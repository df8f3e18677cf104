"""Quality baselines: the starting line that training must beat.

Three systems on three tasks, all scored by bidir_core.evaluation (the same metrics bidir-eval reports):

- BM25:          rank_bm25's BM25Okapi over lowercase word tokens (\\w+): bidir_core.bm25 for retrieval, bm25.py
                 for STS, where it is the BM25 score of each sentence against the other (both directions
                 averaged) over an index of all STS sentences.
- bidir:         the embedded default SmolLM2-135M loaded bidirectionally (BiEncoder.from_pretrained), untrained
                 as an embedder: avg pooling, L2-normalized, "query: " / "passage: " prefixes.
- causal (HF):   the same weights through transformers' AutoModel with is_causal=True (the model as it was
                 pre-trained), the same tokens (bidir's tokenizer and padding), prefixes and masked mean pooling.

Tasks: Cranfield (../shared/data/cranfield, graded qrels, nDCG@10), STS-B dev (Spearman of cosine) and the
stdlib-docstrings dev split (nDCG@10). The limits below keep a CPU run to minutes; with a limit, the Cranfield corpus
is the judged documents of the kept queries plus the first other documents up to --cranfield-docs, and BM25 is also
reported on the full collection as a sanity check (its README: BM25 nDCG@10 = 0.320).

    python benchmarks/quality_baselines.py --cranfield-queries 100 --cranfield-docs 400 --sts-limit 500 \\
        --json runs/quality_baselines.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from bm25 import bm25_sts
from harness import data_file, environment
from quality_data import limit_retrieval

from bidir_core.batching import length_sorted_batches, pad_batch
from bidir_core.bm25 import evaluate_bm25
from bidir_core.datasets import RetrievalDataset, load_retrieval, read_sts
from bidir_core.embedded import embedded_checkpoint
from bidir_core.encoder import BiEncoder
from bidir_core.evaluation import evaluate_retrieval, evaluate_sts
from bidir_core.tokenization import tokenize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class CausalEncoder(torch.nn.Module):
    """transformers' LlamaModel with its causal mask, behind BiEncoder's encode_queries / encode_documents, so the
    same evaluation code scores it. Tokens, prefixes, pooling (masked mean) and normalization match BiEncoder."""

    def __init__(self, folder: Path, reference: BiEncoder, dtype: torch.dtype):
        super().__init__()
        self.model = transformers.AutoModel.from_pretrained(folder, is_causal=True, dtype=dtype).eval()
        self.tokenizer, self.config = reference.tokenizer, reference.config

    def encode(self, texts, batch_size=32, normalize=True, dim=None, **_):
        ids, _ = tokenize(self.tokenizer, list(texts), self.config.max_length)
        out = np.zeros((len(ids), dim or self.model.config.hidden_size), dtype=np.float32)
        for batch in length_sorted_batches([len(r) for r in ids], batch_size):
            input_ids, mask = pad_batch([ids[i] for i in batch], self.tokenizer.pad_token_id)
            hidden = self.model(
                input_ids=input_ids, attention_mask=mask
            ).last_hidden_state.float()  # (B, T, H)
            emb = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(
                min=1
            )  # masked mean (B, H)
            emb = emb[:, :dim] if dim else emb
            out[batch] = (F.normalize(emb, dim=-1) if normalize else emb).numpy()
        return out

    def encode_queries(self, texts, **kwargs):
        return self.encode([self.config.query_prefix + t for t in texts], **kwargs)

    def encode_documents(self, texts, **kwargs):
        return self.encode([self.config.passage_prefix + t for t in texts], **kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cranfield-queries", type=int, help="keep the first N Cranfield queries (default: all 225)"
    )
    p.add_argument("--cranfield-docs", type=int, help="Cranfield corpus size (default: all 1400)")
    p.add_argument("--sts-limit", type=int, help="first N STS-B dev pairs (default: all 1500)")
    p.add_argument("--stdlib-limit", type=int, help="first N stdlib dev queries (and their passages)")
    p.add_argument(
        "--max-length", type=int, default=128, help="max tokens per text for the models (default 128)"
    )
    p.add_argument(
        "--dtype", choices=DTYPES, default="bf16", help="model dtype (default bf16: 2-3x faster on CPU)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cranfield_full = load_retrieval(data_file("quality_baselines", "cranfield"))
    tasks = {
        "cranfield": limit_retrieval(cranfield_full, args.cranfield_queries, args.cranfield_docs),
        "stsb-dev": read_sts(data_file("quality_baselines", "stsb", "sts-dev.tsv"))[: args.sts_limit],
        "stdlib-dev": limit_retrieval(
            load_retrieval("stdlib-docstrings"), args.stdlib_limit, args.stdlib_limit
        ),
    }
    dtype = DTYPES[args.dtype]
    bidir = BiEncoder.from_pretrained("smollm2-135m", max_length=args.max_length, dtype=dtype)
    systems = {
        "BM25": None,
        "bidir (untrained)": bidir,
        "causal (HF)": CausalEncoder(embedded_checkpoint(), bidir, dtype),
    }

    results = {}
    for system, encoder in systems.items():
        for task, data in tasks.items():
            start = time.perf_counter()
            if encoder is None:
                metrics = bm25_sts(data) if task == "stsb-dev" else evaluate_bm25(data)
            elif task == "stsb-dev":
                metrics = evaluate_sts(encoder, data, batch_size=args.batch_size)
            else:
                metrics = evaluate_retrieval(encoder, data, batch_size=args.batch_size)
            seconds = time.perf_counter() - start
            results[system, task] = {"metrics": metrics, "seconds": round(seconds, 1)}
            print(
                f"  {system:<18} {task:<11} {json.dumps({k: round(v, 4) for k, v in metrics.items()})} ({seconds:.0f} s)"
            )
    bm25_full = evaluate_bm25(cranfield_full)

    headline = {"cranfield": "ndcg@10", "stsb-dev": "spearman", "stdlib-dev": "ndcg@10"}
    sizes = {
        t: f"{len(d.qrels)}q/{len(d.corpus)}d" if isinstance(d, RetrievalDataset) else f"{len(d)} pairs"
        for t, d in tasks.items()
    }
    print(
        f"\ndevice: cpu ({torch.get_num_threads()} threads), dtype {args.dtype}, max_length {args.max_length}"
    )
    print(f"{'system':<18} " + " ".join(f"{f'{t} {headline[t]}':>24}" for t in tasks))
    print(f"{'':<18} " + " ".join(f"{sizes[t]:>24}" for t in tasks))
    for system in systems:
        print(
            f"{system:<18} " + " ".join(f"{results[system, t]['metrics'][headline[t]]:>24.4f}" for t in tasks)
        )
    print(
        f"BM25 on the full Cranfield (225q/1400d): nDCG@10 {bm25_full['ndcg@10']:.4f}, "
        f"recall@100 {bm25_full['recall@100']:.4f}"
    )
    if args.json:
        record = {
            "benchmark": "quality_baselines",
            "args": vars(args),
            "sizes": sizes,
            "results": [{"system": s, "task": t, **r} for (s, t), r in results.items()],
            "bm25_full_cranfield": bm25_full,
            **environment(),
        }
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
