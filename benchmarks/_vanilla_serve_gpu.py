"""The GPU peer for benchmarks/h100_bench.py: Ray Serve as its docs teach it.

A FastAPI ingress plus an ``@serve.batch`` method, sentence-transformers on the GPU in fp16, one
replica, Ray's own HTTP proxy. Batch settings match the CPU peer (32, 2 ms), and
``max_ongoing_requests=256`` so batches can fill (Serve's default of 5 would cap them at 5).
``/stats`` reports batches and inputs so the benchmark can compute the mean batch size.

Run as a script: ``python benchmarks/_vanilla_serve_gpu.py MODEL_DIR PORT`` (prints READY).
"""

import asyncio
import signal
import sys
from typing import Any

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel
from ray import serve

# No `from __future__ import annotations` here: FastAPI must see real classes in the signatures.
app = FastAPI()


class Body(BaseModel):
    input: str | list[str]
    model: str


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_gpus": 1})
@serve.ingress(app)
class VanillaGpuEmbedder:
    def __init__(self, model_dir: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_dir, device="cuda")
        self.model.half()
        self.batches = 0
        self.items = 0

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def embed(self, texts: list[str]) -> list[np.ndarray]:
        self.batches += 1
        self.items += len(texts)
        out = self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, normalize_embeddings=True)
        return list(out.astype(np.float32))

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats(self) -> dict[str, int]:
        return {"batches": self.batches, "items": self.items}

    @app.post("/v1/embeddings")
    async def embeddings(self, body: Body) -> dict[str, Any]:
        texts = [body.input] if isinstance(body.input, str) else body.input
        vecs = await asyncio.gather(*(self.embed(t) for t in texts))
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)],
                "usage": {"prompt_tokens": 0, "total_tokens": 0}}


if __name__ == "__main__":
    from pathlib import Path

    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._ray_home import own_ray_home

    model_dir, port = sys.argv[1], int(sys.argv[2])
    own_ray_home()
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(VanillaGpuEmbedder.bind(model_dir), route_prefix="/", blocking=False)
    print("READY", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    serve.shutdown()
    ray.shutdown()
