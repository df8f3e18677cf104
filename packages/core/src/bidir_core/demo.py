"""The quick-start job: embed a few sentences with the embedded default model and print their similarities.

python -m bidir_core.demo [MODEL]
"""

from __future__ import annotations

import sys
import time

from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError

QUERIES = ["how do I sort a list?", "what is the capital of France?", "open a file for reading"]
DOCUMENTS = [
    "Return a new list containing all items from the iterable in ascending order.",
    "Paris is the capital and largest city of France.",
    "Open file and return a corresponding file object.",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    model = argv[0] if argv else "smollm2-135m"
    try:
        t0 = time.perf_counter()
        encoder = BiEncoder.from_pretrained(model)
        t1 = time.perf_counter()
        q = encoder.encode_queries(QUERIES)
        d = encoder.encode_documents(DOCUMENTS)
        t2 = time.perf_counter()
    except BidirError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    scores = q @ d.T  # cosine similarities: embeddings are L2-normalized
    print(f"model {model}: hidden {encoder.hidden_size}, pooling {encoder.config.pooling}")
    print("cosine similarity (rows: queries, columns: documents)")
    for i, query in enumerate(QUERIES):
        cells = "  ".join(f"{s:+.3f}" for s in scores[i])
        print(f"  {query:<32} {cells}   best: document {scores[i].argmax()}")
    for j, doc in enumerate(DOCUMENTS):
        print(f"  document {j}: {doc}")
    hits = sum(int(scores[i].argmax() == i) for i in range(len(QUERIES)))
    print(
        f"{hits}/{len(QUERIES)} queries rank their own document first; load {t1 - t0:.1f}s, encode {t2 - t1:.2f}s"
    )
    if model == "smollm2-135m":
        print(
            "(the embedded default is a causal LM with its causal mask removed and no embedding training yet)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
