"""``edge.gpu_stream_priority``: how a feed's streams are made, with CuPy and the driver bindings stood in.

No machine here has CUDA; the stand-ins record the calls, which are the whole contract: the driver makes the
stream at the context's greatest priority and CuPy wraps it, the stream is destroyed with the device, and a
driver or binding that refuses leaves a default-priority stream and a warning (the plane still serves).
"""

from __future__ import annotations

import logging
import sys
import types
from enum import Enum
from typing import Any

import pytest

from edge_node.transports.gpu.device import open_stream

pytestmark = pytest.mark.unit


class _Result(Enum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_CONTEXT = 201


class _FakeCupy:
    def __init__(self) -> None:
        self.made: list[tuple[str, Any]] = []
        cuda = types.SimpleNamespace(Stream=self._stream, ExternalStream=self._external)
        self.module = types.SimpleNamespace(cuda=cuda)

    def _stream(self, non_blocking: bool = False) -> tuple[str, bool]:
        self.made.append(("Stream", non_blocking))
        return ("Stream", non_blocking)

    def _external(self, ptr: int) -> tuple[str, int]:
        self.made.append(("ExternalStream", ptr))
        return ("ExternalStream", ptr)


def _driver(calls: list[tuple[Any, ...]], *, range_err: _Result = _Result.CUDA_SUCCESS) -> types.ModuleType:
    cu = types.ModuleType("cuda.bindings.driver")
    cu.CUresult = _Result  # type: ignore[attr-defined]
    cu.CUstream_flags = types.SimpleNamespace(CU_STREAM_NON_BLOCKING=1)  # type: ignore[attr-defined]

    def get_range() -> tuple[_Result, int, int]:
        calls.append(("range",))
        return range_err, 0, -5

    def create(flags: int, priority: int) -> tuple[_Result, int]:
        calls.append(("create", flags, priority))
        return _Result.CUDA_SUCCESS, 0xBEEF

    def destroy(handle: int) -> tuple[_Result]:
        calls.append(("destroy", handle))
        return (_Result.CUDA_SUCCESS,)

    cu.cuCtxGetStreamPriorityRange = get_range  # type: ignore[attr-defined]
    cu.cuStreamCreateWithPriority = create  # type: ignore[attr-defined]
    cu.cuStreamDestroy = destroy  # type: ignore[attr-defined]
    return cu


def _install(monkeypatch: pytest.MonkeyPatch, driver: types.ModuleType | None) -> _FakeCupy:
    cupy = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy.module)
    if driver is None:
        monkeypatch.setitem(sys.modules, "cuda", None)  # "import cuda.bindings" fails as without the package
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    else:
        bindings = types.ModuleType("cuda.bindings")
        bindings.driver = driver  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.driver", driver)
    return cupy


def test_high_is_made_by_the_driver_at_the_greatest_priority_and_freed_with_the_device(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    cupy = _install(monkeypatch, _driver(calls))
    stream, free = open_stream("high")
    assert stream == ("ExternalStream", 0xBEEF)
    assert calls == [("range",), ("create", 1, -5)]  # non-blocking, the greatest (most negative) priority
    free()
    assert calls[-1] == ("destroy", 0xBEEF)
    assert cupy.made == [("ExternalStream", 0xBEEF)]


def test_default_is_cupys_own_non_blocking_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    cupy = _install(monkeypatch, _driver(calls))
    stream, free = open_stream("default")
    free()
    assert stream == ("Stream", True) and calls == [] and cupy.made == [("Stream", True)]


@pytest.mark.parametrize("broken", ["no bindings", "driver refuses"])
def test_a_refusal_leaves_a_default_stream_and_says_why(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture, broken: str) -> None:
    calls: list[tuple[Any, ...]] = []
    driver = None if broken == "no bindings" else _driver(calls, range_err=_Result.CUDA_ERROR_INVALID_CONTEXT)
    cupy = _install(monkeypatch, driver)
    with caplog.at_level(logging.WARNING, logger="edge_node.transports.gpu.device"):
        stream, free = open_stream("high")
    free()
    assert stream == ("Stream", True) and cupy.made == [("Stream", True)]
    assert ("create", 1, -5) not in calls
    assert "edge.gpu_stream_priority=high not applied" in caplog.text
