"""The oracle side of the model tests: transformers' own model on the same weights, and padded batches."""

from __future__ import annotations

import torch

from bidir_core.batching import pad_batch


def padded_batch(padding_side: str, lengths=(17, 9, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (3..319) for rows of the given lengths, padded (pad id 0) on padding_side."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 320, (n,), generator=g).tolist() for n in lengths]
    return pad_batch(rows, pad_id=0, padding_side=padding_side)


def oracle_hidden(oracle, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # The oracle is given the positions of real tokens explicitly (its default is arange(T) whatever the padding).
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return oracle(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state


def oracle_rows(oracle, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The oracle on each row alone (batch size 1, no padding), placed back into the padded layout."""
    out = torch.zeros(*ids.shape, oracle.config.hidden_size)
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        out[row, real] = oracle_hidden(oracle, ids[row : row + 1, real], mask[row : row + 1, real])[0]
    return out


def first_token_shift(forward, ids: torch.Tensor, mask: torch.Tensor, row: int) -> float:
    """How much the first token's state of `row` moves when its last real token is replaced."""
    last = int(mask[row].nonzero().max())
    changed = ids.clone()
    changed[row, last] = 3 + (int(ids[row, last]) - 2) % 300
    with torch.no_grad():
        a, b = forward(ids, mask), forward(changed, mask)
    first = int(mask[row].nonzero().min())
    return float((a[row, first] - b[row, first]).abs().max())
