"""Wan2.1/Wan2.2 diffusion transformer (DiT), with the official parameter names.

Official checkpoints load into `WanDiT` without renaming. The numerics follow the
official `WanModel`: sinusoidal time embedding in float64 (cos first), time MLPs,
modulation, norms, head and the gated residual stream in float32; linear layers and
attention in the weights' dtype (bf16 in production); RoPE angles in float64.

Wan2.2 changes one thing in the math: the timestep may be given per token (`[B, L]`), so
that the time embedding and every modulation become per token (TI2V gives its image frame's
tokens timestep 0). A timestep per sample (`[B]`) is the Wan2.1 path, unchanged.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..attention import attention
from ..configs import AnimateConfig, DiTConfig, S2VConfig, VaceConfig, dit_config



def input_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a layer takes its input in: its weight's, or the dtype a quantized layer
    computes in (declared as `compute_dtype`, e.g. FP8 weights computing in bf16)."""
    return getattr(layer, "compute_dtype", None) or layer.weight.dtype

def sinusoidal_embedding(dim: int, timestep: Tensor) -> Tensor:
    """`[B]` timesteps -> `[B, dim]` float64, cos half first (official order)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timestep.device) / half)
    angles = torch.outer(timestep.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Real dims of the head given to frame, height and width: 44/42/42 for head dim 128."""
    d = head_dim
    return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)


@functools.lru_cache(maxsize=16)
def rope_frequencies(head_dim: int, grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin `[f*h*w, head_dim/2]` (float32, from float64 angles) for a token grid.

    Each axis uses its own exponent denominator (the axis' dim), theta 10000, positions
    from 0, laid out [frame | height | width] as in the official `rope_params`.
    """
    per_axis = []
    for axis_dim, n in zip(rope_axes(head_dim), grid):
        inv_freq = 1.0 / torch.pow(10000.0, torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
        per_axis.append(torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv_freq))
    f, h, w = grid
    angles = torch.cat(
        [
            per_axis[0][:, None, None, :].expand(f, h, w, -1),
            per_axis[1][None, :, None, :].expand(f, h, w, -1),
            per_axis[2][None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, head_dim // 2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of `[B, L, H, D]` by `[L, D/2]` angles; float32 out."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, H, D/2] each
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def layer_norm(x: Tensor, eps: float) -> Tensor:
    """Non-affine LayerNorm in float32 (the official norm1, norm2 and head norm)."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    """q/k norm over the full width (all heads), normalised in float32 (`WanRMSNorm`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class SelfAttention(nn.Module):
    # The seam for attention across devices: None calls `attention`; sequence parallelism
    # sets a function of the same signature that sees every rank's tokens. Never model math.
    attention_fn = None

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """x `[B, L, D]` -> `[B, L, D]`."""
        n = self.num_heads
        v = self.v(x).unflatten(-1, (n, -1))  # [B, L, H, Dh]
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, (n, -1)), *rope).to(v.dtype)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, (n, -1)), *rope).to(v.dtype)
        return self.o((self.attention_fn or attention)(q, k, v).flatten(2))


