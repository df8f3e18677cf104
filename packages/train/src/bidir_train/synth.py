"""bidir-synth: synthetic queries for a user's corpus, written as training rows (the first step of fine-tuning on
your own corpus: bidir-synth -> bidir-mine -> bidir-train -> bidir-eval).

Each passage gets queries from a local instruct causal LM (query_generator.py), deduplicated (lower case,
whitespace collapsed; an empty query or one equal to its passage is dropped), optionally filtered by round trip
(round_trip.py). The output is NeMo-style JSONL, one row per query: {"query", "pos_doc": [passage], "neg_doc": [],
"pos_ids": [id]} (no ids for a text file), which bidir-mine and bidir-train read.

Resumable, exactly once: the passages are generated in chunks of chunk_size; each chunk's queries go to
<output>.parts/chunk-NNNNN.json, written to a temporary name and renamed when complete, so a chunk file exists
complete or not at all. manifest.json there holds the fingerprint of the inputs and settings: a rerun skips the
chunks that exist and refuses a parts folder made from other inputs or settings. The output is written (atomically)
only once every chunk is done, from the chunk files in order, and then the parts folder is removed; a file at
<output> is always a complete run. Sampling is seeded per chunk and batch, so a resumed run writes what an
uninterrupted one does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from bidir_core.cli import run_cli
from bidir_core.datasets import TrainingExample
from bidir_core.datasets.lines import id_field, read_jsonl, read_lines, text_field
from bidir_core.datasets.retrieval import read_corpus
from bidir_core.devices import default_device
from bidir_core.errors import BidirError
from bidir_core.file_writes import fsync_dir
from bidir_core.folders import unknown_files
from bidir_core.jsonfile import read_json_object, read_versioned_json, write_json_atomic, write_jsonl_atomic
from bidir_core.outputs import check_new_output
from bidir_train.mine import training_row
from bidir_train.query_generator import DTYPES, GenerationSettings, QueryGenerator, normalize, resolve_prompt

MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = re.compile(r"chunk-(\d{5})\.json")
# What this writer puts in a parts folder (its files and the temporary names jsonfile's atomic writes use): the
# only files --overwrite deletes.
_OURS = frozenset({MANIFEST, "chunk-?????.json", f".{MANIFEST}.*.tmp", ".chunk-?????.json.*.tmp"})


@dataclass(frozen=True)
class SynthConfig:
    """One bidir-synth job."""

    corpus: str
    """BEIR corpus.jsonl or its folder (ids: _id, text: title and text), a JSONL file read by id_field /
    text_field, or a .txt file (one passage per line, no ids)."""
    output: str
    """The JSONL file of training rows (its chunks are kept in <output>.parts until it is written)."""
    model: str = "smollm2-135m"
    """The generator: 'smollm2-135m', a .gguf file, or a Hugging Face causal LM folder."""
    prompt: str = "question"
    """A packaged prompt (question, keywords) or a prompt file with {passage} once."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    id_field: str | None = None
    """A JSONL corpus's id field (None: BEIR's _id when text_field is None too, else no ids)."""
    text_field: str | None = None
    """A JSONL corpus's text field (None: BEIR's title + text)."""
    chunk_size: int = 64
    """Passages per chunk: the unit a killed run resumes from."""
    device: str | None = None
    """cpu or cuda (None: cuda when available)."""
    dtype: str = "fp32"
    """The generator's weights: fp32, bf16 or fp16."""
    overwrite: bool = False
    """Delete a previous output and its parts (only files this writer makes) and start over."""
    progress: bool = True
    filter_model: str | None = None
    """An embedder (BiEncoder.from_pretrained): keep a pair only if its passage ranks in the top filter_top_k."""
    filter_top_k: int = 1
    filter_max_length: int | None = None
    """Tokens per text for the filter embedder (None: its own max_length)."""
    filter_reranker: str | None = None
    """A reranker (CrossEncoder.from_pretrained, with its head): also keep only pairs it ranks in the top
    filter_top_k of the embedder's top filter_candidates."""
    filter_candidates: int = 20
    filter_batch_size: int = 32

    def __post_init__(self):
        # filter_max_length None: the embedder's own.
        optional = ("filter_max_length",) if self.filter_max_length is not None else ()
        for name in ("chunk_size", "filter_top_k", "filter_candidates", "filter_batch_size", *optional):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BidirError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise BidirError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.filter_reranker is not None and self.filter_model is None:
            raise BidirError("filter_reranker reorders the filter_model's candidates: give filter_model too")
        if self.filter_reranker is not None and self.filter_candidates < self.filter_top_k:
            raise BidirError(
                f"filter_candidates ({self.filter_candidates}) must be at least filter_top_k ({self.filter_top_k})"
            )


