"""Wan2.2 causal 3D VAE (stride 4x16x16, 48 latent channels; TI2V-5B's `Wan2.2_VAE.pth`),
with the official key names.

What changes from the Wan2.1 VAE (`vae.py`, whose layers, causal cache, chunking and
tiling this reuses unchanged):
- 2x2 pixels are folded into channels before the encoder and unfolded after the decoder
  (`patchify`, 12 channels), so the convolutions' 8x spatial stride becomes 16x;
- each stage is a residual block of its own: its res blocks and resampler, plus a
  parameter-free shortcut that resamples by rearranging values (`AvgDown3D`: space and
  time into channels, then a mean over channel groups; `DupUp3D`: channels repeated, then
  back into space and time);
- the decoder has its own base width (`dec_dim`, 256 against the encoder's 160) and its
  upsampling convs keep the channel count.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..configs import VAE22Config
from .vae import AttentionBlock, CausalCache, CausalConv3d, Resample, ResidualBlock, RMS_norm, WanVAE, run_layers

# Official per-channel latent statistics (`Wan2_2_VAE.__init__`): latents are (mu - mean) / std.
LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


def patchify(x: Tensor, p: int) -> Tensor:
    """`[B, C, T, H, W]` -> `[B, C*p*p, T, H/p, W/p]`, channel c*p*p + r*p + q for the pixel at
    row offset q, column offset r: the official order, the column offset before the row's
    (the reverse order decodes to a fixed 2-pixel checkerboard)."""
    return rearrange(x, "b c t (h q) (w r) -> b (c r q) t h w", q=p, r=p)


def unpatchify(x: Tensor, p: int) -> Tensor:
    """The inverse of `patchify`."""
    return rearrange(x, "b (c r q) t h w -> b c t (h q) (w r)", q=p, r=p)


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of a downsampling stage: each `factor_t x factor_s x factor_s`
    cell goes into channels, then groups of consecutive channels are averaged down to
    `out_channels`. A chunk whose frame count is not a multiple of `factor_t` (the clip's first
    frame, which is encoded alone) is padded with zero frames in front."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int):
        super().__init__()
        cells = in_channels * factor_t * factor_s * factor_s
        if cells % out_channels:
            raise ValueError(f"AvgDown3D: {in_channels} channels x {factor_t}x{factor_s}x{factor_s} cells do not "
                             f"split into {out_channels} equal groups")
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        self.group = cells // out_channels

    def forward(self, x: Tensor) -> Tensor:
        pad_t = -x.shape[2] % self.factor_t
        if pad_t:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        x = rearrange(x, "b c (t ft) (h fh) (w fw) -> b (c ft fh fw) t h w",
                      ft=self.factor_t, fh=self.factor_s, fw=self.factor_s)
        return x.unflatten(1, (self.out_channels, self.group)).mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut of an upsampling stage: each channel is repeated, and the copies
    fill a `factor_t x factor_s x factor_s` cell of `out_channels` channels. On the clip's first
    chunk the first `factor_t - 1` frames are dropped, as the upsampler passes frame 0 alone."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int):
        super().__init__()
        cells = out_channels * factor_t * factor_s * factor_s
        if cells % in_channels:
            raise ValueError(f"DupUp3D: {out_channels} channels x {factor_t}x{factor_s}x{factor_s} cells are not "
                             f"a whole number of copies of {in_channels} channels")
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        self.repeats = cells // in_channels

    def forward(self, x: Tensor, first_chunk: bool = False) -> Tensor:
        b, c, t, h, w = x.shape
        ft, fs = self.factor_t, self.factor_s
        # repeat_interleave along channels as a broadcast view; the rearrange below makes the one copy.
        x = x.unsqueeze(2).expand(b, c, self.repeats, t, h, w).reshape(b, self.out_channels, ft, fs, fs, t, h, w)
        x = rearrange(x, "b c ft fh fw t h w -> b c (t ft) (h fh) (w fw)")
        return x[:, :, ft - 1:] if first_chunk else x


class DownResidualBlock(nn.Module):
    """An encoder stage (official `Down_ResidualBlock`): res blocks and an optional
    downsampler, plus the `AvgDown3D` shortcut around them."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2 if down else 1)
        layers: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        out = run_layers(self.downsamples, x, cache)  # a fresh tensor: safe to add into
        return out.add_(self.avg_shortcut(x))


class UpResidualBlock(nn.Module):
    """A decoder stage (official `Up_ResidualBlock`): res blocks and an optional upsampler,
    plus the `DupUp3D` shortcut around them when the stage upsamples."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = (DupUp3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2) if up else None)
        layers: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        if up:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        first_chunk = cache.get(self) is None
        if first_chunk:
            cache.set(self, x[:, :, :0])  # marks the clip as started; nothing else is carried
        out = run_layers(self.upsamples, x, cache)
        if self.avg_shortcut is None:
            return out
        return out.add_(self.avg_shortcut(x, first_chunk))


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMS_norm(dim, images=False), nn.SiLU(inplace=True), CausalConv3d(dim, out_dim, 3, padding=1))


class Encoder3d(nn.Module):
    """Patchified video `[B, 3p^2, T, H, W]` -> mu and log-variance `[B, 2z, T', H/8, W/8]`."""

    def __init__(self, cfg: VAE22Config):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * cfg.patch_size**2, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*(
            DownResidualBlock(in_dim, out_dim, cfg.num_res_blocks, temporal=i < last and cfg.temperal_downsample[i],
                              down=i < last)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))
        ))
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], cfg.z_dim * 2)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x, cache)
        for stage in self.downsamples:
            x = stage(x, cache)
        x = run_layers(self.middle, x, cache)
        return run_layers(self.head, x, cache)


class Decoder3d(nn.Module):
    """Latents `[B, z, T', h, w]` -> patchified video `[B, 3p^2, T, 8h, 8w]`."""

    def __init__(self, cfg: VAE22Config):
        super().__init__()
        dims = [cfg.dec_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temperal_downsample))
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        self.upsamples = nn.Sequential(*(
            UpResidualBlock(in_dim, out_dim, cfg.num_res_blocks + 1, temporal=i < last and temporal_upsample[i],
                            up=i < last)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))
        ))
        self.head = _head(dims[-1], 3 * cfg.patch_size**2)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x, cache)
        x = run_layers(self.middle, x, cache)
        for stage in self.upsamples:
            x = stage(x, cache)
        return run_layers(self.head, x, cache)


class WanVAE22(WanVAE):
    """Wan2.2 causal video VAE. `encode`: video `[B, 3, 4k+1, H, W]` in [-1, 1] -> normalised
    latents `[B, 48, k+1, H/16, W/16]`; `decode`: the reverse, clamped to [-1, 1]. Chunking,
    tiling and their options are the Wan2.1 VAE's (`WanVAE`)."""

    config_type = VAE22Config
    encoder_type = Encoder3d
    decoder_type = Decoder3d
    latent_mean = LATENT_MEAN
    latent_std = LATENT_STD

    def __init__(self, config: VAE22Config | str = "wan2.2"):
        super().__init__(config)

    def patchify(self, video: Tensor) -> Tensor:
        return patchify(video, self.config.patch_size)

    def unpatchify(self, x: Tensor) -> Tensor:
        return unpatchify(x, self.config.patch_size)
