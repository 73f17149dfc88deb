"""Wan2.1 causal 3D VAE (stride 4x8x8, 16 latent channels), with the official key names.

Video is processed in causal chunks along time. Every temporal convolution keeps the
tail frames it needs from the previous chunk in a `CausalCache`, so a video of any
length is encoded and decoded with memory set by the chunk (and the spatial tile), not
by the number of frames. Chunking does not change the math: any chunking (with encode
chunks a multiple of 4 frames) gives the same result as one pass over the whole clip.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..configs import VAEConfig, vae_config

# Official per-channel latent statistics: latents are (mu - mean) / std.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


class CausalCache:
    """Tail frames each causal layer carries from one chunk to the next.

    Keyed by the layer itself. A layer with no entry is seeing the first chunk of the clip.
    """

    def __init__(self) -> None:
        self._tails: dict[nn.Module, Tensor] = {}

    def get(self, layer: nn.Module) -> Tensor | None:
        return self._tails.get(layer)

    def set(self, layer: nn.Module, frames: Tensor) -> None:
        # clone: a view would keep the whole chunk's activation alive.
        self._tails[layer] = frames.detach().clone()

    def reset(self) -> None:
        self._tails.clear()


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time: the previous chunk's last frames (zeros at the
    start of the clip) stand in front of each chunk."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        self.context_frames = 2 * pt
        # The convolution pads space itself (no padded copy of the activation); time is
        # padded by the cached frames instead.
        self.padding = (0, ph, pw)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        if self.context_frames:
            past = cache.get(self) if cache is not None else None
            if past is None:
                past = x.new_zeros(*x.shape[:2], self.context_frames, *x.shape[3:])
            x = torch.cat([past, x], dim=2)
            if cache is not None:
                cache.set(self, x[:, :, -self.context_frames:])
        if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            # PyTorch picks its conv backend on CPU by N*C*T*H > 20480, a rule made for 2D: one
            # clip through a small VAE (16 channels, a 4-frame chunk, 96 rows) falls under it and
            # gets the naive conv3d, 5-7x slower than oneDNN's. Same result to float rounding.
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        return super().forward(x)


class RMS_norm(nn.Module):  # noqa: N801 (official name)
    """L2-normalise over channels, times sqrt(C) and a learned gain."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1).mul_(self.gamma * self.scale)  # in place on the fresh tensor


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Indices match the official Sequential (SiLU at 1/4, dropout at 5).
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x), inplace=True), cache)
        h = conv2(F.silu(norm2(h), inplace=True), cache)
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention within each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        frames = rearrange(x, "b c t h w -> (b t) c h w")
        qkv = rearrange(self.to_qkv(self.norm(frames)), "n c h w -> n 1 (h w) c")
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [(b t), 1, hw, c]
        out = self.proj(rearrange(out, "n 1 (h w) c -> n c h w", h=h))
        return x + rearrange(out, "(b t) c h w -> b c t h w", b=b)


