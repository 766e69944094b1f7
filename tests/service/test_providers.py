"""Execution provider selection: CUDA when present, the CPU as fallback, the provider in use reported."""
import httpx
import pytest

import service.runtime as runtime
from conftest import serve
from service.runtime import OnnxModel, StartupError, choose_providers, installed_runtimes


def test_cuda_comes_first_when_offered_with_the_cpu_as_fallback():
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("auto", both) == both
    assert choose_providers("cuda", both) == both
    assert choose_providers("cpu", both) == ["CPUExecutionProvider"]
    assert choose_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers("cuda:1", both) == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]


def test_asking_for_cuda_without_it_is_a_start_up_error(digits_run):
    with pytest.raises(StartupError, match="no CUDAExecutionProvider.*astguard\\[gpu\\]"):
        OnnxModel(digits_run[0] / "model.onnx", device="cuda")


def test_this_install_has_exactly_one_runtime():
    assert len(installed_runtimes()) == 1


def test_both_runtimes_installed_warn_at_start_up(digits_run, monkeypatch):
    # Installing both for real would break this environment; the check reads package metadata, stubbed here.
    monkeypatch.setattr(runtime, "installed_runtimes", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.warns(RuntimeWarning, match="both onnxruntime and onnxruntime-gpu"):
        OnnxModel(digits_run[0] / "model.onnx", device="cpu")


def test_the_service_reports_the_provider_in_use(digits_run):
    with serve(digits_run[0] / "model.onnx") as s:
        assert httpx.get(s.url + "/v1/model").json()["provider"] == "CPUExecutionProvider"
