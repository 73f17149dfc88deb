"""Wan2.2-Animate DiT (official `WanAnimateModel`, `wan/modules/animate/`), official parameter names.

The Wan2.1 I2V DiT (noise + y, CLIP tokens) with three additions:
- `pose_patch_embedding`: the pose video's latents (one frame fewer than the noise: the first
  latent frame is the reference image's) patch-embedded and added to the tokens of frames 1..
- `motion_encoder` (LIA's `Generator`) turns each 512x512 face frame into a motion vector:
  a StyleGAN-like conv stack (equalised-lr convs, blur before each stride-2 conv, fused leaky
  ReLU) to a style code, 5 linears to `motion_dim` coefficients, which mix the orthonormalised
  learned directions (`dec.direction`, QR in float32). `face_encoder` then runs causal conv1d
  over the frames (two stride-2 convs: 4k+1 face frames -> k+1 groups, one per latent frame
  after the reference), as `face_encoder_num_heads` token streams plus a learned padding token.
- `face_adapter.fuser_blocks`: after main block i with i % inject_face_latents_blocks == 0,
  each latent frame's tokens attend to that frame's face tokens (the reference frame to a zero
  row) and the result is added to the stream.

The face tokens are made in `embed` and the adapter blocks run in `run_blocks`, through the block
wrappers like the main blocks (streamed, checkpointed, compiled: `stream_blocks`), so a step
cache that skips the loop skips them too. Sequence parallelism is not wired for them (a face
block needs every token of a frame): `wanx.distributed.sequence` refuses this model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..attention import attention
from ..configs import AnimateConfig, dit_config
from .transformer import DiTState, WanDiT, _call_block, _wrapped, input_dtype, layer_norm

BLUR_KERNEL = (1, 3, 3, 1)


class EqualConv2d(nn.Module):
    """Conv2d whose weight is scaled by 1/sqrt(fan_in) at run time (equalised learning rate)."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channel)) if bias else None
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.scale = 1 / math.sqrt(in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class FusedLeakyReLU(nn.Module):
    """Bias (official shape `[1, C, 1, 1]`), leaky ReLU 0.2, times sqrt(2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x + self.bias, 0.2) * 2**0.5


class Blur(nn.Module):
    """The normalised [1,3,3,1] outer-product FIR filter, per channel, with (before, after)
    padding on both axes (upfirdn2d at up = down = 1). The kernel is a constant made here, not
    a weight or buffer (official files hold it as `...kernel`; loading drops it)."""

    def __init__(self, pad: tuple[int, int]):
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        k = torch.tensor(BLUR_KERNEL, dtype=torch.float32, device=x.device)
        k = k[None, :] * k[:, None]
        kernel = (k / k.sum()).to(x.dtype)  # symmetric: the official flip changes nothing
        p0, p1 = self.pad
        return F.conv2d(F.pad(x, (p0, p1, p0, p1)), kernel[None, None].expand(x.shape[1], 1, -1, -1),
                        groups=x.shape[1])


def conv_layer(in_channel: int, out_channel: int, kernel_size: int, downsample: bool = False,
               activate: bool = True) -> nn.Sequential:
    """The official `ConvLayer` (an nn.Sequential, so the names are its indices): [Blur] conv
    [bias + leaky ReLU]; a stride-2 conv is blurred first and unpadded."""
    layers: list[nn.Module] = []
    if downsample:
        p = len(BLUR_KERNEL) - 2 + kernel_size - 1
        layers.append(Blur(((p + 1) // 2, p // 2)))
        conv = EqualConv2d(in_channel, out_channel, kernel_size, stride=2, bias=False)
    else:
        conv = EqualConv2d(in_channel, out_channel, kernel_size, padding=kernel_size // 2, bias=False)
    layers.append(conv)
    if activate:
        layers.append(FusedLeakyReLU(out_channel))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, in_channel: int, out_channel: int):
        super().__init__()
        self.conv1 = conv_layer(in_channel, in_channel, 3)
        self.conv2 = conv_layer(in_channel, out_channel, 3, downsample=True)
        self.skip = conv_layer(in_channel, out_channel, 1, downsample=True, activate=False)

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class _Namespace(nn.Module):
    """A module that only holds others, for the official nesting of names."""


class MotionEncoder(nn.Module):
    """Official `Generator` (`motion_encoder.py`, after LIA): face frames -> motion vectors."""

    def __init__(self, cfg: AnimateConfig):
        super().__init__()
        channels = cfg.motion_encoder_channels
        convs = [conv_layer(3, channels[0], 1)]
        convs += [ResBlock(a, b) for a, b in zip(channels, channels[1:])]
        convs.append(EqualConv2d(channels[-1], cfg.motion_style_dim, 4, bias=False))  # 4x4 -> 1x1
        self.size = cfg.motion_encoder_size
        self.enc = _Namespace()
        self.enc.net_app = _Namespace()
        self.enc.net_app.convs = nn.ModuleList(convs)
        # No activation between the linears (as the official `Encoder.fc`).
        fc = [EqualLinear(cfg.motion_style_dim, cfg.motion_style_dim) for _ in range(4)]
        self.enc.fc = nn.Sequential(*fc, EqualLinear(cfg.motion_style_dim, cfg.motion_dim))
        self.dec = _Namespace()
        self.dec.direction = _Namespace()
        self.dec.direction.weight = nn.Parameter(torch.randn(cfg.motion_encoder_dim, cfg.motion_dim))

    def forward(self, faces: Tensor) -> Tensor:
        """`[N, 3, size, size]` face frames -> `[N, motion_encoder_dim]` in the convs' dtype."""
        h = faces.to(self.enc.fc[0].weight.dtype)
        for conv in self.enc.net_app.convs:
            h = conv(h)
        alpha = self.enc.fc(h.squeeze(-1).squeeze(-1))
        # The directions orthonormalised (QR) and mixed in float32 (the official autocast).
        q = torch.linalg.qr(self.dec.direction.weight.float() + 1e-8)[0]  # [motion_encoder_dim, motion_dim]
        return (alpha.float() @ q.T).to(alpha.dtype)


class CausalConv1d(nn.Module):
    """Conv1d over time with the past padded by repeating the first frame (`replicate`)."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(chan_in, chan_out, kernel_size, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (self.pad, 0), mode="replicate"))


class FaceEncoder(nn.Module):
    """Official `FaceEncoder`: `[B, T, motion_encoder_dim]` motion vectors -> `[B, T', heads + 1, D]`
    face tokens, T' = T after two causal stride-2 convs; the last token a learned padding."""

    def __init__(self, cfg: AnimateConfig):
        super().__init__()
        hidden, self.num_heads = cfg.face_encoder_hidden_dim, cfg.face_encoder_num_heads
        self.conv1_local = CausalConv1d(cfg.motion_encoder_dim, hidden * self.num_heads, 3)
        self.conv2 = CausalConv1d(hidden, hidden, 3, stride=2)
        self.conv3 = CausalConv1d(hidden, hidden, 3, stride=2)
        self.out_proj = nn.Linear(hidden, cfg.dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, cfg.dim))

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        x = self.conv1_local(x.transpose(1, 2).to(self.conv1_local.conv.weight.dtype))
        x = rearrange(x, "b (n c) t -> (b n) t c", n=self.num_heads)
        for conv in (self.conv2, self.conv3, None):  # norm, SiLU, then the next conv (or out_proj)
            x = F.silu(F.layer_norm(x, (x.shape[-1],), eps=1e-6))
            if conv is not None:
                x = conv(x.transpose(1, 2)).transpose(1, 2)
        x = rearrange(self.out_proj(x), "(b n) t c -> b t n c", b=b)
        return torch.cat([x, self.padding_tokens.to(x.dtype).expand(b, x.shape[1], 1, -1)], dim=2)