class Resample(nn.Module):
    """Spatial 2x up/down sampling, optionally with a causal 2x temporal stage.

    The first frame of a clip is never resampled in time: it maps to one frame both ways,
    which is why T = 4k+1 frames <-> k+1 latent frames.
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            # Wan2.1's upsampling conv halves the channels; Wan2.2's keeps them (out_dim=dim).
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, out_dim or dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        t = x.shape[2]
        x = rearrange(self.resample(rearrange(x, "b c t h w -> (b t) c h w")), "(b t) c h w -> b c t h w", t=t)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _double_frames(self, x: Tensor, cache: CausalCache) -> Tensor:
        """Frame 0 passes; later frames each become two (a causal conv producing 2C channels)."""
        first = None
        if cache.get(self) is None:  # start of the clip
            first, x = x[:, :, :1], x[:, :, 1:]
            cache.set(self, first[:, :, :0])  # marks the clip as started; the conv's own tail starts as zeros
        if x.shape[2]:
            y = self.time_conv(x, cache)  # [B, 2C, T, H, W]
            x = rearrange(y, "b (two c) t h w -> b c (t two) h w", two=2)
        return x if first is None else torch.cat([first, x], dim=2)

    def _halve_frames(self, x: Tensor, cache: CausalCache) -> Tensor:
        """Frame 0 passes; later frames are reduced by a stride-2 conv over (previous, x)."""
        past, first = cache.get(self), None
        if past is None:
            first, past, x = x[:, :, :1], x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            cache.set(self, x[:, :, -1:])
            x = self.time_conv(torch.cat([past, x], dim=2))
        else:
            cache.set(self, past)
        return x if first is None else torch.cat([first, x], dim=2)


def run_layers(layers: nn.Sequential, x: Tensor, cache: CausalCache) -> Tensor:
    """Run `layers` in order, passing the clip's cache to those that keep causal state."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, AttentionBlock, Resample)) else layer(x)
    return x


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = nn.Sequential(RMS_norm(top, images=False), nn.SiLU(inplace=True), CausalConv3d(top, cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x, cache)
        x = run_layers(self.downsamples, x, cache)
        x = run_layers(self.middle, x, cache)
        return run_layers(self.head, x, cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temperal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0]))
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's resample conv halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(inplace=True), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x, cache)
        x = run_layers(self.middle, x, cache)
        x = run_layers(self.upsamples, x, cache)
        return run_layers(self.head, x, cache)


