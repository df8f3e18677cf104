"""Where a job runs and which precision suits it there: the one home of the default device, so every CLI and
benchmark picks the same one, and of what `auto` means for training (recipes' model.precision) and the benchmarks
(--dtype auto). Serving keeps its own default (bidir_serve's torch backend: bf16 on a GPU, fp32 on a CPU).

- default_device(): "cuda" where torch sees a GPU, else "cpu".
- native_bf16(device): whether the device computes bf16 in hardware. A CUDA GPU from Ampere on does; a CPU does
  with AMX or AVX512-BF16. Elsewhere torch emulates it: on a Xeon with AVX512 but neither, a forward of SmolLM2-135M
  takes 2.8x as long in bf16 as in fp32 and a training step 2.9x (the train README), so there fp32 is both faster
  and more precise.
- resolve_precision("auto", device): "bf16" where native_bf16, "fp32" elsewhere; "bf16" and "fp32" as given.
- precision_dtype(precision, device): that precision as the torch dtype the weights are loaded in (bidir-eval,
  bidir-mine and bidir-rescore --precision).
"""

from __future__ import annotations

import torch

from bidir_core.errors import BidirError

PRECISIONS = ("auto", "bf16", "fp32")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # torch names these checks privately (torch.cpu._is_*); a torch without them gets the safe answer: fp32
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False  # mps, xpu, ...: not measured here; fp32 is the precision that is right everywhere


def check_precision(precision: str) -> None:
    """A BidirError unless precision is one of PRECISIONS (configs check it before any device is known)."""
    if precision not in PRECISIONS:
        raise BidirError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """ "bf16" or "fp32": `precision` itself, or for "auto" the one that suits `device` (native_bf16)."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def precision_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """resolve_precision(precision, device) as a torch dtype: torch.bfloat16 or torch.float32."""
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else torch.float32
