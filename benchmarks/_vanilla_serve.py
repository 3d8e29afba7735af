"""The peer for comparisons: the way Ray Serve's docs batch a model (FastAPI ingress + @serve.batch).

It uses the same tokenizer and ONNX engine as the edge node, so the difference measured is the
serving path, not the model.
"""

from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel
from ray import serve

# No `from __future__ import annotations` here: FastAPI must see real classes in the signatures.
app = FastAPI()


class Body(BaseModel):
    input: str
    model: str


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class VanillaEmbedder:
    def __init__(self, data_dir: str) -> None:
        from edge_node.engines.onnx_cpu import OnnxCpuEngine
        from edge_node.tokenization import TextTokenizer
        from gazsi_cluster.model import load_model_spec

        spec = load_model_spec("all-MiniLM-L6-v2")
        self.engine = OnnxCpuEngine(spec, Path(data_dir), max_seq_len=256, max_batch_size=512)
        self.engine.load()
        self.tokenizer = TextTokenizer(spec.path, 256)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def embed(self, texts: list[str]) -> list[np.ndarray]:
        seqs = self.tokenizer.encode(texts)
        return list(self.engine.embed_sequences(seqs))

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    async def embeddings(self, body: Body) -> dict[str, Any]:
        vec = await self.embed(body.input)
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": 0, "embedding": vec.tolist()}],
                "usage": {"prompt_tokens": 0, "total_tokens": 0}}


def build(data_dir: str) -> Any:
    return VanillaEmbedder.bind(data_dir)