def _tiles(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering [0, size) with windows of `tile`, the last one flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _tile_grid(size, tile, stride) -> tuple[list[int], list[int]]:
    """Tile start rows and columns for a `size` (h, w) input; one tile when tiling is off.
    The default stride is 3/4 of the tile."""
    if tile is None:
        return [0], [0]
    stride = stride or (tile[0] * 3 // 4, tile[1] * 3 // 4)
    if stride[0] > tile[0] or stride[1] > tile[1] or min(stride) < 1:
        raise ValueError(f"tile_stride {stride} must be between 1 and tile_size {tile} (tiles must overlap or touch)")
    return _tiles(size[0], tile[0], stride[0]), _tiles(size[1], tile[1], stride[1])


def _ramp(length: int, overlap_before: int, overlap_after: int, device, dtype) -> Tensor:
    """Blend weights along one axis: linear ramps over the overlaps, 1 elsewhere."""
    w = torch.ones(length, device=device, dtype=dtype)
    if overlap_before:
        w[:overlap_before] = torch.arange(1, overlap_before + 1, device=device, dtype=dtype) / (overlap_before + 1)
    if overlap_after:
        w[length - overlap_after:] = torch.minimum(
            w[length - overlap_after:],
            torch.arange(overlap_after, 0, -1, device=device, dtype=dtype) / (overlap_after + 1),
        )
    return w


class WanVAE(nn.Module):
    """Wan2.1 causal video VAE. `encode`: video `[B, 3, 4k+1, H, W]` in [-1, 1] -> normalised
    latents `[B, 16, k+1, H/8, W/8]`; `decode`: the reverse, clamped to [-1, 1].

    The chunked, tiled encode and decode here serve the Wan2.2 VAE too (`WanVAE22`), which
    swaps in its own encoder, decoder, latent statistics and pixel patchify.
    """

    config_type: type[VAEConfig] = VAEConfig
    encoder_type: type[nn.Module] = Encoder3d
    decoder_type: type[nn.Module] = Decoder3d
    latent_mean: tuple[float, ...] = LATENT_MEAN
    latent_std: tuple[float, ...] = LATENT_STD

    def __init__(self, config: VAEConfig | str = "wan2.1"):
        super().__init__()
        cfg = self.config = vae_config(config) if isinstance(config, str) else config
        if type(cfg) is not self.config_type:
            raise ValueError(f"{type(self).__name__} is built from a {self.config_type.__name__}, got a "
                             f"{type(cfg).__name__} (the Wan2.1 VAE is WanVAE, the Wan2.2 VAE WanVAE22)")
        self.encoder = self.encoder_type(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = self.decoder_type(cfg)

    # -- pixels <-> what the encoder takes and the decoder gives (Wan2.2 folds 2x2 pixels) --
    def patchify(self, video: Tensor) -> Tensor:
        return video

    def unpatchify(self, x: Tensor) -> Tensor:
        return x

    # -- latent statistics, built on the input's device --------------------------------
    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        # The released statistics; a VAE of another latent width (one trained here) gets none.
        z = self.config.z_dim
        released = len(self.latent_mean) == z
        mean = self.latent_mean if released else (0.0,) * z
        std = self.latent_std if released else (1.0,) * z
        shape = (1, z, 1, 1, 1)
        mean_t = torch.tensor(mean, device=like.device, dtype=torch.float32).view(shape)
        inv_std = 1.0 / torch.tensor(std, device=like.device, dtype=torch.float32).view(shape)
        return mean_t, inv_std

    # -- encode --------------------------------------------------------------------------
    def encode(self, video: Tensor, *, chunk_frames: int = 4, tile_size: int | tuple[int, int] | None = None,
               tile_stride: int | tuple[int, int] | None = None) -> Tensor:
        """video `[B, 3, T=4k+1, H, W]` in [-1, 1] -> latents `[B, z, k+1, H/s, W/s]` (mean of the
        posterior; s = `config.spatial_stride`, 8 for Wan2.1, 16 for Wan2.2).

        chunk_frames: frames per causal chunk after the first frame (a multiple of 4).
        tile_size/tile_stride: spatial tiles in pixels (multiples of s), blended at the seams.
        """
        stride_t, stride_s = self.config.temporal_stride, self.config.spatial_stride
        b, c, t, h, w = video.shape
        if c != 3 or (t - 1) % stride_t:
            raise ValueError(f"video must be [B, 3, T, H, W] with T = {stride_t}k+1, got {tuple(video.shape)}")
        if h % stride_s or w % stride_s:
            raise ValueError(f"video height and width must be multiples of {stride_s}, got {h}x{w}")
        if chunk_frames < 1 or chunk_frames % stride_t:
            raise ValueError(f"chunk_frames must be a positive multiple of {stride_t}, got {chunk_frames}")
        tile, stride = _pair(tile_size, stride_s, "tile_size"), _pair(tile_stride, stride_s, "tile_stride")
        return self._tiled(video, tile, stride, stride_s, down=True, fn=lambda v: self._encode_tile(v, chunk_frames))

    def posterior(self, video: Tensor, chunk_frames: int = 4) -> tuple[Tensor, Tensor]:
        """mu and log-variance `[B, z, k+1, H/s, W/s]` of the raw (not normalised) latent
        posterior, untiled: what training the VAE needs."""
        dtype = self.conv1.weight.dtype
        cache = CausalCache()
        # Patchified chunk by chunk: no second copy of the whole video.
        chunks = [self.encoder(self.patchify(video[:, :, s:e]).to(dtype), cache)
                  for s, e in _chunks(video.shape[2], chunk_frames)]
        mu, log_var = self.conv1(torch.cat(chunks, dim=2)).float().chunk(2, dim=1)
        return mu, log_var

    def normalize(self, z: Tensor) -> Tensor:
        """Raw latents -> the normalised latents `encode` returns and `decode` takes."""
        mean, inv_std = self._stats(z)
        return (z - mean) * inv_std

    def _encode_tile(self, video: Tensor, chunk_frames: int) -> Tensor:
        return self.normalize(self.posterior(video, chunk_frames)[0])

    # -- decode --------------------------------------------------------------------------
    def decode(self, latents: Tensor, *, chunk_latents: int = 1, tile_size: int | tuple[int, int] | None = None,
               tile_stride: int | tuple[int, int] | None = None, callback=None, clamp: bool = True) -> Tensor:
        """latents `[B, z, k+1, h, w]` -> video `[B, 3, 4k+1, s*h, s*w]` float32 in [-1, 1]
        (s = `config.spatial_stride`): `decode_chunks` gathered into one tensor.

        chunk_latents: latent frames decoded per causal step (1 = the official schedule).
        tile_size/tile_stride: spatial tiles in output pixels (multiples of s), blended at the seams.
        callback(done, total): called after each decoded chunk (for progress bars).
        clamp: False leaves the output unclamped, for training: a pixel clamped at +-1 passes no
        gradient, and a decoder pushed past the range everywhere never comes back.
        """
        out, frame = None, 0
        frames = 1 + self.config.temporal_stride * (latents.shape[2] - 1) if latents.ndim == 5 else 0
        for chunk in self.decode_chunks(latents, chunk_latents=chunk_latents, tile_size=tile_size,
                                        tile_stride=tile_stride, callback=callback, clamp=clamp):
            if out is None:  # filled in place: no list of chunks beside the video
                out = chunk.new_empty(*chunk.shape[:2], frames, *chunk.shape[3:])
            out[:, :, frame: frame + chunk.shape[2]] = chunk
            frame += chunk.shape[2]
        return out

    def decode_chunks(self, latents: Tensor, *, chunk_latents: int = 1,
                      tile_size: int | tuple[int, int] | None = None,
                      tile_stride: int | tuple[int, int] | None = None, callback=None,
                      clamp: bool = True) -> Iterator[Tensor]:
        """`decode` as a stream: yields the video's frames `[B, 3, n, s*h, s*w]` float32 in order,
        one causal chunk at a time (1 frame, then 4 x chunk_latents), so a video of any length
        is decoded without ever holding all its frames. With spatial tiles every tile keeps its
        own causal cache; chunk k of each tile is decoded and the tiles blended before it is
        yielded. Same arguments as `decode`; callback(done, total) after each tile's chunk."""
        if latents.ndim != 5 or latents.shape[1] != self.config.z_dim:
            raise ValueError(f"latents must be [B, {self.config.z_dim}, F, H, W], got {tuple(latents.shape)}")
        if chunk_latents < 1:
            raise ValueError(f"chunk_latents must be >= 1, got {chunk_latents}")
        s = self.config.spatial_stride
        tile = _pair(tile_size, s, "tile_size")
        stride = _pair(tile_stride, s, "tile_stride")
        tile = None if tile is None else (tile[0] // s, tile[1] // s)
        stride = None if stride is None else (stride[0] // s, stride[1] // s)
        h, w = latents.shape[-2:]
        rows, cols = _tile_grid((h, w), tile, stride)
        counter = _Counter((1 + math.ceil((latents.shape[2] - 1) / chunk_latents)) * len(rows) * len(cols), callback)
        return self._decode_stream(latents, rows, cols, tile, chunk_latents, counter, clamp)

    def _decode_stream(self, latents: Tensor, rows, cols, tile, chunk_latents: int, counter: "_Counter",
                       clamp: bool) -> Iterator[Tensor]:
        # A generator apart from decode_chunks, so that bad arguments raise at the call, not at the first chunk.
        if len(rows) == 1 and len(cols) == 1:
            yield from self._decode_tile(latents, chunk_latents, counter, clamp)
            return
        h, w = latents.shape[-2:]
        s = self.config.spatial_stride
        th, tw = min(tile[0], h), min(tile[1], w)
        places = _placements(rows, cols, th, tw, lambda n: n * s)
        tiles = [self._decode_tile(latents[..., top: top + th, left: left + tw], chunk_latents, counter, clamp)
                 for top, left, *_ in places]
        masks = weight = None
        for chunks in zip(*tiles):  # chunk k of every tile, each tile's cache carried on
            out = chunks[0].new_zeros(*chunks[0].shape[:-2], h * s, w * s)
            if masks is None:
                masks = [_blend_mask(y, *overlaps) for y, (_, _, *overlaps) in zip(chunks, places)]
                weight = chunks[0].new_zeros(h * s, w * s)
                for y, mask, (top, left, *_) in zip(chunks, masks, places):
                    weight[top * s: top * s + y.shape[-2], left * s: left * s + y.shape[-1]] += mask
            for y, mask, (top, left, *_) in zip(chunks, masks, places):
                out[..., top * s: top * s + y.shape[-2], left * s: left * s + y.shape[-1]] += y * mask
            yield out / weight

    def _decode_tile(self, latents: Tensor, chunk_latents: int, counter: "_Counter",
                     clamp: bool = True) -> Iterator[Tensor]:
        """One tile's frames, a causal chunk at a time, with the tile's own cache."""
        dtype = self.conv2.weight.dtype
        mean, inv_std = self._stats(latents)
        z = self.conv2((latents.float() / inv_std + mean).to(dtype))  # a 1x1 conv: the whole tile at once
        cache = CausalCache()
        for start, end in _chunks(z.shape[2], chunk_latents):
            chunk = self.unpatchify(self.decoder(z[:, :, start:end], cache)).float()
            counter.step()
            yield chunk.clamp(-1, 1) if clamp else chunk

    # -- spatial tiling ------------------------------------------------------------------
    def _tiled(self, x: Tensor, tile, stride, scale: int, *, down: bool, fn) -> Tensor:
        """Apply `fn` to overlapping spatial tiles of x and blend the results linearly.

        tile/stride are in x's pixels. `down`: the output is `scale` times smaller (encode),
        else `scale` times larger (decode).
        """
        h, w = x.shape[-2:]
        rows, cols = _tile_grid((h, w), tile, stride)
        if len(rows) == 1 and len(cols) == 1:
            return fn(x)
        to_out = (lambda n: n // scale) if down else (lambda n: n * scale)
        out = weight = None
        th, tw = min(tile[0], h), min(tile[1], w)
        for top, left, *overlaps in _placements(rows, cols, th, tw, to_out):
            y = fn(x[..., top: top + th, left: left + tw])
            if out is None:
                out = y.new_zeros(*y.shape[:-2], to_out(h), to_out(w))
                weight = y.new_zeros(to_out(h), to_out(w))
            mask = _blend_mask(y, *overlaps)
            oy, ox = to_out(top), to_out(left)
            out[..., oy: oy + y.shape[-2], ox: ox + y.shape[-1]] += y * mask
            weight[oy: oy + y.shape[-2], ox: ox + y.shape[-1]] += mask
        return out / weight


def _placements(rows: list[int], cols: list[int], th: int, tw: int, to_out) -> list[tuple[int, ...]]:
    """(top, left, above, below, before, after) of each tile in row order: its start in the
    input and its overlap with the neighbour on each side, in output pixels."""
    places = []
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            above = to_out(rows[i - 1] + th - top) if i else 0
            below = to_out(top + th - rows[i + 1]) if i + 1 < len(rows) else 0
            before = to_out(cols[j - 1] + tw - left) if j else 0
            after = to_out(left + tw - cols[j + 1]) if j + 1 < len(cols) else 0
            places.append((top, left, above, below, before, after))
    return places


def _blend_mask(y: Tensor, above: int, below: int, before: int, after: int) -> Tensor:
    """A tile's blend weights `[h, w]`: linear ramps over its overlaps."""
    wy = _ramp(y.shape[-2], above, below, y.device, y.dtype)
    wx = _ramp(y.shape[-1], before, after, y.device, y.dtype)
    return wy[:, None] * wx[None, :]


class _Counter:
    def __init__(self, total: int, callback):
        self.done, self.total, self.callback = 0, total, callback

    def step(self) -> None:
        self.done += 1
        if self.callback:
            self.callback(self.done, self.total)


def _chunks(frames: int, chunk: int) -> Iterator[tuple[int, int]]:
    """Causal chunks: the first frame alone, then `chunk` frames at a time."""
    yield 0, 1
    for start in range(1, frames, chunk):
        yield start, min(start + chunk, frames)


def _pair(value, multiple: int, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(v <= 0 or v % multiple for v in pair):
        raise ValueError(f"{name} must be a positive multiple of {multiple} (or a pair of them), got {value!r}")
    return pair  # type: ignore[return-value]
