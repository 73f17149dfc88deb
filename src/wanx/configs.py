"""Architecture configs of the Wan2.1 and Wan2.2 networks: frozen dataclasses with named presets.

Only architecture lives here. Runtime choices (device, dtype, attention backend, offload)
are passed where the model is loaded or run, never stored in a config.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

# Every released Wan2.1 DiT uses head dim 128; the head count cannot be recovered from
# tensor shapes, so it is the fallback when no config.json sits beside the weights.
RELEASED_HEAD_DIM = 128

MODEL_TYPES = ("t2v", "i2v", "flf2v", "ti2v", "vace", "animate", "s2v")


@dataclass(frozen=True)
class DiTConfig:
    """Wan2.1/Wan2.2 diffusion transformer (official `WanModel` argument names, plus `clip`).

    Wan2.2's A14B experts are Wan2.1-14B DiTs (I2V without the CLIP branch); TI2V-5B is a
    narrower one on 48 latent channels whose image frame is given by a per-token timestep."""

    model_type: str = "t2v"  # t2v | i2v | flf2v | ti2v
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16  # 16 for T2V; 36 = noise 16 + mask 4 + image latent 16 for I2V/FLF2V; 48 for TI2V
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    image_dim: int = 1280  # CLIP ViT-H/14 width; only used by i2v/flf2v
    eps: float = 1e-6
    # i2v/flf2v: a second cross-attention to CLIP image tokens (Wan2.1). Wan2.2's I2V-A14B has
    # none (False): its image enters only through y. Not an official argument: read from the keys.
    clip: bool = True

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if (self.model_type == "vace") != isinstance(self, VaceConfig):
            raise ValueError("a VACE DiT is described by VaceConfig (its vace_layers and vace_in_dim), "
                             f"not DiTConfig(model_type={self.model_type!r})")
        if (self.model_type == "animate") != isinstance(self, AnimateConfig):
            raise ValueError("a Wan2.2 Animate DiT is described by AnimateConfig (its motion and face encoders), "
                             f"not DiTConfig(model_type={self.model_type!r})")
        if (self.model_type == "s2v") != isinstance(self, S2VConfig):
            raise ValueError("a Wan2.2 S2V DiT is described by S2VConfig (its audio and motion paths), "
                             f"not DiTConfig(model_type={self.model_type!r})")
        if not self.clip and self.model_type != "i2v":
            raise ValueError(f"only an i2v DiT can go without CLIP (Wan2.2 I2V); this is {self.model_type}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_image_input(self) -> bool:
        """Whether it reads CLIP image tokens (`clip_features`)."""
        return self.model_type in ("i2v", "flf2v", "animate") and self.clip

    @property
    def has_y(self) -> bool:
        """Whether it takes y, the mask and image latents beside the noise (I2V, FLF2V, Animate)."""
        return self.model_type in ("i2v", "flf2v", "animate")

    @property
    def image_tokens(self) -> int:
        """CLIP tokens per sample: 257 (one image) or 514 (first and last frame)."""
        return 514 if self.model_type == "flf2v" else 257


@dataclass(frozen=True)
class VaceConfig(DiTConfig):
    """Wan2.1 VACE DiT (official `VaceWanModel`): a T2V DiT plus VACE blocks whose hints are
    added after the main blocks at `vace_layers`, read from the VACE context (`vace_in_dim`
    channels: inactive and reactive frame latents, 16 + 16, and the 8x8-folded mask, 64)."""

    model_type: str = "vace"
    vace_layers: tuple[int, ...] | None = None  # None: every other block from 0 (the official default)
    vace_in_dim: int = 96

    def __post_init__(self) -> None:
        layers = tuple(range(0, self.num_layers, 2)) if self.vace_layers is None else tuple(int(i) for i in self.vace_layers)
        object.__setattr__(self, "vace_layers", layers)
        super().__post_init__()
        if not layers or layers[0] != 0 or list(layers) != sorted(set(layers)) or layers[-1] >= self.num_layers:
            raise ValueError(f"vace_layers must be increasing block indices from 0, below num_layers "
                             f"{self.num_layers}; got {list(layers)}")


# The official motion encoder's widths by feature-map side (LIA's `EncoderApp`), 512 down to 4.
MOTION_ENCODER_CHANNELS = {512: 32, 256: 64, 128: 128, 64: 256, 32: 512, 16: 512, 8: 512, 4: 512}


@dataclass(frozen=True)
class AnimateConfig(DiTConfig):
    """Wan2.2-Animate DiT (official `WanAnimateModel`, `wan/modules/animate/`): the Wan2.1
    I2V-14B DiT (y and CLIP tokens) plus `pose_patch_embedding` (pose latents added to the
    tokens of every frame but the reference one), a motion encoder (LIA's `Generator`: a
    StyleGAN-like conv stack on each 512x512 face frame to a motion code), a face encoder
    (causal conv1d over the frames, 4x fewer of them) and `face_adapter` blocks (cross-attention
    from each latent frame's tokens to its face tokens) added after every
    `inject_face_latents_blocks`-th block. Names without an official argument (the official
    class hard-codes them) are diffusers' `WanAnimateTransformer3DModel` ones."""

    model_type: str = "animate"
    in_dim: int = 36
    motion_encoder_size: int = 512  # the face frames' side in pixels
    # widths of the conv stack at sides size, size/2, ..., 4; None: the official ones
    motion_encoder_channels: tuple[int, ...] | None = None
    motion_style_dim: int = 512
    motion_dim: int = 20  # the motion code, a mix of this many learned directions
    motion_encoder_dim: int = 512  # the directions' width
    face_encoder_hidden_dim: int = 1024
    face_encoder_num_heads: int = 4
    inject_face_latents_blocks: int = 5

    def __post_init__(self) -> None:
        size = self.motion_encoder_size
        if size < 8 or size & (size - 1):
            raise ValueError(f"motion_encoder_size must be a power of 2 from 8, got {size}")
        sides = [size >> i for i in range(int(math.log2(size)) - 1)]  # size .. 4
        channels = (tuple(MOTION_ENCODER_CHANNELS[s] for s in sides) if self.motion_encoder_channels is None
                    else tuple(int(c) for c in self.motion_encoder_channels))
        if len(channels) != len(sides):
            raise ValueError(f"motion_encoder_channels needs {len(sides)} widths (sides {sides}), got {len(channels)}")
        object.__setattr__(self, "motion_encoder_channels", channels)
        super().__post_init__()
        if self.inject_face_latents_blocks < 1 or self.num_layers % self.inject_face_latents_blocks:
            raise ValueError(f"inject_face_latents_blocks must divide num_layers {self.num_layers}, "
                             f"got {self.inject_face_latents_blocks}")
        if self.motion_dim > self.motion_encoder_dim:
            raise ValueError(f"motion_dim {self.motion_dim} must not exceed motion_encoder_dim {self.motion_encoder_dim}")

    @property
    def face_layers(self) -> tuple[int, ...]:
        """The main blocks a face adapter block follows: 0, 5, ..., 35 for 40 blocks."""
        return tuple(range(0, self.num_layers, self.inject_face_latents_blocks))


# The released S2V-14B's audio injection layers (`wan/configs/wan_s2v_14B.py`).
S2V_AUDIO_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)


