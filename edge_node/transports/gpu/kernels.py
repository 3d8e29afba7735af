"""CuPy front of ``http_kernels.cu``: parse request heads and build responses on the GPU.

CuPy is imported lazily (only GPU nodes have it). Receive buffers are pinned host memory with
a fixed stride per request (``REQ_STRIDE``); ``parse`` copies them to the device and runs one
warp per request, ``build`` runs one thread per response.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from edge_node.pages import CONTACTS_HTML, INDEX_HTML
from gazsi_cluster.http.wire import HttpReply, render_head

from . import _layout as L

__all__ = ["CANNED", "GpuHttpEngine", "canned_table"]

def _canned_errors() -> dict[int, bytes]:
    """The kernel's error answers, as the CPU transports answer the same mistakes (one error mapping)."""
    from gazsi_cluster import errors
    from gazsi_cluster.http.errors import error_body, error_reply

    by_status: dict[int, errors.GazsiError] = {
        400: errors.InvalidRequest("Invalid HTTP request"),
        404: errors.NotFound("Not Found"),
        405: errors.MethodNotAllowed("Method Not Allowed"),
        413: errors.PayloadTooLarge(f"request body exceeds {L.MAX_BODY} bytes"),
        431: errors.HeadersTooLarge("request headers exceed the limit"),
        500: errors.EngineError("inference failed for this batch"),
    }
    out = {status: error_reply(exc).body for status, exc in by_status.items()}
    # 414 has no CPU twin (the CPU listeners bound the whole head, 431): same shape, its own code.
    out[414] = error_body("Request target too long.", "invalid_request_error", None, "uri_too_long")
    return dict(sorted(out.items()))


_ERRORS = _canned_errors()
# Canned entry ids: 0 JSON 200 prefix (inference), 1 index page, 2 contacts page, then errors.
CANNED: dict[str, int] = {"inference": 0, "index": 1, "contacts": 2}
for _i, _st in enumerate(_ERRORS):
    CANNED[str(_st)] = 3 + _i


def _prefix(status: int, ctype: str) -> bytes:
    """Status line and content-type, as :func:`gazsi_cluster.http.wire.render_head` starts every response."""
    head = render_head(HttpReply(status, content_type=ctype), keep_alive=True)
    return head[: head.index(b"content-length:")]


def canned_table() -> tuple[bytes, np.ndarray]:
    """The blob of prefixes and bodies and its index (prefix_off, prefix_len, body_off, body_len)."""
    entries = [(_prefix(200, "application/json"), b""), (_prefix(200, "text/html; charset=utf-8"), INDEX_HTML),
               (_prefix(200, "text/html; charset=utf-8"), CONTACTS_HTML)]
    for status, body in _ERRORS.items():
        entries.append((_prefix(status, "application/json"), body))
    blob, idx = bytearray(), []
    for pre, body in entries:
        idx += [len(blob), len(pre)]
        blob += pre
        idx += [len(blob), len(body)]
        blob += body
    return bytes(blob), np.asarray(idx, dtype=np.int32)


@lru_cache(maxsize=1)
def _module() -> Any:
    import cupy as cp

    src = resources.files(__package__).joinpath("http_kernels.cu").read_text()
    return cp.RawModule(code=src, options=("--std=c++17",))