def read_passages(source: str | Path, id_key: str | None = None, text_key: str | None = None):
    """([(id or None, text)], blank): the passages of a corpus with text, in file order, and how many were blank
    (left out). An empty corpus is an error naming the file."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "corpus.jsonl"
    suffix = path.suffix.lower()
    if suffix == ".jsonl" and id_key is None and text_key is None:
        passages = list(read_corpus(path).items())  # BEIR; read_corpus refuses a file with no document
    elif suffix == ".jsonl":
        passages = []
        for number, row in read_jsonl(path):
            where = f"{path}:{number}"
            doc_id = id_field(row, id_key, where) if id_key is not None else None
            passages.append((doc_id, text_field(row, text_key or "text", where, allow_empty=True)))
    elif suffix == ".txt":
        passages = [(None, text) for _, text in read_lines(path)]
    elif suffix == ".parquet":
        raise BidirError(f"{path}: Parquet corpora are not read; convert it to JSONL (see the train README)")
    else:
        raise BidirError(f"{path}: unknown corpus format: expected a BEIR folder, a .jsonl or a .txt file")
    kept = [(doc_id, text.strip()) for doc_id, text in passages if text.strip()]
    if not kept:
        raise BidirError(f"{path}: the corpus has no passages with text")
    return kept, len(passages) - len(kept)


def synthesize(
    cfg: SynthConfig, generator: QueryGenerator | None = None, encoder=None, reranker=None
) -> dict:
    """Generate queries for every passage of cfg.corpus into cfg.output (see the module docstring); a summary
    dict. generator: one already loaded (its prompt and settings are used; cfg.model, cfg.prompt, cfg.generation and
    cfg.dtype are not); encoder / reranker: the filter's, already loaded (used only when cfg names a filter)."""
    start = time.perf_counter()
    output = Path(cfg.output).expanduser()
    parts = output.with_name(output.name + ".parts")
    template = resolve_prompt(cfg.prompt)  # a bad prompt costs nothing
    passages, blank = read_passages(cfg.corpus, cfg.id_field, cfg.text_field)
    check_new_output(output, overwrite=cfg.overwrite)
    device = cfg.device or default_device()
    _check_filter_models(cfg)  # their files are read now, their weights after the generation
    if generator is None:
        generator = QueryGenerator.load(
            cfg.model, prompt=template, settings=cfg.generation, device=device, dtype=cfg.dtype
        )
    if cfg.overwrite:  # only now: a model or filter that cannot load leaves the previous output as it was
        remove_outputs(output)
    fingerprint = _fingerprint(cfg, generator, passages)
    _open_parts(parts, fingerprint)

    chunks = range(0, len(passages), cfg.chunk_size)
    done = {i for i in range(len(chunks)) if (parts / _chunk_name(i)).is_file()}
    todo = [i for i in range(len(chunks)) if i not in done]
    initial = sum(min(cfg.chunk_size, len(passages) - i * cfg.chunk_size) for i in done)
    with tqdm(
        total=len(passages), initial=initial, disable=not cfg.progress, desc="synth", unit="passage"
    ) as bar:
        for i in todo:
            first = i * cfg.chunk_size
            texts = [text for _, text in passages[first : first + cfg.chunk_size]]
            queries, cut = generator.generate(texts, key=i, on_batch=bar.update)
            kept, counts = _deduplicate(texts, queries)
            counts["cut_passages"] = cut
            record = {"first": first, "passages": len(texts), "queries": kept, "counts": counts}
            write_json_atomic(parts / _chunk_name(i), record)  # complete, or not there

    records = [
        _read_chunk(parts, i, i * cfg.chunk_size, len(passages), cfg.chunk_size) for i in range(len(chunks))
    ]
    pairs = [(rec["first"] + j, q) for rec in records for j, qs in enumerate(rec["queries"]) for q in qs]
    pairs, shared = _drop_shared(pairs, passages)
    counts = sum((Counter(rec["counts"]) for rec in records), Counter())
    summary = {
        "output": str(output),
        "passages": len(passages),
        "blank_passages": blank,
        "resumed_chunks": len(done),
        "chunks": len(chunks),
        "generated": counts["generated"],
        "dropped_empty": counts["empty"],
        "dropped_passage": counts["same_as_passage"],
        "dropped_duplicate": counts["duplicate"],
        "dropped_shared": shared,
        "cut_passages": counts["cut_passages"],
        "pairs": len(pairs),
    }
    if counts["cut_passages"]:
        warnings.warn(
            f"{counts['cut_passages']} of {len(passages)} passages were longer than the generator's context leaves "
            f"room for ({generator.passage_budget} tokens) and were cut to fit",
            stacklevel=2,
        )
    if cfg.filter_model is not None and pairs:
        del generator  # the generator's memory goes before the embedder's comes
        keep, filtered = _filter(cfg, pairs, passages, device, encoder, reranker)
        pairs = [pair for pair, k in zip(pairs, keep, strict=True) if k]
        summary["filter"] = filtered
    rows = [training_row(_example(passages[p], q)) for p, q in pairs]
    write_jsonl_atomic(output, rows)  # a complete-looking file is a complete one
    _remove_parts(parts)
    summary["rows"] = len(rows)
    summary["seconds"] = time.perf_counter() - start
    return summary


