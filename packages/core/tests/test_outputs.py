"""Output checks made before the work: a path is refused when it is a folder, lies under a file or already exists
(unless the caller says to replace it), and nothing is left behind by the check itself."""

from __future__ import annotations

import pytest

from bidir_core.errors import BidirError
from bidir_core.outputs import check_new_output, check_writable


def test_writable_path_leaves_nothing_behind(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "out.jsonl")
    assert list(tmp_path.iterdir()) == []  # neither the folders nor the probe file


def test_folder_and_file_in_the_way_are_refused(tmp_path):
    with pytest.raises(BidirError, match="is a folder"):
        check_writable(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BidirError, match=r"afile/out\.jsonl: cannot be written \(.*afile is not a folder\)"):
        check_writable(tmp_path / "afile" / "out.jsonl")


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("not ours\n")
    with pytest.raises(BidirError, match=r"out\.jsonl: already exists \(pass --overwrite"):
        check_new_output(out, overwrite=False)
    assert out.read_text() == "not ours\n"
    check_new_output(out, overwrite=True)  # the caller replaces it later, not the check
    assert out.read_text() == "not ours\n"
    check_new_output(tmp_path / "fresh.jsonl", overwrite=False)
    with pytest.raises(BidirError, match="is a folder"):
        check_new_output(tmp_path, overwrite=True)
