"""bidir-server: an OpenAI-compatible embedding server over the same backends and tokenization as batch-embed, and a
reranking server (Cohere / Jina, TEI and NIM APIs) when its model is a reranker.

config.py   ServerConfig (every setting, checked)
schema.py   the /v1/embeddings request and response (OpenAI's, plus NIM's input_type and truncate)
rerank_schema.py  the rerank APIs' requests, responses and error JSON (Cohere / Jina, TEI, NIM)
rerank.py   the rerank routes: pairs tokenized by bidir_core's tokenize_pairs, scored through the batcher
tokens.py   a request's inputs -> token ids (prefix, truncation), as batch-embed makes them
batcher.py  the dynamic batcher: the bounded queue and the one model thread
metrics.py  Prometheus metrics and the periodic summary
errors.py   ApiError, carried as OpenAI's error JSON
guard.py    who may ask: the Host header (DNS rebinding) and the API key
handling.py what every POST route does around its work (answer and metrics, body limits, model kind, disconnects)
app.py      the FastAPI app and /v1/embeddings
runner.py   uvicorn: the socket, the connection timeouts, signals, graceful shutdown
cli.py      the bidir-server command line
"""

from __future__ import annotations

from bidir_serve.server.app import create_app
from bidir_serve.server.config import ServerConfig
from bidir_serve.server.runner import Runner

__all__ = ["Runner", "ServerConfig", "create_app"]
