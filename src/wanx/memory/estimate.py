"""How much memory a generation request needs, estimated before any weight is loaded, so that
an impossible request (`--size 16000x16000`) is refused at once instead of dying of OOM.

Peak = resident weights + the larger of the two phases that never overlap: the DiT forward
(activations scale with tokens x width) and the VAE decode (a causal chunk at full resolution:
scales with pixels, not with length), plus the decoded video itself (one causal chunk of it
when the frames are written to the file as they are decoded). The coefficients are
measured on the real architectures in fp32 as the peak of live tensor bytes (a dispatch-mode
count, not the allocator's): a 1.3B-width DiT block at 4,800 tokens (75.6 KB per token and
sample) and the real VAE decoding at 128x192 and 256x384 (18.9 KB per output pixel).
Attention is counted as memory-efficient (SDPA/FlashAttention never hold L x L scores).
"""

from __future__ import annotations

import math

import os
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from ..configs import DiTConfig
from .gguf import QUANTIZED, TYPES, qtype_id

GiB = 2**30
# Per token and sample: the fp32 residual stream and its modulated copy, plus one block's
# largest live temporaries in the compute dtype (the FFN hidden before and after GELU, and
# a width-sized one): 90 KB per token at the 1.3B width in fp32, where 75.6 KB was measured.
_RESIDUAL_COPIES = 2
# Decoder workspace per output pixel in fp32: 4 frames x up to 96 channels at full resolution,
# the causal tails and conv temporaries (measured 18.9 KB per pixel, flat in size and length).
_VAE_BYTES_PER_PIXEL_FP32 = 20 * 1024
# When a whole frame's decode does not fit, the VAE decodes spatial tiles of at most this many
# pixels a side (overlapping by DECODE_OVERLAP, blended), so decoding never sets the limit.
DECODE_TILES = (768, 512, 384, 256)
DECODE_OVERLAP = 64
# Frames of the largest causal chunk the VAE decodes (one latent frame: 4), all that a
# streamed decode holds of the video at once.
STREAM_CHUNK_FRAMES = 4


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes resident for the weights (0 when they are loaded already)
    denoise: int  # DiT activations of one forward (both guidance branches when batched)
    decode: int  # VAE decode workspace
    video: int  # the decoded video (float32 and uint8 copies); streamed to a file: one chunk of it

    @property
    def work(self) -> int:
        """Everything but the weights."""
        return max(self.denoise, self.decode) + self.video

    @property
    def total(self) -> int:
        return self.weights + self.work


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weight_bytes(networks: Iterable[tuple[str, int]], dtype: torch.dtype, vae_dtype: torch.dtype = torch.float32,
                 *, fp8: bool = False, stored: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, int]:
    """Bytes of each network's weights once cast, from (network, parameter count) pairs: the
    VAE in vae_dtype, the others in dtype; with fp8 (or int8) the DiT at about one byte a
    parameter (its block Linear layers hold nearly all of them). stored: each network's
    parameters by the kind its file holds them in (`CheckpointInfo.dtypes`): a DiT kept in its
    file's quantized form (GGUF, lightx2v int8/fp8, ComfyUI fp8) counts at its packed size."""
    def size(network: str, n: int) -> int:
        if network in ("dit", "dit_low") and fp8:  # dit_low: Wan2.2's low-noise expert
            return n
        kinds = (stored or {}).get(network)
        if network in ("dit", "dit_low") and kinds and any(kind in _PACKED or kind in QUANTIZED for kind in kinds):
            return kept_bytes(kinds, dtype)
        return n * _bytes(vae_dtype if network == "vae" else dtype)

    return {network: size(network, n) for network, n in networks}


_PACKED = ("int8", "float8_e4m3fn", "float8_e5m2")  # one byte a parameter, as stored


def kept_bytes(kinds: Mapping[str, int], dtype: torch.dtype) -> int:
    """Bytes of a DiT kept as its file stores it: GGUF types at their block size, int8/fp8 one
    byte a parameter, float tensors cast to `dtype` (they are dequantized or cast on load)."""
    total = 0
    for kind, n in kinds.items():
        if kind in _PACKED:
            total += n
        elif kind in QUANTIZED:
            _, block, size = TYPES[qtype_id(kind)]
            total += n * size // block
        else:
            total += n * _bytes(dtype)
    return total