class CrossAttention(nn.Module):
    """Attention to the text tokens; I2V/FLF2V add a second attention to the CLIP tokens
    sharing the query and the output projection."""

    # The seam for guidance in the text attention: None calls `attention`; NAG (wanx.guidance)
    # sets a function of the same signature `(q, k, v) -> out` on each block for one pass, that
    # also attends to the negative prompt. Never model math.
    attention_fn = None

    def __init__(self, dim: int, num_heads: int, eps: float, image_input: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        if image_input:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x: Tensor, context: Tensor, context_img: Tensor | None = None) -> Tensor:
        """x `[B, L, D]`, context `[B, text_len, D]`, context_img `[B, 257|514, D]` -> `[B, L, D]`."""
        n = self.num_heads
        v = self.v(context).unflatten(-1, (n, -1))
        q = self.norm_q(self.q(x)).unflatten(-1, (n, -1)).to(v.dtype)
        k = self.norm_k(self.k(context)).unflatten(-1, (n, -1)).to(v.dtype)
        out = (self.attention_fn or attention)(q, k, v)
        if context_img is not None:
            v_img = self.v_img(context_img).unflatten(-1, (n, -1))
            k_img = self.norm_k_img(self.k_img(context_img)).unflatten(-1, (n, -1)).to(v_img.dtype)
            out = out + attention(q, k_img, v_img)
        return self.o(out.flatten(2))


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim, self.eps = cfg.dim, cfg.eps
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.eps)  # the only affine norm: before cross-attention
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, cfg.has_image_input)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self, x: Tensor, e0: Tensor, context: Tensor, context_img: Tensor | None, rope: tuple[Tensor, Tensor]
    ) -> Tensor:
        """x `[B, L, D]` float32 residual stream, e0 `[B, 6, D]` (per sample) or `[B, L, 6, D]`
        (per token) float32 time projection."""
        shift, scale, gate, ffn_shift, ffn_scale, ffn_gate = _per_token(self.modulation.float() + e0).unbind(-2)
        dtype = input_dtype(self.self_attn.q)

        # addcmul: the modulation and the gated residuals in one fused op each.
        h = torch.addcmul(shift, layer_norm(x, self.eps), 1 + scale)
        x = torch.addcmul(x, self.self_attn(h.to(dtype), rope).float(), gate)
        # Cross-attention is neither modulated nor gated.
        x = x + self.cross_attn(self.norm3(x).to(dtype), context, context_img).float()
        h = torch.addcmul(ffn_shift, layer_norm(x, self.eps), 1 + ffn_scale)
        return torch.addcmul(x, self.ffn(h.to(dtype)).float(), ffn_gate)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x `[B, L, D]`, e `[B, D]` or `[B, L, D]` time embedding (not the projection) -> `[B, L, prod(patch)*C]`."""
        shift, scale = _per_token(self.modulation.float() + e.unsqueeze(-2)).unbind(-2)
        h = torch.addcmul(shift, layer_norm(x, self.eps), 1 + scale)
        return self.head(h.to(self.head.weight.dtype))


def _per_token(modulation: Tensor) -> Tensor:
    """`[B, k, D]` (one row per sample) -> `[B, 1, k, D]`; `[B, L, k, D]` (per token) as it is:
    unbound on dim -2, each part broadcasts over the `[B, L, D]` stream."""
    return modulation.unsqueeze(1) if modulation.ndim == 3 else modulation


class MLPProj(nn.Module):
    """CLIP features -> image context tokens; FLF2V adds a learned position per token."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d_img = cfg.image_dim
        self.proj = nn.Sequential(
            nn.LayerNorm(d_img), nn.Linear(d_img, d_img), nn.GELU(), nn.Linear(d_img, cfg.dim), nn.LayerNorm(cfg.dim)
        )
        if cfg.model_type == "flf2v":
            self.emb_pos = nn.Parameter(torch.zeros(1, cfg.image_tokens, d_img))

    def forward(self, clip_features: Tensor) -> Tensor:
        """`[B, 257|514, image_dim]` -> `[B, 257|514, D]`."""
        norm_in, fc1, act, fc2, norm_out = self.proj
        x = clip_features.float()
        if hasattr(self, "emb_pos"):
            x = x + self.emb_pos.float()
        x = fc2(act(fc1(norm_in(x).to(fc1.weight.dtype))))
        return norm_out(x.float()).to(fc1.weight.dtype)


@dataclass
class DiTState:
    """What `WanDiT.embed` makes of the inputs, read by the block loop and the head: the tokens
    x `[B, L, D]` float32, the time embedding e (`[B, D]` or per token `[B, L, D]`) and its
    projection e0 (`[B, 6, D]` or `[B, L, 6, D]`), the embedded text context `[B, text_len, D]`
    and image context (`[B, 257|514, D]` or None), the RoPE tables and the token grid (f, h, w)."""

    x: Tensor
    e: Tensor
    e0: Tensor
    context: Tensor
    context_img: Tensor | None
    rope: tuple[Tensor, Tensor]
    grid: tuple[int, int, int]

    # What a loop wrapper that runs the loop on some batch rows (a step cache) takes the rows
    # of, besides x; and what one that runs it on a slice of the tokens (sequence parallelism)
    # slices like x, besides e0 and rope. A model with more inputs to its loop (VACE) adds its own.
    batch_fields: ClassVar[tuple[str, ...]] = ("e0", "context", "context_img")
    token_fields: ClassVar[tuple[str, ...]] = ()


def _call_block(block: nn.Module, *inputs) -> Tensor:
    return block(*inputs)


def _wrapped(wrappers: list, inner):
    """`inner` inside each wrapper, the first in the list outermost."""
    for wrapper in reversed(wrappers):
        inner = functools.partial(wrapper, inner)
    return inner


