"""Tests for tools/check_imports.py, run on small fake package trees."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "check_imports.py"


@pytest.fixture(scope="module")
def check_imports():
    spec = importlib.util.spec_from_file_location("check_imports", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_forbidden_imports_are_reported(tmp_path, check_imports):
    _write(tmp_path, "packages/core/src/bidir_core/__init__.py", "")
    _write(tmp_path, "packages/core/src/bidir_core/model.py", "import os\nimport bidir_train.loop\n")
    _write(tmp_path, "packages/train/src/bidir_train/__init__.py", "from bidir_core import BiEncoder\n")
    _write(
        tmp_path,
        "packages/export/src/bidir_export/onnx/run.py",
        "def f():\n    from bidir_serve.backends import torch_backend\n",
    )
    _write(tmp_path, "packages/serve/tests/test_x.py", "\n\nfrom bidir_export import manifest\n")
    _write(
        tmp_path,
        "packages/serve/src/bidir_serve/lazy.py",
        "import importlib\nimportlib.import_module('bidir_train')\n",
    )

    assert sorted(check_imports.find_violations(tmp_path)) == [
        "packages/core/src/bidir_core/model.py:2: bidir_core imports bidir_train",
        "packages/export/src/bidir_export/onnx/run.py:2: bidir_export imports bidir_serve",
        "packages/serve/src/bidir_serve/lazy.py:2: bidir_serve imports bidir_train",
        "packages/serve/tests/test_x.py:3: bidir_serve imports bidir_export",
    ]
    assert check_imports.main([str(tmp_path)]) == 1


def test_allowed_tree_reports_nothing(tmp_path, check_imports, capsys):
    _write(tmp_path, "packages/core/src/bidir_core/__init__.py", "from .model import Model\nimport torch\n")
    _write(
        tmp_path,
        "packages/core/tests/test_core.py",
        "import bidir_core\nfrom bidir_core.pooling import avg\n",
    )
    for name in ("train", "export", "serve"):
        _write(
            tmp_path,
            f"packages/{name}/src/bidir_{name}/__init__.py",
            f"import bidir_core\nfrom bidir_core.testing import tiny\nfrom . import x\nfrom .x import y\n"
            f"import bidir_{name}.sub\n",
        )
    # Names that merely start with a package's name are not that package.
    _write(tmp_path, "packages/serve/tests/test_s.py", "import bidir_trainer_compat\nimport bidir_core\n")

    assert check_imports.find_violations(tmp_path) == []
    assert check_imports.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "import contract OK (6 files)"


def test_unparsable_file_is_reported(tmp_path, check_imports):
    _write(tmp_path, "packages/train/src/bidir_train/broken.py", "def f(:\n")

    [violation] = check_imports.find_violations(tmp_path)
    assert violation.startswith("packages/train/src/bidir_train/broken.py:1: cannot parse")


def test_import_circles_are_reported_one_line_each(tmp_path, check_imports):
    core = "packages/core/src/bidir_core"
    _write(tmp_path, f"{core}/__init__.py", "from bidir_core.model import Model\n")
    # model -> loader at the top, loader -> model inside a function: the lazy import still closes the circle.
    _write(tmp_path, f"{core}/model.py", "import torch\nfrom bidir_core.loader import load\n")
    _write(tmp_path, f"{core}/loader.py", "def load():\n    from bidir_core import model\n")
    # A circle of relative imports inside a subpackage, through three files.
    _write(tmp_path, f"{core}/data/__init__.py", "")
    _write(tmp_path, f"{core}/data/a.py", "from .b import B\n")
    _write(tmp_path, f"{core}/data/b.py", "\nfrom bidir_core.data.c import C\n")
    _write(tmp_path, f"{core}/data/c.py", "import importlib\nimportlib.import_module('bidir_core.data.a')\n")
    _write(tmp_path, "packages/serve/src/bidir_serve/__init__.py", "")

    assert sorted(check_imports.find_violations(tmp_path)) == [
        f"import circle: {core}/data/a.py:1 -> {core}/data/b.py:2 -> {core}/data/c.py:2 -> {core}/data/a.py",
        f"import circle: {core}/loader.py:2 -> {core}/model.py:2 -> {core}/loader.py",
    ]
    assert check_imports.main([str(tmp_path)]) == 1


def test_one_way_imports_are_no_circle(tmp_path, check_imports, capsys):
    core = "packages/core/src/bidir_core"
    # The package __init__ imports its modules and they import each other one way; `import bidir_core.x` in a
    # module names bidir_core.x, not the __init__ Python runs first.
    _write(
        tmp_path, f"{core}/__init__.py", "from bidir_core.encoder import Encoder\nfrom .model import Model\n"
    )
    _write(tmp_path, f"{core}/encoder.py", "import bidir_core.model\nfrom bidir_core import pooling\n")
    _write(tmp_path, f"{core}/model.py", "def load():\n    from bidir_core.pooling import avg\n")
    _write(tmp_path, f"{core}/pooling.py", "import torch\n")
    _write(tmp_path, "packages/train/src/bidir_train/__init__.py", "from bidir_core import Encoder\n")
    _write(
        tmp_path,
        "packages/train/src/bidir_train/loop.py",
        "import bidir_train\nfrom bidir_core import model\n",
    )

    assert check_imports.find_circles(tmp_path) == []
    assert check_imports.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "import contract OK (6 files)"