def _deduplicate(texts: list[str], queries: list[list[str]]) -> tuple[list[list[str]], dict]:
    """Each passage's queries without empty ones, ones equal to the passage and repeats (normalize())."""
    counts = Counter(generated=sum(map(len, queries)))
    kept = []
    for text, qs in zip(texts, queries, strict=True):
        seen, mine = {normalize(text)}, []
        for q in qs:
            key = normalize(q)
            if not key:
                counts["empty"] += 1
            elif key == normalize(text):
                counts["same_as_passage"] += 1
            elif key in seen:
                counts["duplicate"] += 1
            else:
                seen.add(key)
                mine.append(q)
        kept.append(mine)
    return kept, {k: counts[k] for k in ("generated", "empty", "same_as_passage", "duplicate")}


def _drop_shared(pairs: list[tuple[int, str]], passages) -> tuple[list[tuple[int, str]], int]:
    """(pairs, how many were dropped): without the queries (normalize()) generated for more than one passage text.
    Such a query ("What is the purpose of the text?", a small generator's fallback) names none of its passages,
    and as training rows it would pull one query towards several unrelated passages."""
    texts: dict[str, set[str]] = {}
    for p, q in pairs:
        texts.setdefault(normalize(q), set()).add(normalize(passages[p][1]))
    kept = [(p, q) for p, q in pairs if len(texts[normalize(q)]) == 1]
    return kept, len(pairs) - len(kept)


def _example(passage: tuple[str | None, str], query: str) -> TrainingExample:
    doc_id, text = passage
    return TrainingExample(
        query=query, positives=(text,), positive_ids=(doc_id,) if doc_id is not None else ()
    )


def _fingerprint(cfg: SynthConfig, generator: QueryGenerator, passages) -> dict:
    """What decides the chunks' contents: the passages (ids and texts), the generator (its config and weights'
    sha256), the prompt, the generation settings and how the work is cut into chunks and batches, the device and
    dtype (numerics). The filter is applied after the chunks, so it is not part of it."""
    digest = hashlib.sha256()
    for doc_id, text in passages:
        digest.update(json.dumps([doc_id, text], ensure_ascii=False).encode() + b"\n")
    return {
        "passages": "sha256:" + digest.hexdigest(),
        "passage_count": len(passages),
        "generator": generator.identity,
        "prompt": generator.prompt,
        "chat_template": generator.chat,
        "generation": asdict(generator.settings),
        "chunk_size": cfg.chunk_size,
        "device": str(next(generator.model.parameters()).device.type),
        "dtype": str(next(generator.model.parameters()).dtype),
    }


def _chunk_name(i: int) -> str:
    return f"chunk-{i:05d}.json"


