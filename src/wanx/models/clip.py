"""CLIP ViT-H/14 image encoder as Wan2.1 I2V/FLF2V uses it, with the official key names
(the `visual.*` part of `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`).

Output: the penultimate block's tokens, before the post-norm, CLS included: `[B, 257, 1280]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import attention
from ..configs import CLIPVisionConfig, clip_config

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, dim * 3)  # rows: q (all heads), k, v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)  # [B, L, H, D] each
        return self.proj(attention(q, k, v).flatten(2))


class AttentionBlock(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.dim * cfg.mlp_ratio), nn.GELU(),
                                 nn.Linear(cfg.dim * cfg.mlp_ratio, cfg.dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        # The last block's output is never used (Wan reads the penultimate one), so it is
        # not built: its weights are skipped at load.
        self.transformer = nn.Sequential(*(AttentionBlock(cfg) for _ in range(cfg.num_layers - 1)))

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [B, 256, dim]
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.transformer(self.pre_norm(x + self.pos_embedding.to(x.dtype)))


class CLIPVisionEncoder(nn.Module):
    """`forward(images [B, 3, H, W] in [-1, 1], any H and W) -> [B, 257, dim]` (penultimate block)."""

    # The repeated blocks, for runtime transforms that act block by block (memory.streaming).
    stream_blocks = ("visual.transformer",)

    def __init__(self, config: CLIPVisionConfig | str = "vit-h-14"):
        super().__init__()
        cfg = self.config = clip_config(config) if isinstance(config, str) else config
        self.visual = VisionTransformer(cfg)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        size = self.config.image_size
        # Official preprocessing: plain bicubic resize to 224x224 (no crop), [-1,1] -> [0,1], CLIP normalisation.
        x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        x = (x.mul(0.5).add(0.5) - mean) / std
        return self.visual(x.to(self.visual.patch_embedding.weight.dtype))
