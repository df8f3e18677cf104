"""Attention over a packed batch: each text attends to itself only (bidirectionally, or causally with causal=True).

Kernels (q, k, v are (1, heads, N, D), N the packed tokens; the output has q's shape):

- "gathered": q, k, v gathered into a (B, heads, L_max, D) layout (an index per text and position), one
              scaled_dot_product_attention with a key mask, the real positions gathered back. Costs B x L_max^2
              attention and three copies, in one call per layer; the projections and MLP still see real tokens only.
- "segments": scaled_dot_product_attention on each text's slice, one call per text. Costs sum(L_i^2), no mask.
- "dense":    one scaled_dot_product_attention over all N tokens with a block-diagonal (N, N) boolean mask.
              Costs N^2 whatever the texts: the reference, and only fast for few, long texts.
- "flex":     FlexAttention with a document block mask (torch.compile'd: its eager form is a slow reference).
              Skips the masked-out blocks, so it costs about sum(L_i^2) rounded up to 128-token blocks.
- "jagged":   scaled_dot_product_attention on nested jagged tensors (torch.nested, offsets = cu_seqlens): one
              variable-length kernel call (flash / memory-efficient) on CUDA. PyTorch has no CPU kernel for it.
- "varlen":   flash-attn's flash_attn_varlen_func (CUDA, fp16 / bf16, when the flash-attn package is installed).

Which one "auto" picks per device was chosen by measurement (the core README, "Packed batches", has the figures
and their commands). On CPU it depends on whether autograd records: "gathered" when training, where "segments" pays
autograd's per-call cost once per layer and text; "segments" for inference, where that cost is gone and gathered's
B x L_max^2 padding is not ("jagged" has no CPU kernel). On CUDA, "varlen" when flash-attn is importable, else
"jagged" (one variable-length kernel launch per layer, no padding at all); benchmarks/gpu_suite.sh has the rows
that would confirm it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from bidir_core.errors import BidirError
from bidir_core.packed import PackedBatch

KERNELS = ("auto", "gathered", "segments", "dense", "flex", "jagged", "varlen")


def default_kernel(device: torch.device | str, grad: bool | None = None) -> str:
    """The kernel "auto" means on this device, for a forward that records gradients or not (default: whether
    autograd records now); the module docstring says why."""
    if torch.device(device).type == "cuda":
        return "varlen" if importlib.util.find_spec("flash_attn") is not None else "jagged"
    return "gathered" if (torch.is_grad_enabled() if grad is None else grad) else "segments"


class PackedAttention:
    """The attention call of a packed batch: `attend(q, k, v)`, built once per forward and shared by every layer
    (the block-diagonal mask or block mask is made once)."""

    def __init__(self, packed: PackedBatch, kernel: str = "auto", causal: bool = False):
        if kernel not in KERNELS:
            raise BidirError(
                f"unknown packed attention kernel {kernel!r}: choose one of {', '.join(KERNELS)}"
            )
        device = packed.input_ids.device
        self.kernel = default_kernel(device) if kernel == "auto" else kernel
        if self.kernel in ("jagged", "varlen") and device.type != "cuda":
            raise BidirError(
                f"packed attention kernel {self.kernel!r} runs on CUDA only; on CPU use 'segments'"
            )
        self.packed, self.causal = packed, causal
        # Spans of the non-empty texts (an empty text has no token to attend from).
        self.spans = [(a, a + n) for a, n in zip(_starts(packed.lengths), packed.lengths, strict=True) if n]
        self.mask = self.block_mask = None
        if self.kernel == "dense":
            seg = packed.segment_ids()
            mask = seg[:, None] == seg[None, :]  # (N, N): same text
            if causal:
                mask = mask & torch.ones_like(mask).tril()
            self.mask = mask[None, None]  # (1, 1, N, N)
        elif self.kernel == "flex":
            self.block_mask = _document_block_mask(packed, causal)
        elif self.kernel == "gathered":
            self._gather_index(packed, causal)

    def _gather_index(self, packed: PackedBatch, causal: bool) -> None:
        device = packed.input_ids.device
        lengths = torch.as_tensor(packed.lengths, dtype=torch.long, device=device)  # (B,)
        B, L = packed.num_texts, max(packed.max_seqlen, 1)
        pos = torch.arange(L, device=device)[None].expand(B, L)
        real = pos < lengths[:, None]  # (B, L)
        # Token index of (text b, position l); a padding slot reads token 0 (never a key: masked; never output).
        self.source = (packed.cu_seqlens[:-1, None] + pos).masked_fill(~real, 0).flatten()  # (B * L,)
        self.target = real.flatten().nonzero().squeeze(1)  # (N,): the real slots, in the packed order
        # An empty text's row attends to everything rather than to nothing (NaN); it is never read.
        keys = (real | ~real.any(-1, keepdim=True))[:, None, None, :]  # (B, 1, 1, L)
        self.mask = keys & torch.ones(L, L, dtype=torch.bool, device=device).tril() if causal else keys
        self.shape = (B, L)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (1, heads, N, D) -> (1, heads, N, D)."""
        if self.kernel == "gathered":
            return self._gathered(q, k, v)
        if self.kernel == "segments":
            return _segments(q, k, v, self.spans, self.causal)
        if self.kernel == "dense":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        if self.kernel == "flex":
            return _flex()(q, k, v, block_mask=self.block_mask)
        if self.kernel == "jagged":
            return _jagged(q, k, v, self.packed, self.causal)
        return _varlen(q, k, v, self.packed, self.causal)

    def _gathered(self, q, k, v) -> torch.Tensor:
        if not self.spans:
            return torch.zeros_like(q)
        (B, L), heads, D = self.shape, q.shape[1], q.shape[3]

        def padded(x):  # (1, heads, N, D) -> (B, heads, L, D)
            return x[0][:, self.source].view(heads, B, L, D).transpose(0, 1)

        out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=self.mask)
        return out.transpose(0, 1).reshape(heads, B * L, D)[:, self.target][None]


