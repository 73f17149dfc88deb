"""Wan2.1 VACE DiT (official `VaceWanModel`, `wan/modules/vace_model.py`), official parameter names.

The T2V DiT plus a second stack of blocks, `vace_blocks`, that reads the VACE context (the
inactive and reactive frame latents and the 8x8-folded mask, `vace_in_dim` = 96 channels) and
gives one hint per stack block; main block `vace_layers[n]` adds hint n, times
`vace_context_scale`, to its output. The first VACE block starts from
`before_proj(vace tokens) + video tokens`, each one's hint is `after_proj` of its output.

All of it happens in `run_blocks`, inside the block-loop seam: a step cache that skips the loop
skips the VACE blocks with it (their effect is in the stored residual), and sequence
parallelism gives every rank its slice of the VACE tokens with its slice of the video tokens
(`VaceState.token_fields`). The VACE blocks go through the block wrappers like the main blocks
(streamed, checkpointed, compiled) and are a block list of their own (`stream_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..configs import VaceConfig, dit_config
from .transformer import DiTState, WanAttentionBlock, WanDiT, _call_block, _wrapped, input_dtype


class VaceWanAttentionBlock(WanAttentionBlock):
    """A VACE block: a main block on the VACE stream, with `before_proj` (block 0 only: the
    VACE tokens into the stream beside the video tokens) and `after_proj` (the hint)."""

    def __init__(self, cfg: VaceConfig, block_id: int):
        super().__init__(cfg)
        self.block_id = block_id
        if block_id == 0:
            self.before_proj = nn.Linear(cfg.dim, cfg.dim)
            nn.init.zeros_(self.before_proj.weight)
            nn.init.zeros_(self.before_proj.bias)
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)  # zero-initialised: a fresh VACE model is the base model
        nn.init.zeros_(self.after_proj.weight)
        nn.init.zeros_(self.after_proj.bias)

    def forward(self, c: Tensor, e0: Tensor, context: Tensor, context_img: Tensor | None,
                rope: tuple[Tensor, Tensor], x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """c `[B, L, D]` float32: the VACE stream (block 0: the embedded VACE context, and x the
        embedded video tokens) -> (hint, c) both `[B, L, D]` float32."""
        if self.block_id == 0:
            c = self.before_proj(c.to(input_dtype(self.before_proj))).float() + x
        c = super().forward(c, e0, context, context_img, rope)
        return self.after_proj(c.to(input_dtype(self.after_proj))).float(), c


@dataclass
class VaceState(DiTState):
    """`DiTState` plus the embedded VACE context `vace` `[B, L, D]` float32 (zero rows past its
    own tokens) and the scale of each hint `vace_scale` `[len(vace_layers)]` float32."""

    vace: Tensor | None = None
    vace_scale: Tensor | None = None

    batch_fields: ClassVar[tuple[str, ...]] = (*DiTState.batch_fields, "vace")
    token_fields: ClassVar[tuple[str, ...]] = ("vace",)


class VaceWanDiT(WanDiT):
    """Wan2.1 VACE-1.3B/14B (and Wan2.2 VACE-Fun experts): `WanDiT(config)` builds one for a
    `VaceConfig`."""

    stream_blocks = ("blocks", "vace_blocks")

    def __init__(self, config: VaceConfig | str = "vace-1.3B"):
        cfg = dit_config(config) if isinstance(config, str) else config
        if not isinstance(cfg, VaceConfig):
            raise ValueError(f"VaceWanDiT needs a VaceConfig, got a {cfg.model_type} DiTConfig")
        super().__init__(cfg)
        self.vace_blocks = nn.ModuleList(VaceWanAttentionBlock(cfg, n) for n in range(len(cfg.vace_layers)))
        self.vace_patch_embedding = nn.Conv3d(cfg.vace_in_dim, cfg.dim, kernel_size=cfg.patch_size,
                                              stride=cfg.patch_size)
        self._hint_of = {layer: n for n, layer in enumerate(cfg.vace_layers)}  # main block -> its hint

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, clip_features: Tensor | None = None,
                y: Tensor | None = None, *, vace_context: Tensor | Sequence[Tensor] | None = None,
                vace_context_scale: float | Sequence[float] | Tensor = 1.0) -> Tensor:
        """As `WanDiT.forward`, with the VACE context `[B (or 1), vace_in_dim, F', H, W]` (F' <= F
        latent frames: the official model zero-pads the VACE tokens to the video's; the official
        list of `[vace_in_dim, F, H, W]` per sample is taken too) and `vace_context_scale`, one
        number or one per VACE layer (diffusers' `control_hidden_states_scale`)."""
        state = self.embed(x, timestep, context, clip_features, y, vace_context=vace_context,
                           vace_context_scale=vace_context_scale)
        x = _wrapped(self.loop_wrappers, self.run_blocks)(state)
        return self.run_head(state, x)

    def embed(self, x: Tensor, timestep: Tensor, context: Tensor, clip_features: Tensor | None = None,
              y: Tensor | None = None, *, vace_context=None, vace_context_scale=1.0) -> VaceState:
        cfg = self.config
        if vace_context is None:
            raise ValueError(f"a VACE model needs vace_context [B, {cfg.vace_in_dim}, F, H, W] (frame latents and mask)")
        if isinstance(vace_context, (list, tuple)):
            vace_context = torch.stack(list(vace_context))
        if vace_context.ndim != 5 or vace_context.shape[1] != cfg.vace_in_dim:
            raise ValueError(f"vace_context must be [B, {cfg.vace_in_dim}, F, H, W], got {tuple(vace_context.shape)}")
        if (vace_context.shape[0] not in (1, x.shape[0]) or vace_context.shape[3:] != x.shape[3:]
                or vace_context.shape[2] > x.shape[2]):
            raise ValueError(f"vace_context {tuple(vace_context.shape)} must have the latents' batch (or 1), height "
                             f"and width and at most their frames: latents {tuple(x.shape)}")
        scale = torch.as_tensor(vace_context_scale, dtype=torch.float32, device=x.device).reshape(-1)
        if scale.numel() not in (1, len(cfg.vace_layers)):
            raise ValueError(f"vace_context_scale must be one number or {len(cfg.vace_layers)} (one per VACE layer), "
                             f"got {scale.numel()}")
        base = super().embed(x, timestep, context, clip_features, y)
        c = self.vace_patch_embedding(vace_context.to(self.vace_patch_embedding.weight.dtype))
        c = rearrange(c, "b d f h w -> b (f h w) d").float()
        c = F.pad(c, (0, 0, 0, base.x.shape[1] - c.shape[1])).expand(base.x.shape[0], -1, -1)
        return VaceState(**vars(base), vace=c, vace_scale=scale.expand(len(cfg.vace_layers)))

    def run_blocks(self, state: VaceState) -> Tensor:
        """The VACE blocks (hints), then the main blocks, each vace layer adding its scaled hint."""
        call = _wrapped(self.block_wrappers, _call_block)
        hints, c = [], state.vace
        for block in self.vace_blocks:
            hint, c = call(block, c, state.e0, state.context, state.context_img, state.rope, state.x)
            hints.append(hint)
        x = state.x
        for i, block in enumerate(self.blocks):
            x = call(block, x, state.e0, state.context, state.context_img, state.rope)
            if (n := self._hint_of.get(i)) is not None:
                x = x + hints[n] * state.vace_scale[n]
        return x
