"""installed-docstrings on a made-up site-packages folder: deterministic, split by module with no module on both
sides, trivial / repeated / private / test / stdlib docstrings left out, and resolved by name like stdlib-docstrings."""

from __future__ import annotations

import textwrap

import pytest

from bidir_core.datasets import builtin_counts, load_retrieval, read_texts, read_training_examples
from bidir_core.datasets.installed import (
    INSTALLED_DOCSTRINGS,
    _build,
    _is_dev,
    installed_counts,
    installed_dev,
    installed_train,
    module_files,
)
from bidir_core.errors import BidirError

GOOD = '''
def {name}(x, y=2):
    """{summary} number {i} for the {pkg} package.

    A longer explanation of what {name} ({i}) does with x and y, written
    so that the passage has a real body of text in it.
    """
'''


def _site(root, n_modules=200):
    """A site-packages tree: packages pkg0..pkg5 with modules, plus things that must be left out."""
    for m in range(n_modules):
        pkg = f"pkg{m % 6}"
        (root / pkg).mkdir(parents=True, exist_ok=True)
        (root / pkg / "__init__.py").write_text('"""Package docs."""\n')
        body = "".join(
            GOOD.format(name=f"func_{k}", summary="Compute the value", i=f"{m}-{k}", pkg=pkg)
            for k in range(3)
        )
        (root / pkg / f"mod{m}.py").write_text(body)
    # Trivial: a two-word summary, no body, a passage repeating the summary.
    (root / "pkg0" / "trivial.py").write_text(
        textwrap.dedent('''
        def short():
            """Too short."""

        def bodiless():
            """This summary has no body at all."""
        ''')
    )
    # An exact copy of a docstring under another name and module: kept once.
    (root / "pkg1" / "copy.py").write_text(
        GOOD.format(name="other", summary="Compute the value", i="0-0", pkg="pkg0")
    )
    # Private, vendored, test and dist-info files are not library code.
    for rel in (
        "pkg2/_private.py",
        "pkg2/_vendor/lib.py",
        "pkg3/tests/test_x.py",
        "thing-1.0.dist-info/x.py",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(GOOD.format(name="hidden", summary="Never seen here", i=rel, pkg="x"))
    # A docstring copied from the standard library (as typing_extensions does): left out.
    (root / "pkg4" / "backport.py").write_text(
        'def dedent(text):\n    """Remove any common leading whitespace from every line in `text`.\n\n'
        "    This can be used to make triple-quoted strings line up with the left\n"
        '    edge of the display, while still presenting them in the source code.\n    """\n'
    )
    return root


@pytest.fixture
def site(tmp_path):
    _build.cache_clear()
    yield (_site(tmp_path / "site-packages"),)
    _build.cache_clear()


def test_deterministic_and_leak_free(site):
    train, dev, counts = installed_train(site), installed_dev(site), installed_counts(site)
    _build.cache_clear()  # mined again from scratch: the same pairs and the same split
    assert installed_train(site) == train and installed_dev(site) == dev and installed_counts(site) == counts
    assert len(train) > 100 and dev.queries, counts
    module = {q: q.rsplit(".", 1)[0] for q in dev.corpus}  # qualified names are module.function
    train_modules = {e.positive_ids[0].rsplit(".", 1)[0] for e in train}
    dev_modules = set(module.values())
    assert dev_modules and not dev_modules & train_modules  # no module on both sides
    assert all(_is_dev(m) for m in dev_modules) and not any(_is_dev(m) for m in train_modules)
    assert counts["dev_modules"] == len(dev_modules) and counts["dev"] == len(dev.queries)
    assert all(len(j) == 1 and set(j) <= set(dev.corpus) for j in dev.qrels.values())
    assert not {e.query for e in train} & set(dev.queries.values())


def test_skips_trivial_duplicate_private_and_stdlib(site):
    counts = installed_counts(site)
    names = {e.positive_ids[0] for e in installed_train(site)} | set(installed_dev(site).corpus)
    assert not any(n.startswith("pkg0.trivial") for n in names)
    assert counts["trivial"] >= 2
    # The copy keeps only its first occurrence (pkg0.mod0 sorts before pkg1.copy).
    assert "pkg1.copy.other" not in names and "pkg0.mod0.func_0" in names and counts["duplicate"] >= 1
    assert not any("hidden" in n or "_private" in n or "tests" in n for n in names)
    assert {m for m, _ in module_files(site)} >= {"pkg0", "pkg0.mod0"}
    assert not any(m.startswith(("pkg2._", "pkg3.tests", "thing")) for m, _ in module_files(site))
    assert "pkg4.backport.dedent" not in names and counts["excluded"] == 1
    total = counts["train"] + counts["dev"] + counts["trivial"] + counts["duplicate"] + counts["excluded"]
    assert total == counts["docstrings"]


def test_resolved_by_name(monkeypatch, site):
    import bidir_core.datasets.installed as installed

    monkeypatch.setattr(installed, "_roots", lambda roots: site)
    assert list(read_training_examples(INSTALLED_DOCSTRINGS)) == installed_train()
    assert (
        load_retrieval(INSTALLED_DOCSTRINGS) == installed_dev() == load_retrieval(INSTALLED_DOCSTRINGS, "dev")
    )
    assert read_texts(INSTALLED_DOCSTRINGS) == [e.positives[0] for e in installed_train()]
    assert builtin_counts(INSTALLED_DOCSTRINGS) == installed_counts()
    with pytest.raises(BidirError, match="one evaluation split, 'dev', not 'train'"):
        load_retrieval(INSTALLED_DOCSTRINGS, split="train")


def test_nothing_installed(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BidirError, match="installed-docstrings: too few docstrings"):
        installed_train((tmp_path / "empty",))
