"""bidir-serve: batch embedding and an OpenAI-compatible embedding server (bidir_serve.server, the bidir-server
command) for bidir models over torch, onnxruntime and TensorRT backends.

from bidir_serve import BatchEmbedConfig, embed_corpus, load_backend
"""

from __future__ import annotations

from bidir_serve.backends import load_backend
from bidir_serve.batch import BatchEmbedConfig, EmbedSummary, embed_corpus

__version__ = "0.1.0"

__all__ = ["BatchEmbedConfig", "EmbedSummary", "embed_corpus", "load_backend"]
