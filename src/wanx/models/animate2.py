"""Wan-Animate-2-14B DiT (base and distilled): diffusers' `WanAnimate2Transformer3DModel`,
DiffSynth's `WanAnimate2Transformer`, with the release's parameter names.

The Wan2.1 I2V-14B DiT (y and CLIP tokens), each block kept as `blocks.N.block` (the
release's in-context wrapper, which holds no weights of its own). A segment runs two kinds of pass:
- the reference pass (`mode="extract"`): the driving/reference latents x (16 channels) and
  their condition latents y (20), at timestep 1 whatever is given, through every block as
  plain self-attention; each block stores its self-attention's keys (after the q/k norm,
  before RoPE) and values in a `ReferenceCache`. The reference tokens' RoPE positions start at
  (`refer_offset_t`, `refer_offset_h`, `refer_offset_w`) of the config, -1 meaning the
  reference grid's size on that axis (the release: frame 1, height 0, width w: beside the
  video), frames `refer_stride` apart;
- the denoising passes (`mode="cached"`): the noisy latents (the reference image's latent
  frame first, then the video's) with their condition latents; in each block every token
  attends to every token of its pass and to the cached reference tokens of the reference
  frame before its own frame (frame t to reference frame t-1; frame 0 to none), the cached
  keys rotated at the reference positions. The unconditional pass (`uncond=True`) skips
  block 9, as the release does.

The joint attention is the released block mask written out: the official code packs the pass
into a buffer sized for the full segment (`origin`: its latent frames and tokens per frame)
whose unused slots are zero keys that the mask still admits, so a pass smaller than the segment
attends to those zeros too (score 0, value 0). Here each frame attends to its keys plus one
zero key whose score is raised by log(count of such slots): the same softmax. The grouping by
frame is exact for any sizes, needs no mask as large as the sequence squared, and runs on any
attention backend that takes a bias (SDPA); with no zero slots (the pipeline's segments are
the segment's size) it needs no bias at all.

Sequence parallelism is not wired (the reference attention pairs frames across the sequence):
`wanx.distributed.sequence` refuses this model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

from ..attention import attention
from ..configs import Animate2Config, dit_config
from .transformer import (DiTState, SelfAttention, WanAttentionBlock, WanDiT, _call_block, _wrapped, apply_rope,
                          rope_angles, rope_frequencies)

UNCOND_SKIPPED_BLOCK = 9  # the block the release's unconditional pass leaves out
MODES = ("extract", "cached")


class ReferenceCache:
    """What a reference pass leaves for the denoising passes of its segment: per block, the
    reference tokens' keys (q/k-normed, before RoPE) and values `[B, L, H, Dh]`, and the
    reference token grid. Cleared (or a new one made) for the next segment."""

    def __init__(self, num_layers: int):
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.grid: tuple[int, int, int] | None = None

    def store(self, layer: int, key: Tensor, value: Tensor) -> None:
        self.keys[layer], self.values[layer] = key, value

    def get(self, layer: int) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is None or self.grid is None:
            raise ValueError("the reference cache is empty: run the reference pass (mode='extract') before denoising")
        return self.keys[layer], self.values[layer]

    def clear(self) -> None:
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)
        self.grid = None


@functools.lru_cache(maxsize=16)
def offset_rope(head_dim: int, grid: tuple[int, int, int], offsets: tuple[int, int, int], t_stride: int,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin `[f*h*w, head_dim/2]` as `rope_frequencies`, positions starting at `offsets`
    (frame, height, width), frames `t_stride` apart (the release's `rope_params(offset=...)` and
    `rope_apply(time_stride=...)`)."""
    if offsets == (0, 0, 0) and t_stride == 1:
        return rope_frequencies(head_dim, grid, device)
    angles = rope_angles(head_dim, *(start + step * torch.arange(n, dtype=torch.float64, device=device)
                                     for n, start, step in zip(grid, offsets, (t_stride, 1, 1))))
    return torch.cos(angles).float(), torch.sin(angles).float()


@dataclass(frozen=True)
class InContext:
    """What a block's self-attention needs beyond its input, passed where a Wan block takes its
    RoPE tables: the pass' mode and RoPE, the cache and this block's index in it; for a
    denoising pass the reference keys' RoPE and the grids (this pass', the reference's, and the
    segment's `origin`: latent frames of the reference, tokens per frame)."""

    mode: str
    rope: tuple[Tensor, Tensor]
    cache: ReferenceCache
    layer: int = 0
    grid: tuple[int, int, int] = (0, 0, 0)
    ref_rope: tuple[Tensor, Tensor] | None = None
    origin: tuple[int, int] | None = None

    def __iter__(self):
        # Block wrappers that read the RoPE argument as its tables (the compiled block marks
        # their token dim dynamic) see this pass' tables.
        return iter(self.rope)