class WanDiT(nn.Module):
    """Wan DiT, selected by `DiTConfig`: Wan2.1 T2V-1.3B/14B, I2V-14B and FLF2V-14B; Wan2.2's
    A14B experts (each one `WanDiT`) and TI2V-5B."""

    # The repeated blocks, for runtime transforms that act block by block (memory.streaming).
    stream_blocks = ("blocks",)
    # The class of the main blocks (S2V's modulate two kinds of token apart).
    block_class: ClassVar[type[nn.Module]] = WanAttentionBlock

    # Parameters that stay float32 whatever dtype the model is loaded in (matched on
    # dotted-name components), as the official model computes them under fp32 autocast.
    keep_in_fp32 = ("time_embedding", "time_projection", "modulation", "norm3", "norm_q", "norm_k",
                    "norm_k_img", "head.head", "img_emb.proj.0", "img_emb.proj.4", "emb_pos")

    def __new__(cls, config: DiTConfig | str = "t2v-1.3B", *args, **kwargs):
        # `WanDiT(config)` builds the class the config is: a VaceConfig makes a VaceWanDiT (an
        # AnimateConfig an AnimateWanDiT, an S2VConfig an S2VWanDiT), so every place that builds a DiT from a checkpoint's
        # config builds VACE and Animate models too.
        cfg = dit_config(config) if isinstance(config, str) else config
        if cls is WanDiT and isinstance(cfg, VaceConfig):
            from .vace import VaceWanDiT

            cls = VaceWanDiT
        elif cls is WanDiT and isinstance(cfg, AnimateConfig):
            from .animate import AnimateWanDiT

            cls = AnimateWanDiT
        elif cls is WanDiT and isinstance(cfg, S2VConfig):
            from .s2v import S2VWanDiT

            cls = S2VWanDiT
        return super().__new__(cls)

    def __init__(self, config: DiTConfig | str = "t2v-1.3B"):
        super().__init__()
        cfg = self.config = dit_config(config) if isinstance(config, str) else config
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))  # shared by all blocks
        self.blocks = nn.ModuleList(self.block_class(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.has_image_input:
            self.img_emb = MLPProj(cfg)
        # The seams, each an ordered list of wrappers (the first is the outermost) that
        # runtime transforms add themselves to and take themselves off; never model math.
        # Around the block loop: `(inner, state) -> x`, inner `(state) -> x` (a step cache
        # skips the loop and adds a stored residual; sequence parallelism runs it on its
        # slice of the tokens). Around each block: `(inner, block, x, e0, context, context_img,
        # rope) -> x`, inner of the same signature less itself (activation checkpointing,
        # block streaming, the compiled block).
        self.loop_wrappers: list = []
        self.block_wrappers: list = []

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        context: Tensor,
        clip_features: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        """Velocity `[B, out_dim, F, H, W]` float32 for latents x `[B, out_dim, F, H, W]`.

        timestep on the 0..1000 scale: `[B]` (or `[1]` for the whole batch), or per token
        `[B, L]` (or `[1, L]`) with L = (F/pt)(H/ph)(W/pw) patch tokens in (f, h, w) order, as
        the official Wan2.2 model takes it. context `[B, L<=text_len, text_dim]` (zero-padded to
        text_len here); I2V/FLF2V: y `[B, 20, F, H, W]` (mask 4 + image latent 16); Wan2.1
        I2V/FLF2V: clip_features `[B, 257|514, image_dim]`.
        """
        state = self.embed(x, timestep, context, clip_features, y)
        x = _wrapped(self.loop_wrappers, self.run_blocks)(state)
        return self.run_head(state, x)

    def embed(self, x: Tensor, timestep: Tensor, context: Tensor, clip_features: Tensor | None = None,
              y: Tensor | None = None) -> DiTState:
        """The inputs (as `forward` takes them) checked and embedded: tokens, time, text, image."""
        cfg = self.config
        self._check_inputs(x, context, clip_features, y)
        dtype = self.patch_embedding.weight.dtype
        timestep = self._check_timestep(timestep, x)

        if y is not None:
            x = torch.cat([x, y], dim=1)  # [B, in_dim, F, H, W]
        x = self.patch_embedding(x.to(dtype))  # [B, D, f, h, w]
        grid = tuple(x.shape[2:])
        x = rearrange(x, "b d f h w -> b (f h w) d").float()
        rope = rope_frequencies(cfg.head_dim, grid, x.device)

        if timestep.ndim == 1:
            # One timestep per sample, or one for the whole batch (batched guidance): embedded once, broadcast.
            e, e0 = self.embed_time(timestep)  # [B, D], [B, 6, D]
        else:
            # Per token: a handful of distinct values (TI2V: 0 and t), each embedded once.
            values, index = torch.unique(timestep, return_inverse=True)
            e, e0 = (part[index] for part in self.embed_time(values))  # [B, L, D], [B, L, 6, D]

        # The official model pads the text with zeros to text_len *before* the embedding
        # MLP and attends to every position, so padded rows carry text_embedding(0).
        context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        context = self.text_embedding(context.to(dtype))  # [B, text_len, D]
        context_img = self.img_emb(clip_features) if clip_features is not None else None
        return DiTState(x, e, e0, context, context_img, rope, grid)

    def run_blocks(self, state: DiTState) -> Tensor:
        """The residual stream `state.x` `[B, L, D]` through every block, each through the block wrappers."""
        call = _wrapped(self.block_wrappers, _call_block)
        x = state.x
        for block in self.blocks:
            x = call(block, x, state.e0, state.context, state.context_img, state.rope)
        return x

    def run_head(self, state: DiTState, x: Tensor) -> Tensor:
        """The residual stream `[B, L, D]` after the blocks -> velocity `[B, out_dim, F, H, W]` float32."""
        x = self.head(x, state.e)  # [B, L, pt*ph*pw*C], channels fastest
        pt, ph, pw = self.config.patch_size
        f, h, _ = state.grid
        x = rearrange(x, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)", f=f, h=h, pt=pt, ph=ph, pw=pw)
        return x.float()

    def embed_time(self, timestep: Tensor) -> tuple[Tensor, Tensor]:
        """`[N]` timesteps -> the time embedding e `[N, D]` and its projection e0 `[N, 6, D]`, float32."""
        t = sinusoidal_embedding(self.config.freq_dim, timestep)
        e = self.time_embedding(t.to(self.time_embedding[0].weight.dtype)).float()
        e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float()
        return e, e0.unflatten(1, (6, self.config.dim))

    def _check_timestep(self, timestep, x: Tensor) -> Tensor:
        """`[B]`/`[1]` (a scalar too) or `[B, L]`/`[1, L]` on x's device; a per-token timestep
        that is one value per sample takes the per-sample path (the same numbers, less work)."""
        batch = x.shape[0]
        tokens = math.prod(s // p for s, p in zip(x.shape[2:], self.config.patch_size))
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 2:
            if timestep.shape[0] not in (1, batch) or timestep.shape[1] != tokens:
                raise ValueError(f"a per-token timestep must be [{batch}, {tokens}] (batch, patch tokens), "
                                 f"got {list(timestep.shape)}")
            if bool((timestep == timestep[:, :1]).all()):
                return timestep[:, 0]
            return timestep
        timestep = timestep.reshape(-1)
        if timestep.shape[0] not in (1, batch):
            raise ValueError(f"timestep must have 1 or {batch} (batch) values, or be per token [{batch}, {tokens}]; "
                             f"got {timestep.shape[0]}")
        return timestep

    def _check_inputs(self, x: Tensor, context: Tensor, clip_features: Tensor | None, y: Tensor | None) -> None:
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be [B, C, F, H, W] latents, got shape {tuple(x.shape)}")
        channels = x.shape[1] + (y.shape[1] if y is not None else 0)
        if channels != cfg.in_dim:
            need = "y [B, 20, F, H, W] (mask + image latent)" if cfg.has_y else "no y"
            raise ValueError(f"{cfg.model_type} model takes {cfg.in_dim} input channels ({need}); got {channels}")
        if cfg.has_image_input and clip_features is None:
            raise ValueError(f"{cfg.model_type} model needs clip_features [B, {cfg.image_tokens}, {cfg.image_dim}]")
        if not cfg.has_image_input and clip_features is not None:
            raise ValueError(f"{cfg.model_type} model{'' if cfg.clip else ' (Wan2.2, no CLIP)'} takes no clip_features")
        if clip_features is not None and tuple(clip_features.shape[1:]) != (cfg.image_tokens, cfg.image_dim):
            raise ValueError(
                f"clip_features must be [B, {cfg.image_tokens}, {cfg.image_dim}], got {tuple(clip_features.shape)}"
            )
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(f"latent size {tuple(x.shape[2:])} must be divisible by patch size {cfg.patch_size}")
        if context.shape[1] > cfg.text_len or context.shape[-1] != cfg.text_dim:
            raise ValueError(
                f"context must be [B, L<={cfg.text_len}, {cfg.text_dim}], got {tuple(context.shape)}"
            )