class GpuHttpEngine:
    """Device buffers for up to ``capacity`` requests per burst, and the two kernels."""

    def __init__(self, capacity: int = 1024, *, mapped: bool = False) -> None:
        import cupy as cp

        self.capacity = capacity
        mod = _module()
        self.parse_kernel = mod.get_function("gz_parse")
        self.build_kernel = mod.get_function("gz_build")
        self.mapped: list[Any] = []
        if mapped:
            # Zero-copy (edge.gpu_zero_copy): the parse kernel reads the heads from mapped pinned host memory,
            # as a GPUNetIO receive queue's packets would sit in GPU-visible memory; no upload on the stream.
            from .control import MappedBuffer

            self.mapped = [MappedBuffer(capacity * L.REQ_STRIDE), MappedBuffer(capacity * 4, np.int32)]
            self.reqs_np, self.lens_np = (m.array for m in self.mapped)
            self.d_reqs = self.mapped[0].device_array(cp.uint8, (capacity * L.REQ_STRIDE,))
            self.d_lens = self.mapped[1].device_array(cp.int32, (capacity,))
        else:
            self.h_reqs = cp.cuda.alloc_pinned_memory(capacity * L.REQ_STRIDE)
            self.reqs_np = np.frombuffer(self.h_reqs, dtype=np.uint8, count=capacity * L.REQ_STRIDE)
            # Pinned too: an upload on a stream is then a real async copy (both are rewritten only by the next
            # burst's load, after this one's event).
            self.h_lens = cp.cuda.alloc_pinned_memory(capacity * 4)
            self.lens_np = np.frombuffer(self.h_lens, dtype=np.int32, count=capacity)
            self.d_reqs = cp.empty(capacity * L.REQ_STRIDE, dtype=cp.uint8)
            self.d_lens = cp.empty(capacity, dtype=cp.int32)
        self.d_results = cp.empty((capacity, L.NFIELDS), dtype=cp.int32)
        self.d_dbuf = cp.zeros(capacity * L.D_MAX, dtype=cp.uint8)
        blob, idx = canned_table()
        self.d_canned = cp.asarray(np.frombuffer(blob, dtype=np.uint8))
        self.d_canned_idx = cp.asarray(idx)
        self.d_jobs = cp.zeros((capacity, L.J_NFIELDS), dtype=cp.int32)
        self.d_samples = cp.zeros((capacity, 3), dtype=cp.float32)
        self.d_out = cp.empty(capacity * L.OUT_STRIDE, dtype=cp.uint8)
        self.d_out_len = cp.zeros(capacity, dtype=cp.int32)

    def load(self, requests: Sequence[bytes]) -> int:
        """Land request heads in the pinned receive buffer (what a packet source does)."""
        n = len(requests)
        if n > self.capacity:
            raise ValueError(f"burst of {n} exceeds capacity {self.capacity}")
        for i, raw in enumerate(requests):
            raw = raw[:L.REQ_STRIDE]
            self.reqs_np[i * L.REQ_STRIDE:i * L.REQ_STRIDE + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
            self.lens_np[i] = len(raw)
        return n

    def upload(self, n: int, stream: Any = None) -> None:
        if self.mapped:
            return  # the kernel reads the heads where they landed
        self.d_reqs[: n * L.REQ_STRIDE].set(self.reqs_np[: n * L.REQ_STRIDE], stream=stream)
        self.d_lens[:n].set(self.lens_np[:n], stream=stream)

    def free(self) -> None:
        """The mapped receive buffers (after the device is idle); the rest is CuPy's."""
        for buf in self.mapped:
            buf.free()

    def launch_parse(self, n: int, stream: Any = None) -> None:
        self.parse_kernel((n,), (32,), (self.d_reqs, self.d_lens, np.int32(n), self.d_results, self.d_dbuf),
                          stream=stream)

    def parse(self, requests: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Parse a burst; returns (results int32 (n, NFIELDS), decoded-d bytes (n, D_MAX))."""
        n = self.load(requests)
        self.upload(n)
        self.launch_parse(n)
        return self.d_results[:n].get(), self.d_dbuf[: n * L.D_MAX].get().reshape(n, L.D_MAX)

    def launch_build(self, n: int, stream: Any = None) -> None:
        self.build_kernel(((n + 63) // 64,), (64,), (
            self.d_jobs, self.d_samples, self.d_dbuf, self.d_canned, self.d_canned_idx, np.int32(n), self.d_out,
            np.int32(L.OUT_STRIDE), self.d_out_len), stream=stream)

    def build(self, jobs: np.ndarray, samples: np.ndarray) -> list[bytes]:
        """Build responses for ``jobs`` (int32 (n, J_NFIELDS)); d bytes come from the last parse."""
        n = int(jobs.shape[0])
        self.d_jobs[:n].set(np.ascontiguousarray(jobs, dtype=np.int32))
        self.d_samples[:n].set(np.ascontiguousarray(samples, dtype=np.float32))
        self.launch_build(n)
        lens = self.d_out_len[:n].get()
        out = self.d_out[: n * L.OUT_STRIDE].get()
        return [out[i * L.OUT_STRIDE:i * L.OUT_STRIDE + int(lens[i])].tobytes() for i in range(n)]


def jobs_for(results: np.ndarray, tokens: Sequence[int], infer_us: Sequence[int], batch: Sequence[int]) -> np.ndarray:
    """Response jobs for parsed requests: inference JSON for 200 /inference, canned otherwise."""
    n = results.shape[0]
    jobs = np.zeros((n, L.J_NFIELDS), dtype=np.int32)
    for i in range(n):
        st, route = int(results[i, L.R_STATUS]), int(results[i, L.R_ROUTE])
        jobs[i, L.J_KEEPALIVE] = results[i, L.R_KEEPALIVE] if st == 200 else 0
        jobs[i, L.J_HEADONLY] = int(st == 200 and results[i, L.R_METHOD] == 2)
        if st != 200:
            jobs[i, L.J_CANNED] = CANNED.get(str(st), CANNED["400"])
        elif route == L.ROUTE_INFERENCE:
            jobs[i, L.J_KIND] = 1
            jobs[i, L.J_DLEN] = results[i, L.R_D_LEN]
            jobs[i, L.J_TOKENS], jobs[i, L.J_INFER_US], jobs[i, L.J_BATCH] = tokens[i], infer_us[i], batch[i]
        else:
            jobs[i, L.J_CANNED] = CANNED["index"] if route == L.ROUTE_INDEX else CANNED["contacts"]
    return jobs
