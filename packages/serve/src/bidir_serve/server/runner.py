"""Running the app on uvicorn: the listening socket, the connection timeouts, signals and the graceful shutdown.

SIGTERM (or Ctrl-C) stops accepting connections, lets every admitted request finish (the model thread stops
waiting to fill batches and runs what is queued) for up to --timeout-graceful-shutdown seconds (then uvicorn cancels
what is left, answered 503), then ends the model thread; a SIGTERM ends the process with 0 (a clean stop, as a
container orchestrator expects), Ctrl-C with 130. The socket is bound before uvicorn starts, so a port in use is one
line from the CLI (an OSError), and port 0 picks a free one (`Runner.port` says which).

Timeouts, and what uvicorn (0.54, its h11 protocol) leaves to us. uvicorn has one timer on a connection: the
keep-alive one, armed when an answer is complete and cancelled by any byte received. So by itself it never closes a
new connection that sends nothing, nor one that sends part of a request's headers and then nothing (or a byte now
and then), nor one whose body stalls; a shutdown closes idle connections and ones with partial headers, and waits
for the rest. `_Http` adds what is missing, with the least of it: a new connection gets the keep-alive timer too,
and bytes of a request whose headers are not all in (or of a body left unread after an answer) start one
--timeout-read timer, which does not restart with each byte. The body of a request the app reads is timed by the
app (app.py: a 408 it can still send). The h11 protocol is used even where httptools is installed (uvicorn's
default then), so these timers hold wherever the server runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import signal
import socket
import threading
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

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


class _Http(H11Protocol):
    """uvicorn's h11 protocol, plus the timers it lacks (see the module docstring)."""

    def __init__(self, *args, timeout_read: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeout_read = timeout_read
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._idle()

    def data_received(self, data: bytes) -> None:
        # uvicorn's: cancels the keep-alive timer, and starts the app once a request's headers are in
        super().data_received(data)
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_read_timer()
        super().connection_lost(exc)

    def _watch(self) -> None:
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._stop_read_timer()  # a request is being answered: the app times its body
        elif self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0]:
            if self._read_timer is None:  # part of a request is in: from its first byte, not its latest
                self._read_timer = self.loop.call_later(self.timeout_read, self._read_timeout)
        else:
            self._stop_read_timer()
            self._idle()

    def _idle(self) -> None:
        """Nothing is expected but a new request: close after --timeout-keep-alive, as uvicorn does after an answer."""
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _read_timeout(self) -> None:
        self._read_timer = None
        if self.cycle is None or self.cycle.response_complete:  # still no request to answer: nobody to tell
            self.transport.close()

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None


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
            http=functools.partial(_Http, timeout_read=cfg.timeout_read),
            timeout_keep_alive=cfg.timeout_keep_alive,
            timeout_graceful_shutdown=cfg.timeout_graceful_shutdown,
        )
        self.server = _Server(config, on_exit=self._flush)

    @property
    def url(self) -> str:
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until a signal or stop(); raises what made the model fail to load, if it did."""
        log.info("bidir-server: serving %s as %r on %s", self.cfg.model, self.cfg.model_id, self.url)
        if not self.cfg.api_key and not _is_loopback(self.socket.getsockname()[0]):
            log.warning(
                "bidir-server: %s is reachable beyond this machine and no API key is set, so anyone who reaches it can "
                "use it: set BIDIR_API_KEY (or --api-key), or listen on 127.0.0.1 behind a proxy",
                self.url,
            )
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


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.partition("%")[0]).is_loopback


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