def estimate(config: DiTConfig, height: int, width: int, num_frames: int, *, dtype: torch.dtype,
             vae_dtype: torch.dtype = torch.float32, batch: int = 2, weights: int = 0,
             window_frames: int | None = None, stream: bool = False, extra_frames: float = 0.0,
             decoded_frames: int | None = None, output_frames: int | None = None) -> MemoryEstimate:
    """Peak memory of generating one video of `num_frames` x `height` x `width`; batch 2 is
    batched classifier-free guidance. window_frames: the DiT sees context windows of this many
    frames at a time (its activations are a window's, however long the video). stream: the
    frames go to the file as they are decoded (`WanPipeline(..., output_path=...)`), so only
    one causal chunk of them is ever held. A task's own (`Conditioning.held`): extra_frames,
    latent frames' worth of DiT tokens beside the video's (references, S2V's motion memory);
    decoded_frames, frames one decode makes at once (a clip-after-clip task decodes a clip
    whole); output_frames, the whole video's frames when `num_frames` is one clip's."""
    pt, ph, pw = config.patch_size
    stride = latent_stride(config)
    seen = min(num_frames, window_frames or num_frames)
    frame_tokens = (height // stride // ph) * (width // stride // pw)
    tokens = math.ceil(((seen - 1) // 4 // pt + 1 + extra_frames) * frame_tokens)
    per_token = 4 * _RESIDUAL_COPIES * config.dim + _bytes(dtype) * (config.dim + 2 * config.ffn_dim)
    denoise = batch * (tokens + config.text_len) * per_token
    # VACE: every hint (float32, one per VACE layer) waits for its main block, beside the VACE stream.
    if vace_layers := getattr(config, "vace_layers", None):
        denoise += batch * tokens * 4 * config.dim * (len(vace_layers) + 1)
    smallest = DECODE_TILES[-1]
    decode = min(decode_bytes(height, width, vae_dtype), decode_bytes(min(height, smallest), min(width, smallest), vae_dtype))
    if decoded_frames is None:  # the plain decode: causal chunks, all kept unless streamed
        held = min(num_frames, STREAM_CHUNK_FRAMES) if stream else num_frames
    else:  # a clip decoded whole, beside the video so far unless that went to the file
        held = decoded_frames + (0 if stream else output_frames or num_frames)
    video = held * height * width * 3 * (4 + 2)
    return MemoryEstimate(weights, denoise, decode, video)


def latent_stride(config: DiTConfig) -> int:
    """Pixels per latent side of the VAE a DiT runs on: 16 for the Wan2.2 VAE's 48 channels
    (TI2V-5B), else 8 (the Wan2.1 VAE); the pipeline refuses any other pairing."""
    return 16 if config.out_dim == 48 else 8


def decode_bytes(height: int, width: int, vae_dtype: torch.dtype = torch.float32) -> int:
    """VAE decode workspace for frames (or tiles) of height x width pixels."""
    return height * width * _VAE_BYTES_PER_PIXEL_FP32 * _bytes(vae_dtype) // 4


def decode_tiles(height: int, width: int, vae_dtype: torch.dtype, available: int
                 ) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """None when whole frames decode within `available` bytes; else (tile_size, tile_stride)
    in pixels: the largest tile of DECODE_TILES that fits (the smallest when none does)."""
    if decode_bytes(height, width, vae_dtype) <= available:
        return None
    for side in DECODE_TILES:
        tile = (min(height, side), min(width, side))
        if decode_bytes(*tile, vae_dtype) <= available or side == DECODE_TILES[-1]:
            stride = tuple(t if t == full else t - DECODE_OVERLAP for t, full in zip(tile, (height, width)))
            return tile, stride
    return None


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: free GPU memory, or the host's
    MemAvailable (page cache that can be dropped included)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def check_fits(config: DiTConfig, height: int, width: int, num_frames: int, *, device: torch.device,
               dtype: torch.dtype, vae_dtype: torch.dtype = torch.float32, batch: int = 2, weights: int = 0,
               available: int | None = None, window_frames: int | None = None,
               stream: bool = False, **task) -> MemoryEstimate:
    """The estimate, or a one-line ValueError with it, what the device has, and the largest
    size with the same aspect ratio (multiples of 16; 32 for TI2V) that fits. task: the
    task's own terms (`estimate`'s extra_frames, decoded_frames, output_frames)."""
    available = available_memory(device) if available is None else available
    kwargs = dict(dtype=dtype, vae_dtype=vae_dtype, batch=batch, weights=weights, window_frames=window_frames,
                  stream=stream, **task)
    need = estimate(config, height, width, num_frames, **kwargs)
    if need.total <= available:
        return need
    what = (f"{width}x{height} with {num_frames} frames needs about {need.total / GiB:.1f} GiB "
            f"(weights {need.weights / GiB:.1f}, denoising {need.denoise / GiB:.1f}, decoding {need.decode / GiB:.1f}) "
            f"but {device} has {available / GiB:.1f} GiB available")
    smallest = estimate(config, 16, 16, num_frames, **kwargs)
    if smallest.total > available:
        raise ValueError(f"{what}; even the smallest size does not fit: use fewer frames, a smaller dtype, "
                         "or a device with more memory")
    low, high = 0.0, 1.0  # the largest scale of (width, height) that fits
    m = 2 * latent_stride(config)  # whole 2x2 patches of latents
    for _ in range(40):
        mid = (low + high) / 2
        w, h = max(m, int(width * mid) // m * m), max(m, int(height * mid) // m * m)
        low, high = (mid, high) if estimate(config, h, w, num_frames, **kwargs).total <= available else (low, mid)
    w, h = max(m, int(width * low) // m * m), max(m, int(height * low) // m * m)
    raise ValueError(f"{what}; the largest size with this aspect ratio that fits is {w}x{h} (or use fewer frames)")


def held_form(model) -> str:
    """How a DiT's block Linear weights are held, in words for the loading line: "Q4_0 x 200,
    Q8_0 x 40 (GGUF, packed)", "int8 x 240", "fp8 x 240", or "" for plain float layers."""
    from collections import Counter

    from .fp8 import FP8Linear
    from .gguf import GGUFLinear
    from .int8 import Int8Linear

    kinds: Counter[str] = Counter()
    for layer in model.modules():
        if isinstance(layer, GGUFLinear):
            kinds[layer.qtype] += 1
        elif isinstance(layer, Int8Linear):
            kinds["int8"] += 1
        elif isinstance(layer, FP8Linear):
            kinds["fp8"] += 1
    if not kinds:
        return ""
    packed = " (GGUF, packed)" if any(kind in QUANTIZED for kind in kinds) else ""
    return ", ".join(f"{kind} x {n}" for kind, n in kinds.most_common()) + packed
