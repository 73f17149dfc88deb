"""wanx: run and fine-tune Wan2.1 video generation models.

Heavy modules (torch, the models) are imported on first use so that `wanx --help`
stays instant.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "wanx.loading",
    "inspect_checkpoint": "wanx.loading",
    "CheckpointError": "wanx.loading",
    "WanDiT": "wanx.models.transformer",
    "VaceWanDiT": "wanx.models.vace",
    "WanVAE": "wanx.models.vae",
    "WanVAE22": "wanx.models.vae22",
    "UMT5Encoder": "wanx.models.t5",
    "CLIPVisionEncoder": "wanx.models.clip",
    "WanPipeline": "wanx.pipeline",
    "Video": "wanx.video",
    "VideoWriter": "wanx.video",
    "SavedVideo": "wanx.video",
    "TextEncoder": "wanx.text",
    "DiTConfig": "wanx.configs",
    "VaceConfig": "wanx.configs",
    "VAEConfig": "wanx.configs",
    "VAE22Config": "wanx.configs",
    "attention": "wanx.attention",
    "set_attention_backend": "wanx.attention",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wanx' has no attribute {name!r}")
