"""bidir-serve: batch embedding with bidir models over torch, onnxruntime and TensorRT backends.

from bidir_serve import BatchEmbedConfig, embed_corpus, load_backend
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["BatchEmbedConfig", "EmbedSummary", "embed_corpus", "load_backend"]


def __getattr__(name: str):
    # Lazy, so `python -m bidir_serve.batch_embed` does not find its own module already imported by the package.
    if name == "load_backend":
        from bidir_serve.backends import load_backend

        return load_backend
    if name in ("BatchEmbedConfig", "EmbedSummary", "embed_corpus"):
        from bidir_serve import batch_embed

        return getattr(batch_embed, name)
    raise AttributeError(f"module 'bidir_serve' has no attribute {name!r}")
