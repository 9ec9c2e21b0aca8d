"""select_backend: the env override, the CPU choice, and the CUDA fallback chain with its reasons."""
from __future__ import annotations

import logging
import sys

import pytest
import torch

from tandem.kernels import cpu_attention, select
from tandem.kernels.interface import BackendKind
from tandem.kernels.select import ENV_VAR, parse_backend_kind, select_backend
from tandem.kernels.torch_reference import TorchReferenceBackend

CPU = torch.device("cpu")


def test_cpu_is_the_c_decode_kernel_where_it_builds_else_the_torch_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    expected = BackendKind.TORCH_REFERENCE if cpu_attention.library() is None else BackendKind.CPU
    assert select_backend(CPU).kind is expected


def test_override_cpu_needs_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "cpu")
    with pytest.raises(ValueError, match="needs the CPU device"):
        select_backend(torch.device("cuda"))
    if cpu_attention.library() is not None:
        assert select_backend(CPU).kind is BackendKind.CPU


@pytest.mark.parametrize("value", ["torch", " Torch "])
def test_override_torch(monkeypatch: pytest.MonkeyPatch, value: str, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(ENV_VAR, value)
    with caplog.at_level(logging.INFO, logger="tandem.kernels.select"):
        assert select_backend(CPU).kind is BackendKind.TORCH_REFERENCE
    assert ENV_VAR in caplog.text


def test_override_bad_value_names_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match="torch|triton|flashinfer"):
        select_backend(CPU)
    with pytest.raises(ValueError, match="cudnn"):
        parse_backend_kind("cudnn")


def test_override_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv(ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(CPU).kind is BackendKind.TRITON
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        select_backend(CPU)


def test_override_flashinfer_needs_cuda_and_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "flashinfer")
    with pytest.raises(ValueError, match="CUDA"):
        select_backend(CPU)
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # as if not installed
    with pytest.raises(RuntimeError, match="does not import"):
        select_backend(torch.device("cuda"))


def test_cuda_chain_logs_why_each_backend_was_passed_over(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setitem(sys.modules, "flashinfer", None)

    def failing_smoke(backend, device) -> None:
        raise RuntimeError(f"no {backend.kind.value} kernel for this GPU")

    monkeypatch.setattr(select, "smoke_test", failing_smoke)
    with caplog.at_level(logging.INFO, logger="tandem.kernels.select"):
        backend = select_backend(torch.device("cuda"))
    assert isinstance(backend, TorchReferenceBackend)
    assert "flashinfer: ImportError" in caplog.text or "flashinfer: ModuleNotFoundError" in caplog.text
    if "triton" in sys.modules:
        assert "no triton kernel for this GPU" in caplog.text


def test_cuda_prefers_triton_when_flashinfer_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    monkeypatch.setattr(select, "smoke_test", lambda backend, device: None)
    assert select_backend(torch.device("cuda")).kind is BackendKind.TRITON