class HeadRMSNorm(nn.Module):
    """RMSNorm over one head's dims, normalised in float32 (the face blocks' `q_norm`/`k_norm`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class FaceBlock(nn.Module):
    """Official `FaceBlock`: each latent frame's tokens attend to that frame's face tokens."""

    def __init__(self, cfg: AnimateConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.linear1_kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.linear1_q = nn.Linear(cfg.dim, cfg.dim)
        self.linear2 = nn.Linear(cfg.dim, cfg.dim)
        self.q_norm, self.k_norm = HeadRMSNorm(cfg.head_dim), HeadRMSNorm(cfg.head_dim)

    def forward(self, x: Tensor, e0: Tensor, context: Tensor, context_img: Tensor | None,
                rope: tuple[Tensor, Tensor], motion_vec: Tensor) -> Tensor:
        """x `[B, L, D]` float32 (L = frames x tokens per frame), motion_vec `[B, frames, N, D]`
        -> the residual `[B, L, D]` float32 to add to x. Called at the block seam, whose wrappers
        (compiled blocks) take a main block's arguments first: e0, context, context_img and
        rope are not read."""
        frames, n = motion_vec.shape[1], self.num_heads
        dtype = input_dtype(self.linear1_q)
        kv = self.linear1_kv(layer_norm(motion_vec, 1e-6).to(dtype))
        k, v = rearrange(kv, "b t m (two h d) -> two (b t) m h d", two=2, h=n)
        q = self.linear1_q(layer_norm(x, 1e-6).to(dtype)).unflatten(-1, (n, -1))
        q = self.q_norm(q).to(v.dtype)
        k = self.k_norm(k).to(v.dtype)
        q = rearrange(q, "b (t s) h d -> (b t) s h d", t=frames)
        out = rearrange(attention(q, k, v).flatten(2), "(b t) s c -> b (t s) c", t=frames)
        return self.linear2(out.to(dtype)).float()


class FaceAdapter(nn.Module):
    def __init__(self, cfg: AnimateConfig):
        super().__init__()
        self.fuser_blocks = nn.ModuleList(FaceBlock(cfg) for _ in cfg.face_layers)


@dataclass
class AnimateState(DiTState):
    """`DiTState` plus the face tokens `motion_vec` `[B, latent frames, heads + 1, D]` (a zero
    row for the reference frame first)."""

    motion_vec: Tensor | None = None

    batch_fields: ClassVar[tuple[str, ...]] = (*DiTState.batch_fields, "motion_vec")


class AnimateWanDiT(WanDiT):
    """Wan2.2-Animate-14B: `WanDiT(config)` builds one for an `AnimateConfig`."""

    stream_blocks = ("blocks", "face_adapter.fuser_blocks")
    # The direction bank is orthonormalised in float32 (diffusers keeps it float32 as well).
    keep_in_fp32 = (*WanDiT.keep_in_fp32, "direction")
    # Face frames through the motion encoder at a time (the official `encode_bs`): bounds memory only.
    motion_encode_batch_size = 8

    def __init__(self, config: AnimateConfig | str = "animate-14B"):
        cfg = dit_config(config) if isinstance(config, str) else config
        if not isinstance(cfg, AnimateConfig):
            raise ValueError(f"AnimateWanDiT needs an AnimateConfig, got a {cfg.model_type} DiTConfig")
        super().__init__(cfg)
        self.pose_patch_embedding = nn.Conv3d(cfg.out_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.motion_encoder = MotionEncoder(cfg)
        self.face_adapter = FaceAdapter(cfg)
        self.face_encoder = FaceEncoder(cfg)
        self._face_block_of = {layer: n for n, layer in enumerate(cfg.face_layers)}

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, clip_features: Tensor | None = None,
                y: Tensor | None = None, *, pose_latents: Tensor | None = None,
                face_pixel_values: Tensor | None = None) -> Tensor:
        """As `WanDiT.forward` for I2V (x `[B, 16, F, H, W]` with the reference latent first, y
        `[B, 20, F, H, W]`, clip_features `[B, 257, image_dim]` of the reference image), with
        pose_latents `[B, 16, F-1, H, W]` (the pose video's latents) and face_pixel_values
        `[B, 3, 4(F-2)+1, size, size]` (the face crops in -1..1, giving F-1 face-token frames
        after the face encoder's two stride-2 convs). The official clip of 77 frames: F = 21
        latent frames (the reference image's, then the clip's 20), 77 face frames."""
        state = self.embed(x, timestep, context, clip_features, y, pose_latents=pose_latents,
                           face_pixel_values=face_pixel_values)
        x = _wrapped(self.loop_wrappers, self.run_blocks)(state)
        return self.run_head(state, x)

    def embed(self, x: Tensor, timestep: Tensor, context: Tensor, clip_features: Tensor | None = None,
              y: Tensor | None = None, *, pose_latents: Tensor | None = None,
              face_pixel_values: Tensor | None = None) -> AnimateState:
        """`WanDiT.embed`, with the pose added to the tokens and the face tokens made."""
        self._check_animate_inputs(x, pose_latents, face_pixel_values)
        base = super().embed(x, timestep, context, clip_features, y)
        _, h, w = base.grid
        pose = self.pose_patch_embedding(pose_latents.to(self.pose_patch_embedding.weight.dtype))
        pose = rearrange(pose, "b d f h w -> b (f h w) d").float()
        tokens = base.x.clone()
        tokens[:, h * w:] += pose  # every frame but the first (the reference image's)
        base.x = tokens

        b, _, t = face_pixel_values.shape[:3]
        faces = rearrange(face_pixel_values, "b c t h w -> (b t) c h w")
        motion = torch.cat([self.motion_encoder(chunk) for chunk in faces.split(self.motion_encode_batch_size)])
        motion_vec = self.face_encoder(motion.unflatten(0, (b, t)))
        motion_vec = F.pad(motion_vec, (0, 0, 0, 0, 1, 0))  # the reference frame's: zeros
        return AnimateState(**vars(base), motion_vec=motion_vec)

    def run_blocks(self, state: AnimateState) -> Tensor:
        """The main blocks; after each face layer its face block's residual is added."""
        call = _wrapped(self.block_wrappers, _call_block)
        x = state.x
        for i, block in enumerate(self.blocks):
            x = call(block, x, state.e0, state.context, state.context_img, state.rope)
            if (n := self._face_block_of.get(i)) is not None:
                x = x + call(self.face_adapter.fuser_blocks[n], x, state.e0, state.context, state.context_img,
                             state.rope, state.motion_vec)
        return x

    def _check_animate_inputs(self, x: Tensor, pose_latents: Tensor | None, face_pixel_values: Tensor | None) -> None:
        cfg = self.config
        if pose_latents is None or face_pixel_values is None:
            raise ValueError("a Wan2.2 Animate model needs pose_latents [B, 16, F-1, H, W] and face_pixel_values "
                             f"[B, 3, T, {cfg.motion_encoder_size}, {cfg.motion_encoder_size}]")
        if x.ndim != 5:
            return  # WanDiT's checks say what is wrong
        want = (x.shape[0], cfg.out_dim, x.shape[2] - 1, *x.shape[3:])
        if tuple(pose_latents.shape) != want:
            raise ValueError(f"pose_latents must be {list(want)} (the latents' frames less the reference one), "
                             f"got {list(pose_latents.shape)}")
        size = cfg.motion_encoder_size
        if (face_pixel_values.ndim != 5 or face_pixel_values.shape[0] != x.shape[0] or face_pixel_values.shape[1] != 3
                or tuple(face_pixel_values.shape[3:]) != (size, size)):
            raise ValueError(f"face_pixel_values must be [{x.shape[0]}, 3, T, {size}, {size}] (face crops), got "
                             f"{list(face_pixel_values.shape)}")
        t, f = face_pixel_values.shape[2], x.shape[2] // cfg.patch_size[0]
        if face_frames(t) != f - 1:
            raise ValueError(f"face_pixel_values' {t} frames give {face_frames(t)} face-token frames, the latents need "
                             f"{f - 1} (one per latent frame after the reference): give 4*{f - 2}+1 = "
                             f"{4 * (f - 2) + 1} face frames")


def face_frames(num_face_frames: int) -> int:
    """Face-token frames from T face frames: two causal stride-2 convs (77 -> 39 -> 20)."""
    for _ in range(2):
        num_face_frames = (num_face_frames - 1) // 2 + 1
    return num_face_frames