def _open_parts(parts: Path, fingerprint: dict) -> None:
    """Make the parts folder with its manifest, or check an existing one's: other inputs or settings are refused,
    naming what differs. Temporary files a killed write left are removed (so one run at a time writes a parts
    folder: a second, concurrent one could remove the first's file being written)."""
    manifest = parts / MANIFEST
    if parts.exists() and not manifest.is_file():
        raise BidirError(
            f"{parts}: exists but holds no {MANIFEST}; not a bidir-synth parts folder (move it away)"
        )
    if manifest.is_file():
        stored = read_versioned_json(manifest, MANIFEST_VERSION).get("fingerprint")
        if stored != fingerprint:
            keys = sorted(
                k for k in fingerprint if not isinstance(stored, dict) or stored.get(k) != fingerprint[k]
            )
            raise BidirError(
                f"{manifest}: a run with other inputs or settings (differs in {', '.join(keys)}) is unfinished "
                "there; rerun it as it was, or pass --overwrite to start over"
            )
        for tmp in [*parts.glob(f".{MANIFEST}.*.tmp"), *parts.glob(".chunk-?????.json.*.tmp")]:
            tmp.unlink(missing_ok=True)
        return
    parts.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, {"format_version": MANIFEST_VERSION, "fingerprint": fingerprint})


def _read_chunk(parts: Path, i: int, first: int, total: int, chunk_size: int) -> dict:
    path = parts / _chunk_name(i)
    rec = read_json_object(path)
    expected = min(chunk_size, total - first)
    if (
        rec.get("first") != first
        or rec.get("passages") != expected
        or len(rec.get("queries", ())) != expected
    ):
        raise BidirError(f"{path}: does not hold passages {first}..{first + expected - 1} of this run")
    return rec


def remove_outputs(output: Path) -> None:
    """--overwrite: delete output and its parts folder, refusing (before deleting anything) when the parts folder
    holds a file this writer does not make."""
    parts = output.with_name(output.name + ".parts")
    if parts.is_dir():
        foreign = unknown_files(parts, _OURS)
        if foreign:
            raise BidirError(
                f"{parts}: holds files bidir-synth did not write ({', '.join(foreign[:3])}); not deleted"
            )
    if output.is_dir():
        raise BidirError(f"{output}: is a folder, not a file that can be written")
    output.unlink(missing_ok=True)
    _remove_parts(parts)


def _remove_parts(parts: Path) -> None:
    if not parts.is_dir():
        return
    for path in parts.iterdir():
        if any(path.match(pattern) for pattern in _OURS):
            path.unlink()
    parts.rmdir()  # a file someone else put there stops this here, with the error naming the folder
    fsync_dir(parts.parent)


def _check_filter_models(cfg: SynthConfig) -> None:
    """Open the filter's models (their config files, not their weights) before hours of generation."""
    from bidir_core.reranker_config import RERANKER
    from bidir_core.sources import open_source

    if cfg.filter_model is not None:
        source = open_source(cfg.filter_model)
        if source.kind == RERANKER:
            raise BidirError(f"{cfg.filter_model}: is a reranker; --filter-model takes an embedder")
    if cfg.filter_reranker is not None:
        source = open_source(cfg.filter_reranker)
        if source.kind != RERANKER:
            raise BidirError(
                f"{cfg.filter_reranker}: is not a reranker (no score head); --filter-reranker takes one"
            )


def _filter(cfg: SynthConfig, pairs, passages, device: str, encoder, reranker) -> tuple[list[bool], dict]:
    from bidir_train.round_trip import round_trip_filter

    if encoder is None:
        from bidir_core.encoder import BiEncoder

        encoder = BiEncoder.from_pretrained(
            cfg.filter_model, max_length=cfg.filter_max_length, device=device
        ).eval()
    if reranker is None and cfg.filter_reranker is not None:
        from bidir_core.cross_encoder import CrossEncoder

        reranker = CrossEncoder.from_pretrained(cfg.filter_reranker, device=device).eval()
    return round_trip_filter(
        encoder,
        [q for _, q in pairs],
        [p for p, _ in pairs],
        [text for _, text in passages],
        top_k=cfg.filter_top_k,
        reranker=reranker if cfg.filter_reranker is not None else None,
        candidates=cfg.filter_candidates,
        batch_size=cfg.filter_batch_size,
        progress=cfg.progress,
        device=device,
    )


EXAMPLES = """examples:
  bidir-synth smollm2-135m --corpus ./beir-folder --output synth.jsonl
  bidir-synth smollm2-135m --corpus passages.txt --output synth.jsonl --prompt keywords
  bidir-synth /models/Qwen2.5-7B-Instruct --corpus docs.jsonl --id-field id --text-field body --output synth.jsonl \\
      --device cuda --dtype bf16 --batch-size 64 --queries-per-passage 3 --temperature 0.7 --top-p 0.9 --seed 1
  bidir-synth smollm2-135m --corpus ./beir-folder --output synth.jsonl --filter-model ./my-embedder --filter-top-k 3"""


