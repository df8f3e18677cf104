"""The Llama decoder stack with bidirectional (or causal) attention: Llama, Mistral, Ministral(3), Qwen2, Qwen3.

A compact re-implementation of transformers' `LlamaModel` whose attention sees every real token of the sequence
(a padding mask, no causal mask), or in causal mode (`config.is_causal` true, as for Qwen3-Embedding or
e5-mistral) the real tokens up to each query. The other families differ only in a few details (families.py): bias
on q/k/v (Qwen2), an RMSNorm over each head's q and k (Qwen3). Sliding-window attention is off in both modes: the
model attends over the whole text, and an encoder whose max_length exceeds a config's window is refused
(families.check_max_length). Parameter names are the Hugging Face `{Family}Model` keys (LlamaModel,
Qwen2Model, ...), so those checkpoints load into it. The forward pass has no `.item()`, no branch on tensor
values and nothing distributed, so it exports (torch.export / ONNX) and shards (FSDP2 per layer) cleanly.

Shapes: B batch, T sequence, H hidden, N query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from bidir_core.errors import BidirError
from bidir_core.families import check_config, family_of, is_causal_config, projection_bias
from bidir_core.packed import PackedBatch
from bidir_core.packed_attention import PackedAttention
from bidir_core.sources import ModelSource, open_source


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in (at least) fp32 and cast back before the weight, exactly as Llama does (matters in bf16);
        # a float64 model (the export verification's reference) stays in float64 throughout.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _head_dim(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE. Frequencies come from transformers' own init functions, so every rope_type
    (default, linear, dynamic NTK, yarn, llama3) is computed the way the checkpoint was trained."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        self.register_buffer("inv_freq", torch.empty(_head_dim(config) // 2), persistent=False)
        self.attention_scaling = 1.0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)compute inv_freq on CPU; also called after loading weights into a model built on the meta device."""
        with torch.device("cpu"):
            if self.rope_type == "default":  # transformers keeps no "default" entry in ROPE_INIT_FUNCTIONS
                base = self.config.rope_parameters["rope_theta"]
                dim = _head_dim(self.config)
                inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
                scaling = 1.0
            else:
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, torch.device("cpu"))
        self.inv_freq = inv_freq.to(self.inv_freq.device if self.inv_freq.device.type != "meta" else "cpu")
        self.attention_scaling = float(scaling)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts floating buffers too, and bf16 frequencies would shift every position by up to
        # ~0.4%: whatever .to() did, recompute them in fp32 on the buffer's (new) device.
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.reset_parameters()
        return self

    def forward(
        self,
        position_ids: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        seq_lens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) int64 -> cos, sin (B, T, D) in dtype (fp32, or float64 for a float64 model).
        seq_lens (B, T): the length of each token's text, for a packed batch (several texts in one row)."""
        inv_freq = self.inv_freq[None, None, :]  # (1, 1, D/2)
        if self.rope_type == "dynamic":
            # Dynamic NTK stretches the base once a text outgrows max_position_embeddings. Per row, from the
            # row's own length, so a text's embedding does not depend on its batch neighbours (transformers uses
            # the batch's longest row, and caches the largest length seen so far across calls).
            if seq_lens is None:
                seq_len = position_ids.amax(dim=-1, keepdim=True) + 1  # (B, 1): real tokens per row
                inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](
                    self.config, position_ids.device, seq_len=seq_len
                )
                inv_freq = inv_freq[:, None, :]  # (B, 1, D/2)
            else:  # packed: per token, from its own text's length
                seq_len = seq_lens[..., None]  # (B, T, 1)
                inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](
                    self.config, position_ids.device, seq_len=seq_len
                )
        freqs = position_ids[..., None].to(dtype) * inv_freq.to(dtype)  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, D); cos/sin (B, 1, T, D) already in x's dtype."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = _head_dim(config)
        qkv_bias, o_bias = projection_bias(config)  # Qwen2: q/k/v only; Llama: attention_bias on all four
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=o_bias)
        self.q_norm = self.k_norm = None
        if family_of(config).qk_norm:  # Qwen3: RMSNorm over each head's D features of q and k
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | PackedAttention
    ) -> torch.Tensor:
        """x (B, T, H); mask (B, 1, 1 or T, T) bool, True where the query may attend to the key; or, for a packed batch
        (B = 1, T = its N tokens), the PackedAttention that keeps each text to itself."""
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)  # (B, N, T, D) each
        if isinstance(mask, PackedAttention):
            out = mask(q, k, v)
        else:  # causality, if any, is in the mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, H) -> q, k, v (B, N, T, D), RoPE applied, K/V heads repeated to N (padded and packed alike)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, N, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, N, T, D), (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            # Grouped-query attention: each K/V head serves N/K query heads. An explicit expand keeps the graph
            # portable (ONNX, TensorRT) where SDPA's enable_gqa is not.
            rep = self.n_heads // self.n_kv_heads
            k = (
                k[:, :, None]
                .expand(B, self.n_kv_heads, rep, T, self.head_dim)
                .reshape(B, self.n_heads, T, -1)
            )
            v = (
                v[:, :, None]
                .expand(B, self.n_kv_heads, rep, T, self.head_dim)
                .reshape(B, self.n_heads, T, -1)
            )
        return q, k, v


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | PackedAttention
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBidirectionalModel(nn.Module):
    """Decoder stack (Llama, Mistral, Ministral(3), Qwen2, Qwen3: families.py) with bidirectional attention, or
    causal attention when config.is_causal is true: (input_ids, attention_mask) -> hidden states (B, T, H)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        check_config(config)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.attention_kernel = "auto"
        """Packed batches' attention kernel (bidir_core.packed_attention.KERNELS); "auto": the device's fastest."""

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def causal(self) -> bool:
        """Whether it attends causally: its config's is_causal, the one record of the attention mode (sources.py)."""
        return is_causal_config(self.config)

    def forward(
        self, input_ids: torch.Tensor | PackedBatch, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids (B, T) int64; attention_mask (B, T), 1 for real tokens, 0 for padding (left or right).
        Or a PackedBatch (no mask): -> hidden states (N, H) of its N tokens (see forward_packed)."""
        if isinstance(input_ids, PackedBatch):  # one forward for both, so FSDP2's hooks run for either
            return self.forward_packed(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        real = attention_mask.bool()  # (B, T)
        # Positions count real tokens only, so a text gets the same positions alone, right- or left-padded.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        # A row of only padding would leave softmax with nothing to attend to (NaN); let such a row attend to
        # everything instead. Its output is never read, but NaNs must not reach the pooled batch.
        key_mask = real | ~real.any(dim=-1, keepdim=True)
        mask = key_mask[:, None, None, :]  # (B, 1, 1, T), broadcast over heads and queries
        if self.causal:
            # Each real query sees the real keys at or before it (never empty: itself). A padding query would see
            # none with left padding (NaN); it attends to every key instead, and its output is never read.
            T = input_ids.shape[1]
            index = torch.arange(T, device=input_ids.device)
            earlier = index[None, :] <= index[:, None]  # (T query, T key)
            mask = (mask & earlier) | ~real[:, None, :, None]  # (B, 1, T, T)
        if torch.compiler.is_exporting():
            # (B, 1, T, T) in exported graphs: onnxruntime's Attention op (ONNX opset 23) does not broadcast the
            # query axis of a mask. Eager PyTorch keeps the broadcast mask, which its SDPA kernels run faster.
            T = input_ids.shape[1]
            mask = mask.expand(-1, 1, T, T)

        x = self.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rotary_emb(position_ids, torch.promote_types(x.dtype, torch.float32))
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, D)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)

    def forward_packed(self, packed: PackedBatch) -> torch.Tensor:
        """A packed batch (bidir_core.packed) -> hidden states (N, H). Each text attends to itself only and its
        positions restart at 0, so each text's states equal those of the padded forward. Call it through forward
        (model(packed)) on a sharded model, whose hooks are on forward."""
        attend = PackedAttention(packed, self.attention_kernel, causal=self.causal)
        x = self.embed_tokens(packed.input_ids)[None]  # (1, N, H): the stream is one row
        if packed.num_tokens == 0:  # only empty texts: nothing to attend over
            return self.norm(x)[0]
        dtype = torch.promote_types(x.dtype, torch.float32)
        cos, sin = self.rotary_emb(packed.position_ids[None], dtype, seq_lens=packed.token_seq_lens()[None])
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (1, 1, N, D)
        for layer in self.layers:
            x = layer(x, cos, sin, attend)
        return self.norm(x)[0]

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | ModelSource,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        attention: str | None = None,
    ) -> LlamaBidirectionalModel:
        """The model of any source bidir_core.sources opens (or one it opened): a Hugging Face folder of a supported
        family, an NVIDIA llama_bidirec folder, a bidir checkpoint, a .gguf file, or the name of the embedded
        default model ("smollm2-135m"). In eval mode; attention "bidirectional" or "causal" (None: the source's
        own, a bidir checkpoint's bidir.json; any other source is bidirectional)."""
        source = open_source(source, attention)
        return cls.from_state_dict(source.config, load_model_weights(source, dtype), device=device)

    @classmethod
    def from_state_dict(
        cls,
        config: LlamaConfig,
        state_dict: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
    ) -> LlamaBidirectionalModel:
        """Build the model without a random init (meta device) and adopt the given tensors, in eval mode."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        model.rotary_emb.reset_parameters()
        model.eval()
        return model.to(device) if device is not None else model


def load_model_weights(source: ModelSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict of an opened source in dtype, checked against the model its config builds."""
    state_dict, where = source.read_weights(dtype)
    check_state_dict(source.config, state_dict, where)
    return state_dict


def check_state_dict(
    config: LlamaConfig, state_dict: dict[str, torch.Tensor], where: dict[str, Path] | Path
) -> None:
    """Every key the model has, with the shape config.json implies, and nothing else; `where` names the file (or
    each key's file) in the error."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlamaBidirectionalModel(config).state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    if missing:
        folder = where if isinstance(where, Path) else next(iter(where.values()), Path("?")).parent
        raise BidirError(f"{folder}: {len(missing)} weights missing, e.g. {', '.join(missing[:3])}")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        folder = where if isinstance(where, Path) else where[unexpected[0]]
        raise BidirError(
            f"{folder}: unexpected weights for a {config.model_type} model, e.g. {', '.join(unexpected[:3])}"
        )
    for key, shape in expected.items():
        got = tuple(state_dict[key].shape)
        if got != shape:
            file = where if isinstance(where, Path) else where[key]
            raise BidirError(
                f"{file}: weight {key} has shape {list(got)}, but config.json implies {list(shape)}"
            )
