"""What the GPU's parse can take off the CPU when the heads still arrive through host sockets.

The fast front parses a request head with httptools (C); the gpu plane hands the same head to ``gz_parse``.
Everything else a request costs the CPU (the socket reads and writes, framing, the pipeline, the reply) is
paid by both planes. This times httptools on GAZSI's ``/inference`` head, its Python callbacks included:

    python benchmarks/head_parse_cost.py
"""

from __future__ import annotations

import time

import httptools

HEAD = (b"GET /inference?d=the%20quick%20brown%20fox%20jumps%20over%20the%20lazy%20dog HTTP/1.1\r\n"
        b"Host: 127.0.0.1:8300\r\nAuthorization: Bearer sk-test-key\r\n\r\n")


class _Sink:
    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        pass

    def on_message_complete(self) -> None:
        pass


def main(n: int = 200_000, rounds: int = 5) -> None:
    parser = httptools.HttpRequestParser(_Sink())
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            parser.feed_data(HEAD)
        best = min(best, (time.perf_counter() - t) / n)
    print(f"httptools, one {len(HEAD)}-byte /inference head with its callbacks: {best * 1e6:.2f} us "
          f"(best of {rounds} x {n:,})")


if __name__ == "__main__":
    main()