class InContextSelfAttention(SelfAttention):
    """The Wan self-attention (same weights) that stores or reads the reference tokens' K/V."""

    def forward(self, x: Tensor, ctx: InContext) -> Tensor:
        n = self.num_heads
        v = self.v(x).unflatten(-1, (n, -1))  # [B, L, H, Dh]
        q = self.norm_q(self.q(x)).unflatten(-1, (n, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (n, -1))
        if ctx.mode == "extract":
            ctx.cache.store(ctx.layer, k, v)
            q, k = (apply_rope(t, *ctx.rope).to(v.dtype) for t in (q, k))
            return self.o((self.attention_fn or attention)(q, k, v).flatten(2))
        q, k = (apply_rope(t, *ctx.rope).to(v.dtype) for t in (q, k))
        k_ref, v_ref = ctx.cache.get(ctx.layer)
        k_ref = apply_rope(k_ref, *ctx.ref_rope).to(v.dtype)
        out = in_context_attention(q, k, v, k_ref, v_ref.to(v.dtype), ctx.grid, ctx.cache.grid, ctx.origin)
        return self.o(out.flatten(2))


def in_context_attention(q: Tensor, k: Tensor, v: Tensor, k_ref: Tensor, v_ref: Tensor, grid: tuple[int, int, int],
                         ref_grid: tuple[int, int, int], origin: tuple[int, int]) -> Tensor:
    """The release's masked joint attention `[B, L, H, Dh]`: frame t of this pass' tokens to all
    of them and to reference frame t-1, plus the zero slots of the segment-sized buffer that
    the mask admits (see the module docstring)."""
    f, h, w = grid
    ref_f, ref_h, ref_w = ref_grid
    hw, ref_hw = h * w, ref_h * ref_w
    frames, slots = origin
    batch, _, heads, head_dim = q.shape
    k_ref, v_ref = (t.expand(batch, -1, -1, -1) for t in (k_ref, v_ref))
    zero = q.new_zeros(batch, 1, heads, head_dim)
    unused = (frames + 1) * slots - f * hw  # this pass' part of the buffer left empty
    out = []
    for t in range(f):
        keys, values, empty = [k], [v], unused
        if 1 <= t <= frames:  # the reference part of the buffer has `frames` frames of `slots` slots
            empty += slots
            if t - 1 < ref_f:
                keys.append(k_ref[:, (t - 1) * ref_hw:t * ref_hw])
                values.append(v_ref[:, (t - 1) * ref_hw:t * ref_hw])
                empty -= ref_hw
        bias = None
        if empty:
            keys.append(zero)
            values.append(zero)
            length = sum(part.shape[1] for part in keys)
            bias = q.new_zeros(1, 1, 1, length, dtype=torch.float32)
            bias[..., -1] = math.log(empty)
        out.append(attention(q[:, t * hw:(t + 1) * hw], torch.cat(keys, 1), torch.cat(values, 1),
                             bias=None if bias is None else bias.to(q.dtype)))
    return torch.cat(out, dim=1)


class InContextBlock(WanAttentionBlock):
    self_attention_class = InContextSelfAttention


class Animate2Block(nn.Module):
    """The release's in-context block: a Wan block under `.block`, its self-attention told by
    `ctx` (in the RoPE argument's place) which pass this is."""

    def __init__(self, cfg: Animate2Config):
        super().__init__()
        self.block = InContextBlock(cfg)

    # What acts on a Wan block's attentions (NAG's attention seam) finds them here too.
    @property
    def self_attn(self) -> nn.Module:
        return self.block.self_attn

    @property
    def cross_attn(self) -> nn.Module:
        return self.block.cross_attn

    def forward(self, x: Tensor, e0: Tensor, context: Tensor, context_img: Tensor | None, ctx: InContext) -> Tensor:
        return self.block(x, e0, context, context_img, ctx)


@dataclass
class Animate2State(DiTState):
    """`DiTState` plus the pass' in-context arguments (its `layer` set per block) and whether it
    is the unconditional pass."""

    incontext: InContext | None = None
    uncond: bool = False


class Animate2WanDiT(WanDiT):
    """Wan-Animate-2 DiT: `forward(x, timestep, context, clip_features, y, cache=..., mode=...)`."""

    block_class = Animate2Block

    def __init__(self, config: Animate2Config | str = "animate2-14B"):
        cfg = dit_config(config) if isinstance(config, str) else config
        if not isinstance(cfg, Animate2Config):
            raise ValueError(f"Animate2WanDiT needs an Animate2Config, got model_type {cfg.model_type!r}")
        super().__init__(cfg)

    def new_cache(self) -> ReferenceCache:
        return ReferenceCache(self.config.num_layers)

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, clip_features: Tensor | None = None,
                y: Tensor | None = None, *, cache: ReferenceCache, mode: str, origin: tuple[int, int] | None = None,
                uncond: bool = False) -> Tensor:
        """Velocity `[B, 16, F, H, W]` float32 (of no use in the reference pass, whose product is
        the filled `cache`).

        mode "extract": x the reference latents `[B, 16, F_ref, H, W]`, y their condition `[B, 20, ...]`;
        timestep ignored (1). mode "cached": x the noisy latents `[B, 16, F, H, W]` (F = F_ref + 1:
        the reference image's latent frame first), y their condition; `origin` (latent frames of the
        segment's reference, tokens per frame) sizes the release's buffer, default this pass' own
        (F - 1, H*W/4). clip_features `[B, 257, image_dim]` when the config has CLIP (use_img_emb);
        uncond: the unconditional pass (skips block 9)."""
        state = self.embed(x, timestep, context, clip_features, y, cache=cache, mode=mode, origin=origin,
                           uncond=uncond)
        x = _wrapped(self.loop_wrappers, self.run_blocks)(state)
        return self.run_head(state, x)

    def embed(self, x: Tensor, timestep: Tensor, context: Tensor, clip_features: Tensor | None = None,
              y: Tensor | None = None, *, cache: ReferenceCache, mode: str, origin: tuple[int, int] | None = None,
              uncond: bool = False) -> Animate2State:
        cfg = self.config
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if y is None:
            raise ValueError("a Wan-Animate-2 DiT needs y, the 20 condition channels beside the latents")
        if uncond and cfg.num_layers <= UNCOND_SKIPPED_BLOCK:
            raise ValueError(f"the unconditional pass skips block {UNCOND_SKIPPED_BLOCK}: this DiT has only "
                             f"{cfg.num_layers} blocks")
        if len(cache.keys) != cfg.num_layers:
            raise ValueError(f"the reference cache holds {len(cache.keys)} blocks, the DiT {cfg.num_layers}: "
                             "make it with new_cache()")
        if mode == "extract":
            timestep = torch.ones(x.shape[0], device=x.device)  # the reference pass is modulated at t = 1
        base = super().embed(x, timestep, context, clip_features, y)
        f, h, w = base.grid
        if mode == "extract":
            cache.clear()
            cache.grid = base.grid
            ctx = InContext(mode, self._reference_rope(base.grid, x.device), cache, grid=base.grid)
        else:
            if cache.grid is None:
                raise ValueError("the reference cache is empty: run the reference pass (mode='extract') first")
            ref_f, ref_h, ref_w = cache.grid
            origin = (f - 1, h * w) if origin is None else (int(origin[0]), int(origin[1]))
            if f > origin[0] + 1 or h * w > origin[1] or ref_f > origin[0] or ref_h * ref_w > origin[1]:
                raise ValueError(f"origin {origin} (latent frames, tokens per frame) is smaller than this pass "
                                 f"({f} frames of {h * w} tokens) or the reference ({ref_f} of {ref_h * ref_w}): "
                                 "give the segment's full size")
            ctx = InContext(mode, base.rope, cache, grid=base.grid, ref_rope=self._reference_rope(cache.grid, x.device),
                            origin=origin)
        inherited = {field.name: getattr(base, field.name) for field in fields(DiTState)}
        return Animate2State(**inherited, incontext=ctx, uncond=uncond)

    def _reference_rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        cfg = self.config
        offsets = tuple(o if o >= 0 else n for o, n in
                        zip((cfg.refer_offset_t, cfg.refer_offset_h, cfg.refer_offset_w), grid))
        return offset_rope(cfg.head_dim, grid, offsets, cfg.refer_stride, device)

    def run_blocks(self, state: Animate2State) -> Tensor:
        call = _wrapped(self.block_wrappers, _call_block)
        x = state.x
        for i, block in enumerate(self.blocks):
            if state.uncond and i == UNCOND_SKIPPED_BLOCK:
                continue
            x = call(block, x, state.e0, state.context, state.context_img, replace(state.incontext, layer=i))
        return x
