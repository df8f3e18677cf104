"""The sentence-transformers peer of benchmarks/quality.py: the same base model trained the way a
sentence-transformers 6 user trains it, on the same rows, then scored by the same code as bidir's rows.

- Model: SentenceTransformer(modules=[Transformer(checkpoint), Pooling(mean)]) from the embedded default's bidir
  checkpoint (the same weights bidir starts from). The text modality is pinned (otherwise ST 6.2
  renders every string through SmolLM2's chat template). Attention: ST loads transformers' LlamaModel from the
  folder's config.json, which says is_causal: false, so it is *bidirectional*, with transformers' sdpa attention;
  before training its mean-pooled embeddings equal BiEncoder's (max |diff| 0.0 in fp32, measured; flipping
  is_causal to true changes them by 0.25), so both sides start from the same model.
- Training: SentenceTransformerTrainer + MultipleNegativesRankingLoss (scale 1 / our temperature), or
  CachedMultipleNegativesRankingLoss with --peer-mini-batch; the rows' (query, first positive) pairs; the batch
  sampler ST recommends for MNRL (NO_DUPLICATES); AdamW with the same lr, warmup, linear decay, weight decay,
  clipping and bf16 autocast as our recipe. It stops at the given number of steps or when the wall-clock budget
  (our row's training time) runs out, whichever comes first; the steps it reached are reported.
- Evaluation: the trained LlamaModel is saved as a Hugging Face folder (config.json + model.safetensors +
  tokenizer), which BiEncoder.from_pretrained loads with avg pooling: the same evaluation code, dtype and max
  length as bidir's rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from bidir_core.devices import default_device

TEXT_ONLY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}


def st_model(checkpoint: Path, max_length: int):
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(
        str(checkpoint),
        max_seq_length=max_length,
        modality_config=TEXT_ONLY,
        module_output_name="token_embeddings",
    )
    pooling = models.Pooling(transformer.get_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[transformer, pooling], device=default_device())


def pairs_dataset(rows_path: Path):
    from datasets import Dataset

    rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    positives = [r["pos_doc"] if isinstance(r["pos_doc"], str) else r["pos_doc"][0] for r in rows]
    return Dataset.from_dict({"anchor": [r["query"] for r in rows], "positive": positives})


def train_peer(
    checkpoint: Path,
    rows_path: Path,
    out: Path,
    *,
    batch_size: int,
    max_steps: int,
    budget_s: float | None,
    lr: float,
    warmup_steps: int,
    temperature: float,
    max_length: int,
    mini_batch: int | None = None,
    seed: int = 0,
) -> dict:
    """Train the peer into out/final (a Hugging Face folder BiEncoder loads); returns its steps and wall time."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers
    from transformers import TrainerCallback

    model = st_model(checkpoint, max_length)
    if mini_batch:
        loss = CachedMultipleNegativesRankingLoss(model, scale=1 / temperature, mini_batch_size=mini_batch)
    else:
        loss = MultipleNegativesRankingLoss(model, scale=1 / temperature)
    start = time.perf_counter()

    class Budget(TrainerCallback):
        """Stop once the wall-clock budget is spent (checked after every step)."""

        def on_step_end(self, args, state, control, **kwargs):
            if budget_s is not None and time.perf_counter() - start > budget_s:
                control.should_training_stop = True

    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        learning_rate=lr,
        warmup_steps=warmup_steps,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        max_grad_norm=1.0,
        bf16=True,
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        dataloader_drop_last=True,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=pairs_dataset(rows_path), loss=loss, callbacks=[Budget()]
    )
    result = trainer.train()
    seconds = time.perf_counter() - start
    final = out / "final"
    tmp = out / "final.tmp"
    model[0].auto_model.save_pretrained(tmp)
    model.tokenizer.save_pretrained(tmp)
    tmp.replace(final)  # a final/ folder exists only when complete
    summary = {"steps": trainer.state.global_step, "train_s": round(seconds, 1), "loss": result.training_loss}
    (out / "summary.json").write_text(json.dumps(summary) + "\n")
    return summary
