"""Running the app on uvicorn: the listening socket, signals and the graceful shutdown.

SIGTERM (or Ctrl-C) stops accepting connections, lets every admitted request finish (the model thread stops
waiting to fill batches and runs what is queued), then ends the model thread; a SIGTERM ends the process with 0 (a
clean stop, as a container orchestrator expects), Ctrl-C with 130. The socket is bound before uvicorn starts, so a
port in use is one line from the CLI (an OSError), and port 0 picks a free one (`Runner.port` says which).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable

import uvicorn

from bidir_core.errors import BidirError
from bidir_serve.backends import Backend
from bidir_serve.server.app import create_app
from bidir_serve.server.config import ServerConfig

log = logging.getLogger("bidir_serve.server")


class _Server(uvicorn.Server):
    """uvicorn.Server whose signals start the batcher's flush and whose SIGTERM is a clean exit."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self._on_exit = on_exit
        self.interrupted = False

    def handle_exit(self, sig: int, frame) -> None:
        self._on_exit()
        self.interrupted = self.interrupted or sig == signal.SIGINT
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own re-raises the signal after its graceful shutdown, so a SIGTERM'd server would end with status
        # 143 even though it finished every request; here the shutdown is the signal's whole effect.
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
        if self.interrupted:
            raise KeyboardInterrupt


class Runner:
    """One bidir-server: the app, its uvicorn server and its bound socket. run() blocks until shutdown."""

    def __init__(self, cfg: ServerConfig, load: Callable[[], Backend] | None = None, log_level: str = "info"):
        self.cfg = cfg
        self.socket = _bind(cfg.host, cfg.port)
        self.port = self.socket.getsockname()[1]
        """The port listened on (the one picked when cfg.port is 0)."""
        self.app = create_app(cfg, load, on_fatal=lambda e: self.stop())
        self.batcher = self.app.state.server.batcher
        config = uvicorn.Config(
            self.app,
            log_level=log_level,
            log_config=None,  # our logging setup (cli.py) formats uvicorn's lines too
            access_log=False,  # one debug line per request comes from the app instead
            lifespan="on",
            timeout_keep_alive=30,
        )
        self.server = _Server(config, on_exit=self._flush)

    @property
    def url(self) -> str:
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until a signal or stop(); raises what made the model fail to load, if it did."""
        log.info("bidir-server: serving %s as %r on %s", self.cfg.model, self.cfg.model_id, self.url)
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()
        if self.batcher.load_error is not None:
            raise self.batcher.load_error

    def stop(self) -> None:
        """Begin the graceful shutdown (from any thread)."""
        self._flush()
        self.server.should_exit = True

    def _flush(self) -> None:
        self.batcher.flushing = True


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise BidirError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise BidirError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    return sock
