"""Running the installed command-line tools the way a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run(*argv: str | Path, timeout: float = 900) -> str:
    """Run an installed CLI (a console script next to this interpreter, or `python -m ...`) the way a user does;
    fail with its output when it exits non-zero. Returns stdout + stderr."""
    argv = [str(a) for a in argv]
    script = Path(sys.executable).parent / argv[0]
    if argv[0] == "python":
        argv[0] = sys.executable
    elif script.is_file():
        argv[0] = str(script)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{output[-4000:]}"
    return output
