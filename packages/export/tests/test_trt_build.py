"""export-trt: profile parsing and validation and the missing-TensorRT message run everywhere; the engine build and
its parity need TensorRT and a GPU (marked `tensorrt`, skipped here with the reason).

Engine tolerance: the export's own rule (bidir_export.verification: at most 4x PyTorch's own distance from float64
in the engine's precision), which build_engine applies; fp32 engines are built without TF32 for that reason. The
checks on shapes verification did not use hold per-row cosine >= 0.999 against the fp32 PyTorch model.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from export_testing import padded_inputs

from bidir_core import BidirError
from bidir_core.artifacts import EngineManifest, Profile, read_manifest
from bidir_core.testing import TINY_VOCAB_SIZE
from bidir_export import build_engine
from bidir_export.cli import onnx_main, trt_main
from bidir_export.profiles import check_profiles, parse_profile, parse_shape
from bidir_export.tensorrt_build import precision_plan, tensorrt_missing_message

PROFILE = Profile((1, 1), (4, 32), (8, 64))
HAS_TENSORRT = tensorrt_missing_message() is None


def test_parse_shapes_and_profiles():
    assert parse_shape("32x128") == (32, 128) and parse_shape(" 1 X 1 ") == (1, 1)
    assert parse_profile("1x1,32x128,64x512") == Profile((1, 1), (32, 128), (64, 512))
    for bad, message in [
        ("32*128", "is not BATCHxSEQ"),
        ("0x128", "at least 1"),
        ("1x1,32x128", "is not MIN,OPT,MAX"),
        ("1x1,64x128,32x512", r"batch needs min <= opt <= max, got 1, 64, 32"),
        ("1x256,4x128,8x512", r"sequence needs min <= opt <= max, got 256, 128, 512"),
    ]:
        with pytest.raises(BidirError, match=message):
            parse_profile(bad) if "," in bad else parse_shape(bad)


def test_profiles_must_fit_the_model():
    check_profiles((PROFILE,), max_length=64)
    with pytest.raises(
        BidirError, match="profile 1 .*max sequence 1024 is longer than the model's max_length 512"
    ):
        check_profiles((PROFILE, parse_profile("1x1,1x512,2x1024")), max_length=512)
    with pytest.raises(BidirError, match="at least one"):
        check_profiles((), max_length=512)


def test_precision_plans_for_tensorrt_10_and_11():
    assert precision_plan(10, "bf16", "bf16") == "strongly_typed"
    assert precision_plan(11, "fp16", "fp16") == "strongly_typed"
    assert precision_plan(10, "fp32", "bf16") == "builder_flag"
    with pytest.raises(BidirError, match="strongly typed.*--dtype bf16"):
        precision_plan(11, "fp32", "bf16")
    with pytest.raises(BidirError, match="the ONNX graph is bf16; it cannot build a fp16 engine"):
        precision_plan(10, "bf16", "fp16")
    with pytest.raises(BidirError, match="precision must be one of"):
        precision_plan(10, "fp32", "int8")


def test_profiles_are_checked_before_any_work(make_tiny_checkpoint, tmp_path, monkeypatch):
    # A profile longer than the checkpoint's max_length (512) fails before TensorRT or an export is touched.
    import bidir_export.tensorrt_build as trt_build

    monkeypatch.setattr(trt_build, "export_onnx", lambda *a, **k: pytest.fail("exported before validating"))
    monkeypatch.setattr(
        trt_build, "tensorrt_missing_message", lambda: pytest.fail("looked for TensorRT first")
    )
    with pytest.raises(BidirError, match="max_length 512"):
        build_engine(make_tiny_checkpoint("avg"), tmp_path / "e", profiles=[parse_profile("1x1,1x8,2x600")])
    assert not (tmp_path / "e").exists()


def test_cli_profile_errors_are_one_line(make_tiny_checkpoint, tmp_path, capsys):
    ckpt = str(make_tiny_checkpoint("avg"))
    cases = [
        (["--min", "1x1", "--max", "8x64"], "--min, --opt and --max go together"),
        (["--min", "1x1", "--opt", "9x8", "--max", "8x64"], "batch needs min <= opt <= max"),
        (["--profile", "1x1;2x2;3x3"], "is not MIN,OPT,MAX"),
        ([], "give a profile"),
    ]
    for extra, message in cases:
        assert trt_main([ckpt, str(tmp_path / "e"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and err.startswith("export-trt: error:")
    assert not (tmp_path / "e").exists()


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT and a GPU are here: the build runs instead")
def test_missing_tensorrt_is_one_clear_line(exported, tmp_path, capsys):
    out, _ = exported("avg")
    code = trt_main(
        [
            str(out),
            str(tmp_path / "e"),
            "--precision",
            "fp32",
            "--min",
            "1x1",
            "--opt",
            "4x32",
            "--max",
            "8x64",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    if importlib.util.find_spec("tensorrt") is None:
        assert "TensorRT is not installed" in err
        assert (
            "nvcr.io/nvidia/tensorrt" in err
            and "pip install tensorrt --extra-index-url https://pypi.nvidia.com" in err
        )
    else:
        assert "no CUDA GPU" in err
    assert not (tmp_path / "e").exists()


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_engine_from_checkpoint_matches_pytorch(make_tiny_checkpoint, tmp_path, precision):
    import tensorrt as trt

    from bidir_core import BiEncoder
    from bidir_export.tensorrt_build import EngineRunner

    ckpt = make_tiny_checkpoint("last")
    cache = tmp_path / "timing.cache"
    manifest = build_engine(
        ckpt,
        tmp_path / "engine",
        precision=precision,
        profiles=[PROFILE, Profile((1, 64), (2, 128), (2, 256))],
        workspace_gb=1,
        timing_cache=cache,
    )
    assert isinstance(manifest, EngineManifest) and read_manifest(tmp_path / "engine", "tensorrt") == manifest
    assert manifest.verification.passed and manifest.verification.min_cosine >= 0.999
    assert manifest.tensorrt_version == trt.__version__ and cache.is_file()
    assert (tmp_path / "engine" / "tokenizer.json").is_file()

    # Shapes inside each profile that verification did not use, left-padded, on the engine directly.
    runner = EngineRunner(trt, (tmp_path / "engine" / "model.engine").read_bytes())
    encoder = BiEncoder.from_pretrained(ckpt).eval()
    for index, (batch, seq) in enumerate([(5, 37), (2, 200)]):
        ids, mask = padded_inputs(TINY_VOCAB_SIZE, batch, seq, "left")
        got = runner({"input_ids": ids, "attention_mask": mask}, profile=index).cpu()
        with torch.no_grad():
            want = encoder(ids, mask)
        assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() >= 0.999


@pytest.mark.tensorrt
def test_engine_from_bf16_onnx_with_dims(exported, tmp_path):
    out, _ = exported("avg", True, "bf16")
    manifest = build_engine(out, tmp_path / "engine", precision="bf16", profiles=[PROFILE])
    assert manifest.onnx.with_dims and manifest.verification.passed


@pytest.mark.parametrize("main", [trt_main, onnx_main], ids=["export-trt", "export-onnx"])
def test_help_has_examples(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_overwrite_replaces_only_an_engine_folder(exported, tmp_path, capsys):
    # Regression: --overwrite deleted any folder holding a manifest.json, an ONNX export included.
    source, _ = exported("avg")
    onnx_copy = shutil.copytree(source, tmp_path / "onnx")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text('{"mine": 1}')
    (mine / "notes.txt").write_text("important")
    profile = ["--precision", "fp32", "--min", "1x1", "--opt", "4x32", "--max", "8x64", "--overwrite"]
    for folder in (onnx_copy, mine):
        before = sorted(p.name for p in folder.iterdir())
        assert trt_main([str(source), str(folder), *profile]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not a TensorRT engine folder" in err and "refusing" in err
        assert sorted(p.name for p in folder.iterdir()) == before
