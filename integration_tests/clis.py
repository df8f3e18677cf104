"""Running the installed command-line tools the way a user does."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bidir_export.tensorrt_build import tensorrt_missing_message

# Without TensorRT (or a GPU) export-trt stops with this, after every option and profile was checked.
TENSORRT_MISSING = re.compile(r"export-trt: error: (TensorRT is not installed|no CUDA GPU here)")
TENSORRT_HERE = tensorrt_missing_message() is None


def run(*argv: str | Path, timeout: float = 900, cwd: Path | None = None) -> str:
    """Run an installed CLI (a console script next to this interpreter, or `python -m ...`) the way a user does;
    fail with its output when it exits non-zero. Returns stdout + stderr."""
    returncode, output = _run(argv, timeout, cwd)
    assert returncode == 0, f"{' '.join(map(str, argv))} exited {returncode}:\n{output[-4000:]}"
    return output


def fails(*argv: str | Path, timeout: float = 900, cwd: Path | None = None, code: int = 2) -> str:
    """Like run, for a command that must fail as a user error does: exit 2, the code every bidir CLI uses (a crash
    exits 1; torchrun exits 1 whatever its workers did, so pass code=1 there). Returns its output."""
    returncode, output = _run(argv, timeout, cwd)
    assert returncode == code, (
        f"{' '.join(map(str, argv))} exited {returncode}, not {code}:\n{output[-4000:]}"
    )
    return output


def _run(argv, timeout: float, cwd: Path | None) -> tuple[int, str]:
    argv = [str(a) for a in argv]
    script = Path(sys.executable).parent / argv[0]
    if argv[0] == "python":
        argv[0] = sys.executable
    elif script.is_file():
        argv[0] = str(script)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    return proc.returncode, proc.stdout + proc.stderr


@contextlib.contextmanager
def serving(*argv: str | Path, port: int, cwd: Path | None = None, timeout: float = 120) -> Iterator[str]:
    """Start a server CLI (as run() starts a CLI) and yield its base URL once GET /health answers 200; on leaving,
    SIGTERM it, which must end it with exit 0 (graceful shutdown)."""
    argv = [str(a) for a in argv]
    script = Path(sys.executable).parent / argv[0]
    if script.is_file():
        argv[0] = str(script)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, (
                f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout.read()[-4000:]}"
            )
            assert time.monotonic() < deadline, f"{' '.join(argv)}: not ready after {timeout} s"
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:  # not listening yet, or 503 while loading
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode} on SIGTERM:\n{output[-4000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