@dataclass(frozen=True)
class S2VConfig(DiTConfig):
    """Wan2.2-S2V DiT (official `WanModel_S2V`, `wan/modules/s2v/`): the Wan2.1 T2V DiT whose
    blocks give the reference and motion tokens appended to the video's their own (zero)
    timestep, plus `cond_encoder` (pose latents added to the tokens), a causal audio encoder
    (a learned mix of the wav2vec2 hidden layers, causal convs to `num_audio_token` tokens and a
    global one per latent frame), audio cross-attention after the blocks of
    `audio_inject_layers` (each frame's tokens AdaIN-modulated by its global audio token, then
    attending to its audio tokens), and FramePack motion memory (the last 19 motion latent
    frames patch-embedded at 1x, 2x and 4x compression). Argument names are the official
    class' (`audio_encoder_layers` and `motion_frames` are hard-coded or passed there).

    Only the released choices are built: `enable_framepack` with drop mode "padd" (not the
    transformer motioner nor plain motion tokens), `enable_adain` with adain_mode
    "attn_norm", `zero_timestep`, `add_last_motion`."""

    model_type: str = "s2v"
    cond_dim: int = 16  # the pose video's latent channels
    audio_dim: int = 1024  # wav2vec2-large's hidden size
    audio_encoder_layers: int = 25  # hidden states mixed: the embedding output and 24 layers
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = S2V_AUDIO_INJECT_LAYERS
    motion_frames: int = 73  # pixel frames of motion memory (19 latent frames)

    def __post_init__(self) -> None:
        layers = tuple(int(i) for i in self.audio_inject_layers)
        object.__setattr__(self, "audio_inject_layers", layers)
        super().__post_init__()
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= self.num_layers:
            raise ValueError(f"audio_inject_layers must be increasing block indices below num_layers "
                             f"{self.num_layers}; got {list(layers)}")
        if self.dim % 4:
            raise ValueError(f"an S2V DiT's dim must be a multiple of 4 (its audio encoder's widths), got {self.dim}")
        if self.in_dim != self.out_dim:
            raise ValueError(f"an S2V DiT takes latents alone: in_dim {self.in_dim} must equal out_dim {self.out_dim}")

    @property
    def lat_motion_frames(self) -> int:
        """The motion memory's latent frames: (73 + 3) // 4 = 19."""
        return (self.motion_frames + 3) // 4


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 causal 3D VAE (official `_video_vae` argument names)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # official spelling

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def generation(self) -> str:
        return "2.1"


