"""A small BERT encoder in plain torch ops, with mean pooling and L2 normalisation on the GPU.

Why not ``transformers.BertModel``: its forward builds masks and picks attention paths with
Python logic per call; this one is a fixed sequence of kernels for a given (batch, length),
which is exactly what a CUDA graph records. Only imported by the GPU engine and the benchmark,
so importing torch at the top here is fine.

Input is one packed int64 tensor ``(2, B, L)``: ``[0]`` token ids, ``[1]`` attention mask, so
the host sends one copy per batch instead of two.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["BertConfig", "MiniBert"]


@dataclass(frozen=True, slots=True)
class BertConfig:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    eps: float

    @classmethod
    def from_dir(cls, model_dir: Path) -> BertConfig:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {cfg.get('hidden_act')!r} (only erf gelu)")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(
            hidden=int(cfg["hidden_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=int(cfg["num_attention_heads"]),
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            max_positions=int(cfg.get("max_position_embeddings", 512)),
            eps=float(cfg.get("layer_norm_eps", 1e-12)),
        )


@dataclass(slots=True)
class _Layer:
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    up_w: torch.Tensor
    up_b: torch.Tensor
    down_w: torch.Tensor
    down_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor


class MiniBert:
    """BERT encoder + mean pooling + normalise; call with packed ``(2, B, L)`` int64 on the device."""

    def __init__(self, config: BertConfig, weights: dict[str, torch.Tensor], *, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype

        def w(name: str) -> torch.Tensor:
            # sentence-transformers checkpoints store bare names; HF BertModel ones add "bert.".
            tensor = weights.get(name, weights.get(f"bert.{name}"))
            if tensor is None:
                raise KeyError(f"weight {name!r} missing from the checkpoint")
            return tensor.to(device=device, dtype=dtype).contiguous()

        self.word = w("embeddings.word_embeddings.weight")
        self.pos = w("embeddings.position_embeddings.weight")
        # Inputs are single-segment, so token type 0's row is a constant bias.
        self.type0 = w("embeddings.token_type_embeddings.weight")[0].clone()
        self.ln_w = w("embeddings.LayerNorm.weight")
        self.ln_b = w("embeddings.LayerNorm.bias")
        self.layers: list[_Layer] = []
        for i in range(config.layers):
            p = f"encoder.layer.{i}."
            att = p + "attention."
            self.layers.append(
                _Layer(
                    # One fused QKV matmul instead of three: fewer launches, same maths.
                    qkv_w=torch.cat([w(att + f"self.{n}.weight") for n in ("query", "key", "value")]),
                    qkv_b=torch.cat([w(att + f"self.{n}.bias") for n in ("query", "key", "value")]),
                    out_w=w(att + "output.dense.weight"),
                    out_b=w(att + "output.dense.bias"),
                    ln1_w=w(att + "output.LayerNorm.weight"),
                    ln1_b=w(att + "output.LayerNorm.bias"),
                    up_w=w(p + "intermediate.dense.weight"),
                    up_b=w(p + "intermediate.dense.bias"),
                    down_w=w(p + "output.dense.weight"),
                    down_b=w(p + "output.dense.bias"),
                    ln2_w=w(p + "output.LayerNorm.weight"),
                    ln2_b=w(p + "output.LayerNorm.bias"),
                )
            )

    @classmethod
    def from_dir(cls, model_dir: Path, *, device: torch.device, dtype: torch.dtype) -> MiniBert:
        from safetensors.torch import load_file

        config = BertConfig.from_dir(model_dir)
        # Load straight to the GPU: the fp32 checkpoint never sits twice in host memory.
        weights = load_file(str(Path(model_dir) / "model.safetensors"), device=str(device))
        return cls(config, weights, device=device, dtype=dtype)

    @classmethod
    def random(cls, config: BertConfig, *, device: torch.device, dtype: torch.dtype, seed: int = 0) -> MiniBert:
        """Same shapes, random values: for speed runs where the real weights are not at hand."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        h, f = config.hidden, config.intermediate

        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen) * 0.02

        weights = {
            "embeddings.word_embeddings.weight": rnd(config.vocab, h),
            "embeddings.position_embeddings.weight": rnd(config.max_positions, h),
            "embeddings.token_type_embeddings.weight": rnd(2, h),
            "embeddings.LayerNorm.weight": torch.ones(h),
            "embeddings.LayerNorm.bias": torch.zeros(h),
        }
        for i in range(config.layers):
            p = f"encoder.layer.{i}."
            for n in ("query", "key", "value"):
                weights[p + f"attention.self.{n}.weight"] = rnd(h, h)
                weights[p + f"attention.self.{n}.bias"] = torch.zeros(h)
            weights[p + "attention.output.dense.weight"] = rnd(h, h)
            weights[p + "attention.output.dense.bias"] = torch.zeros(h)
            weights[p + "intermediate.dense.weight"] = rnd(f, h)
            weights[p + "intermediate.dense.bias"] = torch.zeros(f)
            weights[p + "output.dense.weight"] = rnd(h, f)
            weights[p + "output.dense.bias"] = torch.zeros(h)
            for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
                weights[p + ln + ".weight"] = torch.ones(h)
                weights[p + ln + ".bias"] = torch.zeros(h)
        return cls(config, weights, device=device, dtype=dtype)

    @torch.inference_mode()
    def __call__(self, packed: torch.Tensor) -> torch.Tensor:
        ids, mask = packed[0], packed[1]
        batch, length = ids.shape
        cfg = self.config
        heads, head_dim = cfg.heads, cfg.hidden // cfg.heads
        x = F.embedding(ids, self.word) + self.pos[:length] + self.type0
        x = F.layer_norm(x, (cfg.hidden,), self.ln_w, self.ln_b, cfg.eps)
        # Keys that are padding take no part (HF adds finfo.min to them; a boolean mask is the same).
        keep = (mask != 0)[:, None, None, :]
        scale = 1.0 / math.sqrt(head_dim)
        for layer in self.layers:
            qkv = F.linear(x, layer.qkv_w, layer.qkv_b).view(batch, length, 3, heads, head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
            att = att.transpose(1, 2).reshape(batch, length, cfg.hidden)
            x = F.layer_norm(x + F.linear(att, layer.out_w, layer.out_b), (cfg.hidden,), layer.ln1_w,
                             layer.ln1_b, cfg.eps)
            up = F.gelu(F.linear(x, layer.up_w, layer.up_b))
            x = F.layer_norm(x + F.linear(up, layer.down_w, layer.down_b), (cfg.hidden,), layer.ln2_w,
                             layer.ln2_b, cfg.eps)
        # Pool in fp32: summing up to 512 fp16 rows would lose digits the cosine check can see.
        weights = mask.to(torch.float32).unsqueeze(-1)
        summed = (x.float() * weights).sum(dim=1)
        pooled = summed / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)
