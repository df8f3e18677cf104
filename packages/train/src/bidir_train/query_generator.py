"""Queries for passages from a local instruct causal LM: the prompts, loading the generator, fitting a passage into
its context, and batched greedy or seeded-sampling generation (transformers' `generate`).

    generator = QueryGenerator.load("smollm2-135m", prompt=PROMPTS["question"], settings=GenerationSettings())
    generator.generate(["passage one", "passage two"], key=0)   # [[query, ...], [query, ...]]

The generator is the embedded default (SmolLM2-135M-Instruct, built as a transformers LlamaForCausalLM from the
GGUF bidir_core imports: its decoder weights plus the LM head, which is the input embeddings there), a .gguf file
read the same way, or any Hugging Face causal LM folder (AutoModelForCausalLM; a folder that needs its own code is
refused, never run). An instruct model's prompt is wrapped in its chat template as one user message.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bidir_core.batching import length_sorted_batches
from bidir_core.errors import BidirError, one_line
from bidir_core.jsonfile import read_json_object
from bidir_core.tokenization import cut_long_texts

PLACEHOLDER = "{passage}"
PROMPTS = {
    "question": "{passage}\n\nWrite a question that the text above answers. Reply with the question only.",
    "keywords": "{passage}\n\nWrite a short keyword query (three to six words) that a user would type into a search "
    "engine to find the text above. Reply with the query only.",
}
"""The packaged prompts (--prompt question | keywords): a natural question, and a keyword query as users type them
into a search box. {passage} is replaced by the passage (its braces or others in it are left alone). The passage
comes first and the instruction last: SmolLM2-135M-Instruct then answers the instruction rather than continuing
or restating the passage."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class GenerationSettings:
    """How queries are generated (every field is part of a synth run's fingerprint)."""

    max_new_tokens: int = 48
    """Tokens generated per query at most (a query cut here ends where it was cut)."""
    temperature: float = 0.0
    """0: greedy decoding; above 0: sampling at this temperature, seeded by `seed`."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p (1.0: all); sampling only."""
    seed: int = 0
    """Seed of the sampling: the same seed, inputs and batches give the same queries."""
    queries_per_passage: int = 1
    """Queries drawn per passage (before deduplication); above 1 needs sampling (greedy gives one)."""
    batch_size: int = 8
    """Passages per generate call (each yields queries_per_passage sequences)."""

    def __post_init__(self):
        for name in ("max_new_tokens", "queries_per_passage", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BidirError(f"{name} must be a positive integer, got {value!r}")
        if not (self.temperature >= 0 and self.temperature != float("inf")):  # also refuses nan
            raise BidirError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise BidirError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.queries_per_passage > 1 and self.temperature == 0:
            raise BidirError(
                f"queries_per_passage {self.queries_per_passage} needs sampling (a temperature above 0): "
                "greedy decoding gives one query per prompt"
            )


def resolve_prompt(prompt: str) -> str:
    """A packaged prompt's text (question, keywords), or a UTF-8 file's text; it must hold {passage} once."""
    if prompt in PROMPTS:
        return PROMPTS[prompt]
    path = Path(prompt).expanduser()
    if not path.is_file():
        raise BidirError(f"{prompt}: not a packaged prompt ({', '.join(PROMPTS)}) nor a prompt file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BidirError(f"{path}: cannot read the prompt ({one_line(e)})") from None
    check_template(text, str(path))
    return text


def check_template(template: str, where: str) -> None:
    count = template.count(PLACEHOLDER)
    if count != 1:
        raise BidirError(
            f"{where}: a prompt template holds {PLACEHOLDER} exactly once (where the passage goes), found {count}"
        )


def load_causal_lm(name: str, *, device: str, dtype: torch.dtype):
    """(model in eval mode on device, tokenizer, identity): the embedded default or a .gguf file built as a
    LlamaForCausalLM, or a Hugging Face causal LM folder. identity: the sha256 of its config and weights."""
    from bidir_core.artifacts import checkpoint_fingerprint
    from bidir_core.embedded import EMBEDDED_DEFAULT

    if str(name) == EMBEDDED_DEFAULT or str(name).endswith(".gguf"):
        model, tokenizer, path = _from_source(name, dtype)
    else:
        model, tokenizer, path = _from_folder(Path(name).expanduser(), dtype)
    # The weights, not the name: the same folder under another spelling (./m, m, an absolute path) is the same model.
    identity = checkpoint_fingerprint(path)
    # Generation reuses each step's keys and values. bidir's checkpoint configs switch the cache off (an encoder
    # has no use for it), the model's generation config inherits that, and generate takes a setting left at its
    # default from there: without this every new token recomputes the whole prefix (the cost grows with the
    # square of the length).
    model.config.use_cache = model.generation_config.use_cache = True
    return model.to(device).eval(), tokenizer, identity


def _from_source(name: str, dtype: torch.dtype):
    """A LlamaForCausalLM from what bidir_core.sources opens: the decoder's state dict (LlamaModel keys) and the LM
    head, which is the input embeddings for a tied model (SmolLM2) and the stored output.weight otherwise."""
    from transformers import LlamaForCausalLM

    from bidir_core.sources import open_source

    source = open_source(name, attention="causal")  # a generator reads left to right
    state_dict, _ = source.read_weights(dtype)
    head = source.read_lm_head(dtype)
    if head is None and not source.config.tie_word_embeddings:
        raise BidirError(f"{source.path}: has no LM head (output.weight), so it cannot generate text")
    model = LlamaForCausalLM(source.config).to(dtype)
    model.model.load_state_dict(state_dict, strict=True)
    # Tied: the head is the embedding matrix itself (one tensor), as transformers ties it.
    model.lm_head.weight = model.model.embed_tokens.weight if head is None else torch.nn.Parameter(head)
    return model, source.tokenizer(), source.path


def _from_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from bidir_core.tokenization import load_tokenizer

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise BidirError(
            f"{folder}: not a Hugging Face causal LM folder (no config.json), a .gguf file or 'smollm2-135m'"
        )
    raw = read_json_object(config_file)
    if "auto_map" in raw:
        raise BidirError(
            f"{config_file}: auto_map names custom model code, and bidir never runs code from a model folder "
            "(trust_remote_code=False); use a model transformers supports natively"
        )
    if raw.get("model_type") not in CONFIG_MAPPING:
        raise BidirError(
            f"{config_file}: model_type {raw.get('model_type')!r} is not one transformers knows without remote code"
        )
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder,
            trust_remote_code=False,
            dtype=dtype,
            use_safetensors=True,  # never unpickle weights
            output_loading_info=True,
        )
    except Exception as e:  # a non-causal-LM config, missing or bad weights: many exception types
        raise BidirError(f"{folder}: cannot load it as a causal LM ({one_line(e)})") from None
    if info["missing_keys"]:
        # transformers would start them at random (an untied LM head a bidir embedder checkpoint does not keep)
        missing = sorted(info["missing_keys"])
        raise BidirError(
            f"{folder}: not a complete causal LM: no weights for {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        )
    return model, load_tokenizer(folder), folder


class QueryGenerator:
    """A causal LM, its tokenizer and a prompt template: passages in, queries out."""

    def __init__(self, model, tokenizer, prompt: str, settings: GenerationSettings, identity: str = ""):
        check_template(prompt, "the prompt")
        self.model, self.tokenizer, self.prompt, self.settings = model, tokenizer, prompt, settings
        self.identity = identity or type(model).__name__
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = _eos_ids(model, tokenizer)
        self.context = _context_length(model, tokenizer)
        # Tokens the prompt takes without a passage: what is left of the context is the passage's.
        overhead = len(self._prompt_ids(""))
        self.passage_budget = self.context - settings.max_new_tokens - overhead
        if self.passage_budget < 1:
            raise BidirError(
                f"the prompt alone takes {overhead} tokens and max_new_tokens is {settings.max_new_tokens}: no room "
                f"for a passage in the generator's context of {self.context} tokens"
            )

    @classmethod
    def load(
        cls, name: str, *, prompt: str, settings: GenerationSettings, device: str = "cpu", dtype: str = "fp32"
    ):
        if dtype not in DTYPES:
            raise BidirError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        model, tokenizer, identity = load_causal_lm(name, device=device, dtype=DTYPES[dtype])
        return cls(model, tokenizer, prompt, settings, identity=identity)

    def _prompt_ids(self, passage: str) -> list[int]:
        text = self.prompt.replace(PLACEHOLDER, passage)
        if self.chat:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def fit(self, passage: str) -> tuple[list[int], bool]:
        """(prompt token ids, whether the passage was cut): a passage longer than the context leaves after the
        prompt and max_new_tokens keeps its first tokens."""
        ids = self._prompt_ids(passage)
        limit = self.context - self.settings.max_new_tokens
        if len(ids) <= limit:
            return ids, False
        (cut,) = cut_long_texts(self.tokenizer, [passage], self.passage_budget)  # bounded tokenizing cost
        tokens = self.tokenizer(cut, add_special_tokens=False)["input_ids"]
        keep = self.passage_budget
        while True:  # decoding and re-tokenizing may merge tokens across the cut: shrink until it fits
            ids = self._prompt_ids(self.tokenizer.decode(tokens[:keep]))
            if len(ids) <= limit:  # at keep 0 it does: the constructor checked that the bare prompt fits
                return ids, True
            keep = max(0, keep - max(1, len(ids) - limit))

    @torch.no_grad()
    def generate(
        self, passages: Sequence[str], *, key: int = 0, on_batch: Callable[[int], None] | None = None
    ) -> tuple[list[list[str]], int]:
        """(queries per passage, as generated and cleaned (clean_query), not deduplicated; passages cut to fit).

        Passages are batched by prompt length, left-padded (a causal LM continues from the last position of
        every row). Sampling is seeded per batch from (settings.seed, key, batch number), so the same passages
        under the same key and settings give the same queries whatever ran before (a resumed synth run: key is
        the chunk). on_batch(passages done) is called after each batch (a progress bar)."""
        s = self.settings
        fitted = [self.fit(p) for p in passages]
        prompts = [ids for ids, _ in fitted]
        out: list[list[str]] = [[] for _ in passages]
        device = next(self.model.parameters()).device
        batches = length_sorted_batches([len(p) for p in prompts], s.batch_size)
        for number, batch in enumerate(batches):
            width = max(len(prompts[i]) for i in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (B, T), left-padded
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # the caller's RNG state is left as it was
                torch.manual_seed(_batch_seed(s.seed, key, number))
                generated = self.model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=self._generation_config(),
                )  # (B * N, T + new): each row's N sequences are consecutive
            texts = self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for j, text in enumerate(texts):
                out[batch[j // s.queries_per_passage]].append(clean_query(text))
            if on_batch is not None:
                on_batch(len(batch))
        return out, sum(cut for _, cut in fitted)

    def _generation_config(self):
        from transformers import GenerationConfig

        # A fresh config: a model folder's own generation_config.json (its sampling defaults) must not change
        # what the settings say.
        s = self.settings
        sampling = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p) if s.temperature > 0 else {}
        return GenerationConfig(
            max_new_tokens=s.max_new_tokens,
            num_return_sequences=s.queries_per_passage,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            **(sampling or {"do_sample": False}),
        )


def _eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends a reply: the model config's eos (an instruct model's end of turn) and the
    tokenizer's."""
    ids = model.config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    ids.append(tokenizer.eos_token_id)
    return sorted({i for i in ids if i is not None})


def _context_length(model, tokenizer) -> int:
    """Positions the generator was trained on: max_position_embeddings, else the tokenizer's model_max_length."""
    length = getattr(model.config, "max_position_embeddings", None)
    if not length:
        length = getattr(tokenizer, "model_max_length", None)
        if not length or length > 10**7:  # transformers' "no limit" sentinel is 1e30
            raise BidirError("the generator's config gives no context length (max_position_embeddings)")
    return int(length)


def _batch_seed(seed: int, key: int, batch: int) -> int:
    digest = hashlib.sha256(f"{seed}:{key}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


_LABEL = re.compile(r"^(question|query|search query|keywords?)\s*:\s*", re.IGNORECASE)


def clean_query(text: str) -> str:
    """The query in a reply: its first non-empty line, without a leading "Question:" / "Query:" label or
    surrounding quotes (small instruct models add them)."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = _LABEL.sub("", line).strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`":
        line = line[1:-1].strip()
    return line


def normalize(text: str) -> str:
    """The form queries are deduplicated in (and compared with their passage): lower case, whitespace collapsed."""
    return " ".join(text.lower().split())