@dataclass(frozen=True)
class VAE22Config(VAEConfig):
    """Wan2.2 causal 3D VAE (official `WanVAE_` of `vae2_2.py`): the Wan2.1 stage layout with
    residual stages, a decoder of its own width, and a 2x2 pixel patchify around both, so the
    stride is 4x16x16."""

    dim: int = 160
    z_dim: int = 48
    dec_dim: int = 256  # the decoder's base width (the official class default, never passed)
    patch_size: int = 2  # pixels folded into channels before the encoder and after the decoder

    @property
    def spatial_stride(self) -> int:
        return super().spatial_stride * self.patch_size

    @property
    def generation(self) -> str:
        return "2.2"


def frames_ok(num_frames: int) -> bool:
    """A frame count both VAEs take whole: 4k+1 (the first frame alone, then each 4 frames one
    latent frame: the temporal stride)."""
    return num_frames >= 1 and (num_frames - 1) % 4 == 0


def frames_at_most(num_frames: int) -> int:
    """The longest 4k+1 frame count not over `num_frames` (1 at the least)."""
    return max(1, (num_frames - 1) // 4 * 4 + 1)


@dataclass(frozen=True)
class T5Config:
    """umT5 encoder (official `umt5_xxl` argument names)."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_dist: int = 128
    eps: float = 1e-6


@dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: int = 4
    num_heads: int = 16
    num_layers: int = 32
    eps: float = 1e-5

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


CLIP_PRESETS: dict[str, CLIPVisionConfig] = {
    "vit-h-14": CLIPVisionConfig(),
    "tiny": CLIPVisionConfig(dim=160, num_heads=2, num_layers=3),  # 257 tokens, head dim 80 as ViT-H/14
}


_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32)  # head dim 16: RoPE split 8/4/4

# Wan2.2's A14B models are two experts each (high_noise_model, low_noise_model) of the same
# architecture; t2v-A14B is t2v-14B's, so `preset_name` names an expert's config "t2v-14B".
DIT_PRESETS: dict[str, DiTConfig] = {
    "t2v-1.3B": DiTConfig(),
    "t2v-14B": DiTConfig(**_14B),
    "i2v-14B": DiTConfig(model_type="i2v", in_dim=36, **_14B),  # 480P and 720P share it
    "flf2v-14B": DiTConfig(model_type="flf2v", in_dim=36, **_14B),
    "t2v-A14B": DiTConfig(**_14B),
    "i2v-A14B": DiTConfig(model_type="i2v", in_dim=36, clip=False, **_14B),
    "ti2v-5B": DiTConfig(model_type="ti2v", dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
    "tiny": DiTConfig(**_TINY),
    "tiny-i2v": DiTConfig(model_type="i2v", in_dim=36, image_dim=160, **_TINY),
    "tiny-flf2v": DiTConfig(model_type="flf2v", in_dim=36, image_dim=160, **_TINY),
    "tiny-i2v-A14B": DiTConfig(model_type="i2v", in_dim=36, clip=False, **_TINY),
    "tiny-ti2v": DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, **_TINY),
    # Wan2.1 VACE: the T2V DiT of its size with VACE blocks (the released config.json files):
    # 1.3B at every other block (the official default), 14B at every fifth.
    "vace-1.3B": VaceConfig(),
    "vace-14B": VaceConfig(vace_layers=tuple(range(0, 40, 5)), **_14B),
    "tiny-vace": VaceConfig(vace_layers=(0, 1), **_TINY),  # both kinds of VACE block (block 0 has before_proj)
    # Wan2.2-Animate-14B: I2V-14B's DiT with the motion/face path (the official class' constants).
    "animate-14B": AnimateConfig(**_14B),
    # The official 512x512 face frames through 8-wide convs; a face block after block 0, none after 1.
    "tiny-animate": AnimateConfig(**_TINY, image_dim=160, motion_encoder_channels=(8,) * 8, motion_style_dim=32,
                                  motion_dim=4, motion_encoder_dim=32, face_encoder_hidden_dim=32,
                                  face_encoder_num_heads=2, inject_face_latents_blocks=2),
    # Wan2.2-S2V-14B: T2V-14B's blocks with the audio/pose/motion paths (wan/configs/wan_s2v_14B.py).
    "s2v-14B": S2VConfig(**_14B),
    # Head dim 24 (not _TINY's 16): the RoPE split d-4(d//6), 2(d//6), 2(d//6) is then also
    # DiffSynth's d-2(d//3), d//3, d//3 (its parity oracle); audio injected after blocks 0 and 2
    # of 3 (block 1 has none); the tiny wav2vec2's 3 hidden states of width 32 (wanx.audio).
    "tiny-s2v": S2VConfig(dim=48, ffn_dim=64, num_heads=2, num_layers=3, text_dim=32, audio_dim=32,
                          audio_encoder_layers=3, num_audio_token=2, audio_inject_layers=(0, 2)),
}

VAE_PRESETS: dict[str, VAEConfig] = {
    "wan2.1": VAEConfig(),
    "tiny": VAEConfig(dim=8),
    "wan2.2": VAE22Config(),  # TI2V-5B's Wan2.2_VAE.pth
    "tiny-wan2.2": VAE22Config(dim=8, dec_dim=12),  # encoder and decoder of different widths, as released
}


T5_PRESETS: dict[str, T5Config] = {
    "umt5-xxl": T5Config(),
    "tiny": T5Config(vocab=320, dim=32, dim_attn=32, dim_ffn=48, num_heads=4, num_layers=2),
}


def t5_config(name: str) -> T5Config:
    return _preset(T5_PRESETS, name, "T5")


def clip_config(name: str) -> CLIPVisionConfig:
    return _preset(CLIP_PRESETS, name, "CLIP")


def dit_config(name: str) -> DiTConfig:
    return _preset(DIT_PRESETS, name, "DiT")


def vae_config(name: str) -> VAEConfig:
    return _preset(VAE_PRESETS, name, "VAE")


def _preset(table, name, what):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} preset {name!r}; choose one of {', '.join(table)}") from None


def preset_name(config) -> str | None:
    """Name of the preset equal to `config`, if any."""
    table = {DiTConfig: DIT_PRESETS, VaceConfig: DIT_PRESETS, AnimateConfig: DIT_PRESETS, S2VConfig: DIT_PRESETS, VAEConfig: VAE_PRESETS, VAE22Config: VAE_PRESETS, T5Config: T5_PRESETS,
             CLIPVisionConfig: CLIP_PRESETS}[type(config)]
    return next((name for name, c in table.items() if c == config), None)


def official_config_json(cfg: DiTConfig) -> dict:
    """The `config.json` an official Wan2.1/2.2 model folder holds for this DiT (`WanModel` keys)."""
    keys = ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type", "num_heads", "num_layers", "out_dim",
            "text_len")
    if isinstance(cfg, VaceConfig):
        return {"_class_name": "VaceWanModel", **{k: getattr(cfg, k) for k in keys},
                "vace_layers": list(cfg.vace_layers), "vace_in_dim": cfg.vace_in_dim}
    if isinstance(cfg, AnimateConfig):
        return {"_class_name": "WanAnimateModel", **{k: getattr(cfg, k) for k in keys},
                "motion_encoder_dim": cfg.motion_encoder_dim}
    if isinstance(cfg, S2VConfig):
        # WanModel_S2V's arguments as the released config.json spells them (enable_motioner False).
        return {"_class_name": "WanModel_S2V", **{k: getattr(cfg, k) for k in keys}, "cond_dim": cfg.cond_dim,
                "audio_dim": cfg.audio_dim, "num_audio_token": cfg.num_audio_token, "enable_adain": True,
                "adain_mode": "attn_norm", "audio_inject_layers": list(cfg.audio_inject_layers), "zero_init": True,
                "zero_timestep": True, "enable_motioner": False, "add_last_motion": True, "enable_framepack": True,
                "framepack_drop_mode": "padd"}
    return {"_class_name": "WanModel", **{k: getattr(cfg, k) for k in keys}}


# ---------------------------------------------------------------------------------------
# Inference from tensor names and shapes (official key names).

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def block_indices(keys: Sequence[str]) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := _BLOCK.match(k))})


_VACE_BLOCK = re.compile(r"^vace_blocks\.(\d+)\.")


def vace_layers_for(num_vace_blocks: int, num_layers: int) -> tuple[int, ...]:
    """The main blocks a file's VACE blocks feed, when no config.json says: every other block
    (Wan2.1 VACE's official default, 15 of 30 or 20 of 40) or, for fewer blocks, evenly spaced
    from 0 (8 of 40: 0, 5, ..., 35, as VACE-Fun and diffusers' default)."""
    if num_vace_blocks == len(range(0, num_layers, 2)):
        return tuple(range(0, num_layers, 2))
    if num_vace_blocks and num_layers % num_vace_blocks == 0:
        return tuple(range(0, num_layers, num_layers // num_vace_blocks))
    raise ValueError(f"cannot tell which of the {num_layers} blocks the {num_vace_blocks} VACE blocks feed; put a "
                     "config.json with \"vace_layers\" beside the weights")


def infer_dit_config(
    shapes: Mapping[str, Sequence[int]], num_heads: int | None = None, num_layers: int | None = None,
    text_len: int | None = None, vace_layers: Sequence[int] | None = None,
    audio_inject_layers: Sequence[int] | None = None,
) -> DiTConfig:
    """DiT config from official-layout tensor shapes; `num_heads` (and `num_layers`, so a
    missing last block is noticed), `text_len` (no tensor shows it) and a VACE model's
    `vace_layers` from config.json when known."""
    if "vace_patch_embedding.weight" not in shapes and any(_VACE_BLOCK.match(k) for k in shapes):
        raise KeyError("vace_patch_embedding.weight")  # VACE blocks without their input: a damaged VACE file
    if "pose_patch_embedding.weight" in shapes:
        return _infer_animate_config(shapes, num_heads, num_layers, text_len)
    if any(k.startswith(_S2V_PARTS) for k in shapes):
        return _infer_s2v_config(shapes, num_heads, num_layers, text_len, audio_inject_layers)
    if "vace_patch_embedding.weight" in shapes:
        base = infer_dit_config({k: v for k, v in shapes.items() if not k.startswith("vace_")}, num_heads, num_layers,
                                text_len)
        found = sorted({int(m.group(1)) for k in shapes if (m := _VACE_BLOCK.match(k))})
        count = found[-1] + 1 if found else 0
        if vace_layers is None:
            vace_layers = vace_layers_for(count, base.num_layers)
        elif len(vace_layers) != count:
            raise ValueError(f"config.json's vace_layers names {len(vace_layers)} VACE layers but the weights hold "
                             f"{count} vace_blocks; fix vace_layers or use the matching weights")
        fields = {k: getattr(base, k) for k in DiTConfig.__dataclass_fields__ if k not in ("model_type", "clip")}
        return VaceConfig(**fields, vace_layers=tuple(vace_layers),
                          vace_in_dim=int(shapes["vace_patch_embedding.weight"][1]))
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    patch_size = tuple(int(p) for p in patch)
    head_out = shapes["head.head.weight"][0]
    clip = "img_emb.proj.1.weight" in shapes
    out_dim = int(head_out) // (patch_size[0] * patch_size[1] * patch_size[2])
    if "img_emb.emb_pos" in shapes:
        model_type = "flf2v"
    elif clip or in_dim > out_dim:  # Wan2.2 I2V: the y channels without the CLIP branch
        model_type = "i2v"
    elif out_dim == 48:  # the Wan2.2 VAE's latents: TI2V (its image is a latent frame, not y)
        model_type = "ti2v"
    else:
        model_type = "t2v"
    blocks = block_indices(list(shapes))
    return DiTConfig(
        model_type=model_type,
        dim=int(dim),
        ffn_dim=int(shapes[f"blocks.{blocks[0] if blocks else 0}.ffn.0.weight"][0]),
        num_heads=int(num_heads) if num_heads else int(dim) // RELEASED_HEAD_DIM,
        num_layers=int(num_layers) if num_layers else (blocks[-1] + 1) if blocks else 0,
        in_dim=int(in_dim),
        out_dim=out_dim,
        patch_size=patch_size,  # type: ignore[arg-type]
        freq_dim=int(shapes["time_embedding.0.weight"][1]),
        text_dim=int(shapes["text_embedding.0.weight"][1]),
        image_dim=int(shapes["img_emb.proj.0.weight"][0]) if clip else DiTConfig.image_dim,
        text_len=int(text_len) if text_len else DiTConfig.text_len,
        clip=clip or model_type != "i2v",
    )


_ANIMATE_PARTS = ("pose_patch_embedding.", "motion_encoder.", "face_encoder.", "face_adapter.")


def _infer_animate_config(shapes: Mapping[str, Sequence[int]], num_heads: int | None, num_layers: int | None,
                          text_len: int | None) -> AnimateConfig:
    """Wan2.2-Animate: the I2V DiT of the other keys, the motion/face path's sizes from theirs."""
    base = infer_dit_config({k: v for k, v in shapes.items() if not k.startswith(_ANIMATE_PARTS)}, num_heads,
                            num_layers, text_len)
    convs = "motion_encoder.enc.net_app.convs"
    res_blocks = sorted({int(m[1]) for k in shapes if (m := re.match(rf"{re.escape(convs)}\.(\d+)\.conv1\.", k))})
    fcs = sorted({int(m[1]) for k in shapes if (m := re.match(r"motion_encoder\.enc\.fc\.(\d+)\.", k))})
    adapters = sorted({int(m[1]) for k in shapes if (m := re.match(r"face_adapter\.fuser_blocks\.(\d+)\.", k))})
    if not (fcs and adapters) or res_blocks != list(range(1, len(res_blocks) + 1)):
        raise KeyError(f"{convs}.1.conv1.0.weight" if not res_blocks else
                       "motion_encoder.enc.fc.0.weight" if not fcs else "face_adapter.fuser_blocks.0.linear1_q.weight")
    every = base.num_layers // len(adapters)
    if base.num_layers % len(adapters):
        raise ValueError(f"{len(adapters)} face_adapter blocks do not spread evenly over {base.num_layers} blocks")
    hidden = int(shapes["face_encoder.conv2.conv.weight"][0])
    fields = {k: getattr(base, k) for k in DiTConfig.__dataclass_fields__ if k not in ("model_type", "clip")}
    return AnimateConfig(
        **fields,
        motion_encoder_size=2 ** (len(res_blocks) + 2),
        motion_encoder_channels=(int(shapes[f"{convs}.0.0.weight"][0]),
                                 *(int(shapes[f"{convs}.{i}.conv2.1.weight"][0]) for i in res_blocks)),
        motion_style_dim=int(shapes[f"{convs}.{len(res_blocks) + 1}.weight"][0]),
        motion_dim=int(shapes[f"motion_encoder.enc.fc.{fcs[-1]}.weight"][0]),
        motion_encoder_dim=int(shapes["motion_encoder.dec.direction.weight"][0]),
        face_encoder_hidden_dim=hidden,
        face_encoder_num_heads=int(shapes["face_encoder.conv1_local.conv.weight"][0]) // hidden,
        inject_face_latents_blocks=every,
    )


_S2V_PARTS = ("cond_encoder.", "casual_audio_encoder.", "audio_injector.", "trainable_cond_mask.", "frame_packer.",
              "motioner.", "zip_motion_out.")


def _infer_s2v_config(shapes: Mapping[str, Sequence[int]], num_heads: int | None, num_layers: int | None,
                      text_len: int | None, audio_inject_layers: Sequence[int] | None) -> S2VConfig:
    """Wan2.2-S2V: the T2V DiT of the other keys, the audio/pose/motion paths' sizes from theirs;
    which blocks the audio injectors follow from config.json, else the release's when it is 40
    blocks with 12 injectors."""
    if any(k.startswith(("motioner.", "zip_motion_out.")) for k in shapes):
        raise ValueError("this S2V DiT has the transformer motioner (enable_motioner), which no release uses; wanx "
                         "builds the released FramePack motion memory only")
    for key in ("cond_encoder.weight", "casual_audio_encoder.weights", "casual_audio_encoder.encoder.conv1_local.conv.weight",
                "casual_audio_encoder.encoder.conv1_global.conv.weight", "trainable_cond_mask.weight",
                "frame_packer.proj.weight", "audio_injector.injector_adain_layers.0.linear.weight"):
        if key not in shapes:
            raise KeyError(key)
    base = infer_dit_config({k: v for k, v in shapes.items() if not k.startswith(_S2V_PARTS)}, num_heads,
                            num_layers, text_len)
    injectors = sorted({int(m[1]) for k in shapes if (m := re.match(r"audio_injector\.injector\.(\d+)\.", k))})
    count = injectors[-1] + 1 if injectors else 0
    if audio_inject_layers is None:
        if base.num_layers == 40 and count == len(S2V_AUDIO_INJECT_LAYERS):
            audio_inject_layers = S2V_AUDIO_INJECT_LAYERS
        else:
            raise ValueError(f"cannot tell which of the {base.num_layers} blocks the {count} audio injectors follow; put "
                             "a config.json with \"audio_inject_layers\" beside the weights")
    elif len(audio_inject_layers) != count:
        raise ValueError(f"config.json's audio_inject_layers names {len(audio_inject_layers)} layers but the weights hold "
                         f"{count} audio injectors; fix audio_inject_layers or use the matching weights")
    local = shapes["casual_audio_encoder.encoder.conv1_local.conv.weight"]
    fields = {k: getattr(base, k) for k in DiTConfig.__dataclass_fields__ if k not in ("model_type", "clip")}
    return S2VConfig(
        **fields,
        cond_dim=int(shapes["cond_encoder.weight"][1]),
        audio_dim=int(local[1]),
        audio_encoder_layers=int(shapes["casual_audio_encoder.weights"][1]),
        num_audio_token=int(local[0]) // int(shapes["casual_audio_encoder.encoder.conv1_global.conv.weight"][0]),
        audio_inject_layers=tuple(audio_inject_layers),
    )


def infer_vae_config(shapes: Mapping[str, Sequence[int]]) -> VAEConfig:
    """Wan2.1 or Wan2.2 VAE config from official-layout tensor shapes.

    Wan2.2's stages are nested (`encoder.downsamples.0.downsamples.0...`), Wan2.1's flat.
    Only the released stage layout (dim_mult 1,2,4,4, two res blocks) exists, so the widths,
    latent channels and patch size are the free parameters; anything else fails the shape check.
    """
    dim, pixels = (int(n) for n in shapes["encoder.conv1.weight"][:2])
    z_dim = int(shapes["conv2.weight"][0])
    if not any(k.startswith("encoder.downsamples.0.downsamples.") for k in shapes):
        return VAEConfig(dim=dim, z_dim=z_dim)
    return VAE22Config(dim=dim, z_dim=z_dim, dec_dim=int(shapes["decoder.head.2.weight"][1]),
                       patch_size=max(1, round(math.sqrt(pixels / 3))))  # 3 colours x p x p channels


def infer_t5_config(shapes: Mapping[str, Sequence[int]]) -> T5Config:
    """umT5 config from official-layout shapes (the head count is the position table's width)."""
    vocab, dim = shapes["token_embedding.weight"]
    blocks = block_indices(list(shapes))
    first = blocks[0] if blocks else 0
    num_buckets, num_heads = shapes[f"blocks.{first}.pos_embedding.embedding.weight"]
    return T5Config(
        vocab=int(vocab), dim=int(dim), dim_attn=int(shapes[f"blocks.{first}.attn.q.weight"][0]),
        dim_ffn=int(shapes[f"blocks.{first}.ffn.fc1.weight"][0]), num_heads=int(num_heads),
        num_layers=(blocks[-1] + 1) if blocks else 0, num_buckets=int(num_buckets),
    )


def infer_clip_config(shapes: Mapping[str, Sequence[int]]) -> CLIPVisionConfig:
    """Config from the kept `visual.*` shapes (official layout). The head count is not in the
    shapes: head dim 80, as in ViT-H/14, is assumed."""
    dim, _, patch, _ = shapes["visual.patch_embedding.weight"]
    tokens = math.prod(shapes["visual.pos_embedding"]) // int(dim)  # [1, T, D] official, [T, D] transformers
    kept = {int(k.split(".")[2]) for k in shapes if k.startswith("visual.transformer.")}
    side = int(round((tokens - 1) ** 0.5))
    return CLIPVisionConfig(
        image_size=side * int(patch), patch_size=int(patch), dim=int(dim),
        mlp_ratio=int(shapes["visual.transformer.0.mlp.0.weight"][0]) // int(dim),
        num_heads=max(1, int(dim) // 80),
        num_layers=max(kept) + 2,  # the dropped last block counts
    )
