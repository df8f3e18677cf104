"""bidir-server: an OpenAI-compatible embedding server over the same backends and tokenization as batch-embed.

config.py   ServerConfig (every setting, checked)
schema.py   the /v1/embeddings request and response (OpenAI's, plus NIM's input_type and truncate)
tokens.py   a request's inputs -> token ids (prefix, truncation), as batch-embed makes them
batcher.py  the dynamic batcher: the bounded queue and the one model thread
metrics.py  Prometheus metrics and the periodic summary
errors.py   ApiError, carried as OpenAI's error JSON
guard.py    who may ask: the Host header (DNS rebinding) and the API key
app.py      the FastAPI app (routes, limits, disconnects)
runner.py   uvicorn: the socket, the connection timeouts, signals, graceful shutdown
cli.py      the bidir-server command line
"""

from __future__ import annotations

from bidir_serve.server.app import create_app
from bidir_serve.server.config import ServerConfig
from bidir_serve.server.runner import Runner

__all__ = ["Runner", "ServerConfig", "create_app"]
