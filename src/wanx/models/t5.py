"""umT5-XXL text encoder as Wan2.1 uses it, with the official key names
(`models_t5_umt5-xxl-enc-bf16.pth` loads unconverted).

T5 conventions kept exactly: RMS norms without mean subtraction, attention without the
1/sqrt(d) scale, a learned relative-position bias in every layer (umT5 does not share it),
softmax in float32, a gated tanh-GELU feed-forward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..attention import attention
from ..configs import T5Config, t5_config


class T5LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class T5RelativeEmbedding(nn.Module):
    """Bidirectional bucketed relative-position bias `[1, heads, Lq, Lk]`."""

    def __init__(self, num_buckets: int, num_heads: int, max_dist: int):
        super().__init__()
        self.num_buckets, self.max_dist = num_buckets, max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, lq: int, lk: int) -> Tensor:
        device = self.embedding.weight.device
        rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]  # key - query
        bias = self.embedding(self._bucket(rel))  # [Lq, Lk, H]
        return bias.permute(2, 0, 1).unsqueeze(0)

    def _bucket(self, rel: Tensor) -> Tensor:
        half = self.num_buckets // 2  # one half per direction
        buckets = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2  # small distances get their own bucket, larger ones log-spaced up to max_dist
        log_spaced = exact + (
            torch.log(rel.float().clamp(min=1) / exact) / math.log(self.max_dist / exact) * (half - exact)
        ).long()
        log_spaced = log_spaced.clamp(max=half - 1)
        return buckets + torch.where(rel < exact, rel, log_spaced)


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v = (nn.Linear(dim, dim_attn, bias=False) for _ in range(3))
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x `[B, L, dim]`, bias `[B, H, L, L]` (position bias + padding mask) -> `[B, L, dim]`."""
        n = self.num_heads
        q, k, v = (proj(x).unflatten(-1, (n, -1)) for proj in (self.q, self.k, self.v))
        return self.o(attention(q, k, v, bias=bias, scale=1.0).flatten(2))


class T5FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads, cfg.max_dist)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """x `[B, L, dim]`; keep `[B, 1, 1, L]` True for real tokens."""
        pos = self.pos_embedding(x.shape[1], x.shape[1]).to(x.dtype)  # [1, H, L, L]
        # Padded keys get the dtype's minimum in place of the position bias (official masking).
        bias = torch.where(keep, pos, torch.finfo(x.dtype).min)
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


def _fp16_clamp(x: Tensor) -> Tensor:
    # As the official encoder: fp16 activations can overflow in the XXL model.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-limit, limit)
    return x


class UMT5Encoder(nn.Module):
    """umT5 encoder: `forward(input_ids [B, L], attention_mask [B, L]) -> [B, L, dim]`."""

    # The repeated blocks, for runtime transforms that act block by block (memory.streaming).
    stream_blocks = ("blocks",)

    def __init__(self, config: T5Config | str = "umt5-xxl"):
        super().__init__()
        cfg = self.config = t5_config(config) if isinstance(config, str) else config
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = self.token_embedding(input_ids)  # [B, L, dim]
        b, length = input_ids.shape
        if attention_mask is None:
            keep = torch.ones(b, 1, 1, length, dtype=torch.bool, device=x.device)
        else:
            keep = attention_mask.view(b, 1, 1, length).to(x.device) != 0
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x)
