"""The command-line flags that choose a backend, shared by batch-embed and bidir-server (one wording, one set of
choices)."""

from __future__ import annotations

import argparse

from bidir_serve.backends import BACKENDS, PRECISIONS


def add_backend_arguments(p: argparse.ArgumentParser, backend: str) -> None:
    """--backend (default `backend`), --device, --precision, --compile."""
    p.add_argument("--backend", choices=BACKENDS, default=backend, help="runtime (default auto)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        help="torch compute dtype (default bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--compile", action="store_true", help="torch backend: torch.compile the model")
