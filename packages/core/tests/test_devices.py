"""bidir_core.devices: the default device, and what precision=auto becomes on each kind of device."""

from __future__ import annotations

import pytest
import torch

from bidir_core.devices import default_device, native_bf16, resolve_precision
from bidir_core.errors import BidirError


def test_default_device_follows_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16")],
)
def test_auto_on_cpu_is_bf16_only_with_bf16_instructions(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert native_bf16("cpu") is (expected == "bf16")
    assert resolve_precision("auto", torch.device("cpu")) == expected
    for given in ("bf16", "fp32"):  # a precision that is set stays as set
        assert resolve_precision(given, "cpu") == given


def test_auto_on_a_torch_without_the_cpu_checks_is_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert resolve_precision("auto", "cpu") == "fp32"


def test_auto_on_cuda_asks_for_hardware_bf16(monkeypatch):
    asked = []

    def supported(including_emulation=True):
        asked.append(including_emulation)
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert resolve_precision("auto", "cuda") == "bf16" and asked == [False]
    assert resolve_precision("auto", "meta") == "fp32"  # a device kind not measured: fp32


def test_unknown_precision_is_one_line():
    with pytest.raises(BidirError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        resolve_precision("fp16", "cpu")
