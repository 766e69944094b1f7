"""Execution provider selection: CUDA when present, the CPU as fallback, the provider in use reported."""
import httpx
import onnxruntime as ort
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


def test_asking_for_cuda_gives_cuda_or_a_start_up_error_never_a_silent_cpu(digits_run):
    # Under onnxruntime (CPU) this is the error; under onnxruntime-gpu, CUDA, or the error when it cannot start.
    try:
        model = OnnxModel(digits_run[0] / "model.onnx", device="cuda")
    except StartupError as e:
        assert "CUDAExecutionProvider" in str(e)
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            assert "install astguard[gpu]" in str(e)
    else:
        assert model.provider == "CUDAExecutionProvider"


def test_asking_for_the_cpu_always_gets_the_cpu(digits_run):
    assert OnnxModel(digits_run[0] / "model.onnx", device="cpu").provider == "CPUExecutionProvider"


def test_this_install_has_exactly_one_runtime():
    assert len(installed_runtimes()) == 1


def test_both_runtimes_installed_warn_at_start_up(digits_run, monkeypatch):
    # Installing both for real would break this environment; the check reads package metadata, stubbed here.
    monkeypatch.setattr(runtime, "installed_runtimes", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.warns(RuntimeWarning, match="both onnxruntime and onnxruntime-gpu"):
        OnnxModel(digits_run[0] / "model.onnx", device="cpu")


def test_the_service_reports_the_provider_in_use(digits_run):
    # auto: CUDA where onnxruntime-gpu can use a GPU, else the CPU; the same choice in and out of the service.
    expected = OnnxModel(digits_run[0] / "model.onnx", device="auto").provider
    assert expected in ("CUDAExecutionProvider", "CPUExecutionProvider")
    with serve(digits_run[0] / "model.onnx") as s:
        assert httpx.get(s.url + "/v1/model").json()["provider"] == expected
    with serve(digits_run[0] / "model.onnx", "--device", "cpu") as s:
        assert httpx.get(s.url + "/v1/model").json()["provider"] == "CPUExecutionProvider"