def parse_args(argv: list[str] | None = None) -> SynthConfig:
    d, g = SynthConfig("", ""), GenerationSettings()
    p = argparse.ArgumentParser(
        prog="bidir-synth",
        description="Generate queries for every passage of a corpus with a local instruct LM and write them as "
        "training rows (NeMo-style JSONL, the passage as pos_doc). A killed run resumes where it stopped.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="?",
        default=d.model,
        help="'smollm2-135m' (default), a .gguf file or a HF causal LM folder",
    )
    p.add_argument("--corpus", required=True, help="BEIR folder / corpus.jsonl, a JSONL file, or a .txt file")
    p.add_argument("--output", required=True, help="the JSONL file to write")
    p.add_argument(
        "--id-field", help="a JSONL corpus's id field (default: BEIR's _id, or none with --text-field)"
    )
    p.add_argument("--text-field", help="a JSONL corpus's text field (default: BEIR's title + text)")
    p.add_argument(
        "--prompt", default=d.prompt, help="question (default), keywords, or a file with {passage}"
    )
    p.add_argument(
        "--queries-per-passage", type=int, default=g.queries_per_passage, help="needs --temperature > 0"
    )
    p.add_argument("--max-new-tokens", type=int, default=g.max_new_tokens, help=f"default {g.max_new_tokens}")
    p.add_argument(
        "--temperature", type=float, default=g.temperature, help="0 (default): greedy; else sampling"
    )
    p.add_argument("--top-p", type=float, default=g.top_p, help=f"nucleus sampling (default {g.top_p})")
    p.add_argument("--seed", type=int, default=g.seed, help="sampling seed (same seed, same output)")
    p.add_argument(
        "--batch-size", type=int, default=g.batch_size, help=f"passages per generate (default {g.batch_size})"
    )
    p.add_argument(
        "--chunk-size", type=int, default=d.chunk_size, help=f"passages per resumable chunk ({d.chunk_size})"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=d.dtype, help="generator weights (default fp32)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a previous output and its unfinished parts"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--filter-model", metavar="EMBEDDER", help="keep pairs whose passage the embedder ranks top-k"
    )
    p.add_argument("--filter-top-k", type=int, default=d.filter_top_k, help=f"default {d.filter_top_k}")
    p.add_argument(
        "--filter-max-length", type=int, help="tokens per text for the embedder (default: its own)"
    )
    p.add_argument(
        "--filter-reranker", metavar="RERANKER", help="also keep only pairs the reranker ranks top-k"
    )
    p.add_argument(
        "--filter-candidates",
        type=int,
        default=d.filter_candidates,
        help=f"the embedder's candidates the reranker reorders (default {d.filter_candidates})",
    )
    a = p.parse_args(argv)
    generation = GenerationSettings(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        seed=a.seed,
        queries_per_passage=a.queries_per_passage,
        batch_size=a.batch_size,
    )
    return SynthConfig(
        corpus=a.corpus,
        output=a.output,
        model=a.model,
        prompt=a.prompt,
        generation=generation,
        id_field=a.id_field,
        text_field=a.text_field,
        chunk_size=a.chunk_size,
        device=a.device,
        dtype=a.dtype,
        overwrite=a.overwrite,
        progress=not a.no_progress,
        filter_model=a.filter_model,
        filter_top_k=a.filter_top_k,
        filter_max_length=a.filter_max_length,
        filter_reranker=a.filter_reranker,
        filter_candidates=a.filter_candidates,
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli("bidir-synth", lambda: _report(synthesize(parse_args(argv))))


def _report(s: dict) -> None:
    line = (
        f"bidir-synth: {s['rows']} rows -> {s['output']} from {s['passages']} passages: {s['generated']} generated, "
        f"dropped {s['dropped_empty']} empty, {s['dropped_passage']} equal to the passage, "
        f"{s['dropped_duplicate']} duplicates, {s['dropped_shared']} shared by several passages; "
        f"{s['cut_passages']} passages cut to fit"
    )
    if s["blank_passages"]:
        line += f"; {s['blank_passages']} blank passages left out"
    if s["resumed_chunks"]:
        line += f"; resumed with {s['resumed_chunks']} of {s['chunks']} chunks done"
    if "filter" in s:
        f = s["filter"]
        line += f"; round-trip filter kept {f['kept']} of {f['pairs']} pairs"
        if f["kept_embedder"] != f["kept"]:
            line += f" ({f['kept_embedder']} by the embedder)"
    print(line + f", {s['seconds']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
