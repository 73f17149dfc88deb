"""Wan2.2-S2V DiT (official `WanModel_S2V`, `wan/modules/s2v/`), official parameter names.

The Wan2.1 T2V DiT, its token sequence extended and its blocks told apart two kinds of token:
- the video tokens (noise latents, with the pose latents' `cond_encoder` embedding added), then
  the reference image's latent frame and the FramePack motion memory (`frame_packer`: the last
  19 latent frames of what came before, the newest one at 1x, the 2 before it at 2x and the
  16 before those at 4x compression); `trainable_cond_mask` adds a learned row per kind (0, 1, 2);
- the blocks modulate the video tokens with the timestep's projection and the others with
  timestep 0's (`zero_timestep`); only the video tokens reach the head;
- RoPE positions are per token: the video from 0, the reference at frame 30, the motion
  memory at negative frames (-1; -3; -19, -14, -9, -4), the compressed buckets' heights and
  widths spread over the full grid's range (`rope_precompute`'s truncated linspace);
- after the blocks of `audio_inject_layers`, each latent frame's video tokens are AdaIN-modulated
  by the frame's global audio token and attend to its audio tokens (`audio_injector`); the audio
  tokens come from `casual_audio_encoder` (official spelling): a softmax-free learned mix of the
  wav2vec2 hidden layers, then causal convs (two stride-2: 4 audio frames per latent frame).

The S2V blocks take `(e0, seg)` for e0: the time projections `[B, 2, 6, D]` (the timestep's and
timestep 0's) and the number of video tokens, the first `seg` of the sequence. The audio
cross-attentions are a block list of their own (`stream_blocks`), called through the block
wrappers (streamed, compiled, checkpointed) with a main block's arguments first; the AdaIN
linears run outside them. Sequence parallelism is not wired (the injection needs all of a
frame's tokens): `wanx.distributed.sequence` refuses this model.

Only the released configuration is built (FramePack motion with drop mode "padd", AdaIN in
"attn_norm" mode, zero timestep for the extra tokens, `add_last_motion` 2 as
`wan/speech2video.py` calls it): see `S2VConfig`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..configs import S2VConfig, dit_config
from .animate import CausalConv1d
from .transformer import (CrossAttention, DiTState, WanAttentionBlock, WanDiT, _call_block, _wrapped, input_dtype,
                          layer_norm, rope_axes)

# FramePack's buckets, oldest first in the padded memory: 16 frames at 4x, 2 at 2x, the last at 1x.
ZIP_FRAME_BUCKETS = (1, 2, 16)  # newest first, as the official `zip_frame_buckets`
REF_FRAME_POSITION = 30  # the reference latent's RoPE frame (official constant)


class S2VAttentionBlock(WanAttentionBlock):
    """`WanS2VAttentionBlock`: the Wan block with two modulations, one for the first `seg`
    tokens (the video's) and one for the rest (reference and motion: timestep 0)."""

    def forward(self, x: Tensor, e0: tuple[Tensor, int], context: Tensor, context_img: Tensor | None,
                rope: tuple[Tensor, Tensor]) -> Tensor:
        """x `[B, L, D]` float32, e0 (`[B, 2, 6, D]` float32, seg)."""
        e0, seg = e0
        mod = self.modulation.float().unsqueeze(1) + e0  # [B, 2, 6, D]
        shift, scale, gate, ffn_shift, ffn_scale, ffn_gate = mod.unbind(2)  # each [B, 2, D]
        dtype = input_dtype(self.self_attn.q)

        h = _modulate(layer_norm(x, self.eps), shift, scale, seg)
        x = _gated_add(x, self.self_attn(h.to(dtype), rope).float(), gate, seg)
        x = x + self.cross_attn(self.norm3(x).to(dtype), context, context_img).float()
        h = _modulate(layer_norm(x, self.eps), ffn_shift, ffn_scale, seg)
        return _gated_add(x, self.ffn(h.to(dtype)).float(), ffn_gate, seg)


def _modulate(h: Tensor, shift: Tensor, scale: Tensor, seg: int) -> Tensor:
    """h * (1 + scale) + shift, row 0 of shift/scale `[B, 2, D]` for the first seg tokens, row 1 after."""
    return torch.cat([torch.addcmul(shift[:, :1], h[:, :seg], 1 + scale[:, :1]),
                      torch.addcmul(shift[:, 1:], h[:, seg:], 1 + scale[:, 1:])], dim=1)


def _gated_add(x: Tensor, y: Tensor, gate: Tensor, seg: int) -> Tensor:
    return torch.cat([torch.addcmul(x[:, :seg], y[:, :seg], gate[:, :1]),
                      torch.addcmul(x[:, seg:], y[:, seg:], gate[:, 1:])], dim=1)


class MotionEncoderTC(nn.Module):
    """Official `MotionEncoder_tc`: `[B, T, C]` -> local tokens `[B, T', num_token + 1, D]` (the
    last a learned padding token) and a global token `[B, T', 1, D]`; T' after two causal
    stride-2 convs. Both paths share conv2, conv3 and the norms."""

    def __init__(self, in_dim: int, hidden_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.conv1_local = CausalConv1d(in_dim, hidden_dim // 4 * num_heads, 3)
        self.conv1_global = CausalConv1d(in_dim, hidden_dim // 4, 3)
        self.conv2 = CausalConv1d(hidden_dim // 4, hidden_dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(hidden_dim // 2, hidden_dim, 3, stride=2)
        self.final_linear = nn.Linear(hidden_dim, hidden_dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden_dim))

    def _convs(self, x: Tensor) -> Tensor:
        """`[N, C, T]` after conv1 -> `[N, T', D]`: (LayerNorm, SiLU, conv) twice, LayerNorm, SiLU."""
        for conv in (self.conv2, self.conv3, None):
            x = F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6))
            if conv is not None:
                x = conv(x.transpose(1, 2))
        return x

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b = x.shape[0]
        x = x.transpose(1, 2)  # [B, C, T]
        local = rearrange(self.conv1_local(x), "b (n c) t -> (b n) c t", n=self.num_heads)
        local = rearrange(self._convs(local), "(b n) t c -> b t n c", b=b)
        local = torch.cat([local, self.padding_tokens.to(local.dtype).expand(b, local.shape[1], 1, -1)], dim=2)
        glob = self.final_linear(self._convs(self.conv1_global(x)))
        return glob.unsqueeze(2), local


class CausalAudioEncoder(nn.Module):
    """Official `CausalAudioEncoder`: wav2vec2 hidden states `[B, layers, C, T]` -> a learned
    mix over the layers (SiLU weights, normalised by their sum) -> `MotionEncoderTC`; in float32
    (the official code runs it under float32 autocast; its weights are kept float32)."""

    def __init__(self, cfg: S2VConfig):
        super().__init__()
        self.encoder = MotionEncoderTC(cfg.audio_dim, cfg.dim, cfg.num_audio_token)
        self.weights = nn.Parameter(torch.full((1, cfg.audio_encoder_layers, 1, 1), 0.01))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        weights = F.silu(self.weights.float())
        mixed = ((features.float() * weights) / weights.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, C, T]
        return self.encoder(mixed.transpose(1, 2).to(self.encoder.final_linear.weight.dtype))


class AdaLayerNorm(nn.Module):
    """diffusers' `AdaLayerNorm(chunk_dim=1)` as the official injector uses it: non-affine
    LayerNorm (eps 1e-5), then shift and scale (in that order) from SiLU -> linear of a vector."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x `[N, n, D]` float32, temb `[N, D]` -> `[N, n, D]` float32."""
        shift, scale = self.linear(F.silu(temb).to(input_dtype(self.linear))).float().unsqueeze(1).chunk(2, dim=-1)
        return layer_norm(x, 1e-5) * (1 + scale) + shift


class AudioCrossAttention(CrossAttention):
    """An audio injector: each latent frame's (AdaIN-modulated) tokens attend to its audio
    tokens. Called at the block seam, whose wrappers take a main block's arguments first:
    e0, context, context_img and rope are not read."""

    def __init__(self, cfg: S2VConfig):
        super().__init__(cfg.dim, cfg.num_heads, cfg.eps, image_input=False)

    def forward(self, x: Tensor, e0, context: Tensor, context_img: Tensor | None, rope: tuple[Tensor, Tensor],
                audio: Tensor) -> Tensor:
        """x `[B*F, tokens per frame, D]` float32, audio `[B*F, num_token + 1, D]` -> `[B*F, n, D]` float32."""
        dtype = input_dtype(self.q)
        return super().forward(x.to(dtype), audio.to(dtype)).float()


class AudioInjector(nn.Module):
    """Official `AudioInjector_WAN`'s weights: one cross-attention and one AdaIN per injection
    (its non-affine pre-norms hold no weights, and "attn_norm" mode does not use them)."""

    def __init__(self, cfg: S2VConfig):
        super().__init__()
        n = len(cfg.audio_inject_layers)
        self.injector = nn.ModuleList(AudioCrossAttention(cfg) for _ in range(n))
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(cfg.dim) for _ in range(n))


class FramePackMotioner(nn.Module):
    """Official `FramePackMotioner`: the last 19 motion latent frames (zero-padded in front when
    fewer) split 16/2/1, each bucket patch-embedded at its compression."""

    def __init__(self, cfg: S2VConfig):
        super().__init__()
        c, d = cfg.out_dim, cfg.dim
        self.proj = nn.Conv3d(c, d, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(c, d, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(c, d, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion_latents: Tensor) -> Tensor:
        """`[B, C, T, H, W]` -> `[B, L_motion, D]` tokens: the 1x bucket's, the 2x's, the 4x's."""
        total = sum(ZIP_FRAME_BUCKETS)
        frames = motion_latents[:, :, -total:]
        frames = F.pad(frames, (0, 0, 0, 0, total - frames.shape[2], 0))  # zeros before the oldest
        dtype = self.proj.weight.dtype
        oldest, middle, newest = frames.to(dtype).split(ZIP_FRAME_BUCKETS[::-1], dim=2)
        tokens = [proj(part).flatten(2).transpose(1, 2)
                  for proj, part in ((self.proj, newest), (self.proj_2x, middle), (self.proj_4x, oldest))]
        return torch.cat(tokens, dim=1)


def _axis_positions(start: int, span: int, count: int) -> list[int]:
    """`rope_precompute`'s positions along one axis: `count` of a range of `span` positions from
    `start`, by truncated float64 linspace (numpy's, as the official code); a negative start
    counts down from -start with the positions negated (its complex conjugates)."""
    if start >= 0:
        return np.linspace(start, start + span - 1, count).astype(int).tolist()
    return [-p for p in np.linspace(-start, -start - span + 1, count).astype(int).tolist()]


def s2v_positions(grid: tuple[int, int, int], motion: bool) -> list[tuple[list[int], list[int], list[int]]]:
    """(frame, height, width) positions of each token block in sequence order: the video's
    grid (f, h, w) of patch tokens, the reference frame's, and with `motion` the three FramePack
    buckets' (their heights and widths spread over the video grid's)."""
    f, h, w = grid
    blocks = [(_axis_positions(0, f, f), _axis_positions(0, h, h), _axis_positions(0, w, w)),
              ([REF_FRAME_POSITION], _axis_positions(0, h, h), _axis_positions(0, w, w))]
    if motion:
        start = 0
        for bucket, scale in zip(ZIP_FRAME_BUCKETS, (1, 2, 4)):
            start -= bucket
            blocks.append((_axis_positions(start, bucket, bucket // scale), _axis_positions(0, h, h // scale),
                           _axis_positions(0, w, w // scale)))
    return blocks


@functools.lru_cache(maxsize=16)
def s2v_rope(head_dim: int, grid: tuple[int, int, int], motion: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin `[L, head_dim/2]` (float32 from float64 angles) for the S2V token sequence."""
    inv = [1.0 / torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
           for d in rope_axes(head_dim)]
    tables = []
    for fs, hs, ws in s2v_positions(grid, motion):
        pos = [torch.tensor(p, dtype=torch.float64, device=device) for p in (fs, hs, ws)]
        af, ah, aw = (torch.outer(p, i) for p, i in zip(pos, inv))
        nf, nh, nw = len(fs), len(hs), len(ws)
        tables.append(torch.cat([af[:, None, None].expand(nf, nh, nw, -1), ah[None, :, None].expand(nf, nh, nw, -1),
                                 aw[None, None, :].expand(nf, nh, nw, -1)], dim=-1).reshape(nf * nh * nw, -1))
    angles = torch.cat(tables)
    return torch.cos(angles).float(), torch.sin(angles).float()


@dataclass
class S2VState(DiTState):
    """`DiTState` with e0 `[B, 2, 6, D]` (the timestep's projection and timestep 0's), `seg` the
    number of video tokens (the first of x), the audio tokens `audio` `[B, F, num_token + 1, D]`
    and global tokens `audio_global` `[B, F, D]`, one row per latent frame."""

    seg: int = 0
    audio: Tensor | None = None
    audio_global: Tensor | None = None

    batch_fields: ClassVar[tuple[str, ...]] = (*DiTState.batch_fields, "audio", "audio_global")


class S2VWanDiT(WanDiT):
    """Wan2.2-S2V-14B: `WanDiT(config)` builds one for an `S2VConfig`."""

    stream_blocks = ("blocks", "audio_injector.injector")
    block_class = S2VAttentionBlock
    # The audio encoder runs in float32 in the official code (float32 autocast).
    keep_in_fp32 = (*WanDiT.keep_in_fp32, "casual_audio_encoder")

    def __init__(self, config: S2VConfig | str = "s2v-14B"):
        cfg = dit_config(config) if isinstance(config, str) else config
        if not isinstance(cfg, S2VConfig):
            raise ValueError(f"S2VWanDiT needs an S2VConfig, got a {cfg.model_type} DiTConfig")
        super().__init__(cfg)
        self.cond_encoder = nn.Conv3d(cfg.cond_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.casual_audio_encoder = CausalAudioEncoder(cfg)
        self.audio_injector = AudioInjector(cfg)
        self.trainable_cond_mask = nn.Embedding(3, cfg.dim)
        self.frame_packer = FramePackMotioner(cfg)
        self._injector_of = {layer: n for n, layer in enumerate(cfg.audio_inject_layers)}

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, clip_features: Tensor | None = None,
                y: Tensor | None = None, *, ref_latents: Tensor | None = None, motion_latents: Tensor | None = None,
                cond_states: Tensor | None = None, audio_input: Tensor | None = None,
                motion_frames: Sequence[int] | None = None, drop_motion_frames: bool = False) -> Tensor:
        """Velocity `[B, 16, F, H, W]` float32 for latents x `[B, 16, F, H, W]` (H, W multiples of
        8), timestep `[B]` or `[1]` on the 0..1000 scale, context `[B, L<=text_len, text_dim]`, with
        - ref_latents `[B, 16, 1, H, W]`: the reference image's latent;
        - motion_latents `[B, 16, T, H, W]`: the motion memory's latents (the official loop: 19
          frames, the VAE latents of the last 73 frames, zeros before the first clip); its last
          19 frames are used, zero-padded in front when fewer;
        - cond_states `[B, cond_dim, F, H, W]`: the pose video's latents (zeros without one, as
          the official loop passes);
        - audio_input `[B, audio_encoder_layers, audio_dim, 4F]`: the clip's wav2vec2 hidden states
          (every layer, at 4 audio frames per latent frame: 80 video frames' worth for F = 20);
        - motion_frames (pixel, latent) frames of motion memory, (73, 19) by default from the
          config: the audio's first frame is repeated that many times in front, and that many
          latent frames of audio tokens dropped after the encoder;
        - drop_motion_frames: no motion tokens at all (the official first clip)."""
        state = self.embed(x, timestep, context, clip_features, y, ref_latents=ref_latents,
                           motion_latents=motion_latents, cond_states=cond_states, audio_input=audio_input,
                           motion_frames=motion_frames, drop_motion_frames=drop_motion_frames)
        x = _wrapped(self.loop_wrappers, self.run_blocks)(state)
        return self.run_head(state, x)

    def embed(self, x: Tensor, timestep: Tensor, context: Tensor, clip_features: Tensor | None = None,
              y: Tensor | None = None, *, ref_latents: Tensor | None = None, motion_latents: Tensor | None = None,
              cond_states: Tensor | None = None, audio_input: Tensor | None = None,
              motion_frames: Sequence[int] | None = None, drop_motion_frames: bool = False) -> S2VState:
        cfg = self.config
        self._check_inputs(x, context, clip_features, y)
        pixel_motion, latent_motion = motion_frames or (cfg.motion_frames, cfg.lat_motion_frames)
        self._check_s2v_inputs(x, ref_latents, motion_latents, cond_states, audio_input, pixel_motion, latent_motion)
        timestep = self._check_timestep(timestep, x)
        if timestep.ndim != 1:
            raise ValueError("an S2V model takes one timestep per sample ([B] or [1]), not one per token")

        # Audio: the first frame repeated for the motion memory's frames, encoded, those dropped.
        audio = torch.cat([audio_input[..., :1].expand(-1, -1, -1, pixel_motion), audio_input], dim=-1)
        audio_global, audio_tokens = self.casual_audio_encoder(audio)
        audio_global, audio_tokens = audio_global[:, latent_motion:, 0], audio_tokens[:, latent_motion:]

        # Tokens in the weights' dtype, as the official sums them under autocast; float32 after.
        dtype = self.patch_embedding.weight.dtype
        video = self.patch_embedding(x.to(dtype)) + self.cond_encoder(cond_states.to(dtype))
        grid = tuple(video.shape[2:])
        kinds = [rearrange(video, "b d f h w -> b (f h w) d"),
                 rearrange(self.patch_embedding(ref_latents.to(dtype)), "b d f h w -> b (f h w) d")]
        if not drop_motion_frames:
            kinds.append(self.frame_packer(motion_latents))
        mask = self.trainable_cond_mask.weight.to(dtype)
        tokens = torch.cat([part + mask[i] for i, part in enumerate(kinds)], dim=1).float()
        rope = s2v_rope(cfg.head_dim, grid, not drop_motion_frames, tokens.device)

        # The timestep's time embedding and projection, and timestep 0's for the other tokens.
        e, e0 = self.embed_time(torch.cat([timestep, timestep.new_zeros(1)]))
        e0 = torch.stack([e0[:-1], e0[-1:].expand(e0.shape[0] - 1, -1, -1)], dim=1)  # [B, 2, 6, D]
        context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        context = self.text_embedding(context.to(dtype))
        return S2VState(tokens, e[:-1], e0, context, None, rope, grid, seg=kinds[0].shape[1], audio=audio_tokens,
                        audio_global=audio_global)

    def run_blocks(self, state: S2VState) -> Tensor:
        """The S2V blocks; after each of `audio_inject_layers` its audio injection."""
        call = _wrapped(self.block_wrappers, _call_block)
        x, e0 = state.x, (state.e0, state.seg)
        for i, block in enumerate(self.blocks):
            x = call(block, x, e0, state.context, state.context_img, state.rope)
            if (n := self._injector_of.get(i)) is not None:
                x = self._inject_audio(call, n, x, e0, state)
        return x

    def _inject_audio(self, call, n: int, x: Tensor, e0, state: S2VState) -> Tensor:
        """Each latent frame's video tokens AdaIN-modulated by its global audio token, then
        attending to its audio tokens; the result added to them."""
        frames, seg = state.audio.shape[1], state.seg
        b = x.shape[0]
        h = rearrange(x[:, :seg], "b (t n) c -> (b t) n c", t=frames)
        audio_global = state.audio_global.expand(b, -1, -1).flatten(0, 1)
        h = self.audio_injector.injector_adain_layers[n](h, audio_global)
        audio = state.audio.expand(b, -1, -1, -1).flatten(0, 1)
        out = call(self.audio_injector.injector[n], h, e0, state.context, state.context_img, state.rope, audio)
        out = rearrange(out, "(b t) n c -> b (t n) c", t=frames)
        return torch.cat([x[:, :seg] + out, x[:, seg:]], dim=1)

    def run_head(self, state: S2VState, x: Tensor) -> Tensor:
        """Only the video tokens (the first `seg`) to the head."""
        return super().run_head(state, x[:, :state.seg])

    def _check_s2v_inputs(self, x: Tensor, ref_latents, motion_latents, cond_states, audio_input, pixel_motion: int,
                          latent_motion: int) -> None:
        cfg = self.config
        missing = [name for name, v in (("ref_latents", ref_latents), ("motion_latents", motion_latents),
                                        ("cond_states", cond_states), ("audio_input", audio_input)) if v is None]
        if missing:
            raise ValueError(f"a Wan2.2 S2V model needs {', '.join(missing)} (ref_latents [B, {cfg.out_dim}, 1, H, W], "
                             f"motion_latents [B, {cfg.out_dim}, T, H, W], cond_states [B, {cfg.cond_dim}, F, H, W] "
                             f"(zeros without a pose video), audio_input [B, {cfg.audio_encoder_layers}, "
                             f"{cfg.audio_dim}, 4F])")
        b, _, f, h, w = x.shape
        if h % 8 or w % 8:
            raise ValueError(f"an S2V model's latents must be multiples of 8 high and wide (its 4x motion bucket), "
                             f"got {h}x{w}")
        for name, tensor, want in (("ref_latents", ref_latents, (b, cfg.out_dim, 1, h, w)),
                                   ("cond_states", cond_states, (b, cfg.cond_dim, f, h, w))):
            if tuple(tensor.shape) != want:
                raise ValueError(f"{name} must be {list(want)}, got {list(tensor.shape)}")
        if motion_latents.ndim != 5 or tuple(motion_latents.shape[:2]) != (b, cfg.out_dim) or \
                tuple(motion_latents.shape[3:]) != (h, w):
            raise ValueError(f"motion_latents must be [{b}, {cfg.out_dim}, T, {h}, {w}], got {list(motion_latents.shape)}")
        if audio_input.ndim != 4 or tuple(audio_input.shape[:3]) != (b, cfg.audio_encoder_layers, cfg.audio_dim):
            raise ValueError(f"audio_input must be [{b}, {cfg.audio_encoder_layers}, {cfg.audio_dim}, T] (wav2vec2 "
                             f"hidden states, every layer), got {list(audio_input.shape)}")
        frames = audio_tokens(audio_input.shape[-1], pixel_motion, latent_motion)
        if frames != f // cfg.patch_size[0]:
            raise ValueError(f"audio_input's {audio_input.shape[-1]} frames give {frames} latent frames of audio "
                             f"tokens, the latents have {f}: give {4 * f} audio frames (4 per latent frame)")


def audio_tokens(audio_frames: int, pixel_motion: int, latent_motion: int) -> int:
    """Latent frames of audio tokens from T audio frames: the motion memory's frames put in front,
    two causal stride-2 convs, the motion memory's latent frames dropped (80 -> 153 -> 77 -> 39 -> 20)."""
    n = audio_frames + pixel_motion
    for _ in range(2):
        n = (n - 1) // 2 + 1
    return n - latent_motion