def _starts(lengths: tuple[int, ...]) -> list[int]:
    out, total = [], 0
    for n in lengths:
        out.append(total)
        total += n
    return out


@torch.compiler.disable  # a Python loop over host ints: under torch.compile it runs eagerly, not per-shape graphs
def _segments(q, k, v, spans, causal: bool) -> torch.Tensor:
    if not spans:
        return torch.zeros_like(q)
    parts = [
        F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=causal)
        for a, b in spans
    ]
    return torch.cat(parts, dim=2)


def _document_block_mask(packed: PackedBatch, causal: bool):
    from torch.nn.attention.flex_attention import create_block_mask

    seg = packed.segment_ids()

    def same_text(b, h, q_idx, kv_idx):
        keep = seg[q_idx] == seg[kv_idx]
        return keep & (q_idx >= kv_idx) if causal else keep

    n = packed.num_tokens
    return create_block_mask(same_text, None, None, n, n, device=packed.input_ids.device)


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    return x[0].transpose(0, 1)  # (1, heads, N, D) -> (N, heads, D)


def _from_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1)[None]  # (N, heads, D) -> (1, heads, N, D)


def _jagged(q, k, v, packed: PackedBatch, causal: bool) -> torch.Tensor:
    # Nested jagged tensors (B, j, heads, D) -> transpose to (B, heads, j, D), SDPA's layout.
    offsets = packed.cu_seqlens
    nq, nk, nv = (
        torch.nested.nested_tensor_from_jagged(_as_tokens(x).contiguous(), offsets).transpose(1, 2)
        for x in (q, k, v)
    )
    out = F.scaled_dot_product_attention(nq, nk, nv, is_causal=causal)
    return _from_tokens(out.transpose(1, 2).values())


def _varlen(q, k, v, packed: PackedBatch, causal: bool) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = packed.cu_seqlens.to(torch.int32)
    n = packed.max_seqlen
    out = flash_attn_varlen_func(_as_tokens(q), _as_tokens(k), _as_tokens(v), cu, cu, n, n, causal=causal)
    return _from_tokens(out)
