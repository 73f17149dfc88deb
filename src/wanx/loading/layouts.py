"""Key layouts of the Wan2.1 checkpoints in the wild, as rename tables to the official names.

wanx modules use the official names, so an official checkpoint loads as it is. Other
layouts map through a table of full-key regular expressions, first match wins; a
replacement of None drops the key (a tensor the official model does not have).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

# A replacement is the official name, or (official name, i): the i-th slice along dim 0 of a
# tensor the official model stores fused (q, k, v -> to_qkv); None drops the key.
Rule = tuple[str, "str | tuple[str, int] | Callable[[re.Match], str | tuple[str, int]] | None"]

# Prefixes that single-file exporters put before the official names.
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "first_stage_model.", "vae.")
# ComfyUI fp8 exports: a marker tensor, and per-layer scales consumed while dequantising.
COMFY_FP8_MARKERS = ("scaled_fp8",)
FP8_SCALE_SUFFIXES = (".scale_weight", ".scale_input")
# lightx2v's quantized DiTs (`*_int8.safetensors`, `*_fp8.safetensors`, its converter's
# `--quantized`): a quantized Linear's `weight` is int8 or float8_e4m3fn, beside `weight_scale`
# of one float per output channel, `[out, 1]` (symmetric: weight = w8 * scale).
CHANNEL_SCALE_SUFFIX = ".weight_scale"


def _attention_rules(diffusers: str, official: str, extra: Sequence[tuple[str, str]] = ()) -> list[Rule]:
    names = [("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"), ("norm_q", "norm_q"),
             ("norm_k", "norm_k"), *extra]
    return [(rf"blocks\.(\d+)\.{diffusers}\.{re.escape(d)}\.(weight|bias)", rf"blocks.\1.{official}.{o}.\2")
            for d, o in names]


# diffusers `WanTransformer3DModel` -> official `WanModel`.
DIFFUSERS_DIT: list[Rule] = [
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"condition_embedder\.text_embedder\.linear_1\.(weight|bias)", r"text_embedding.0.\1"),
    (r"condition_embedder\.text_embedder\.linear_2\.(weight|bias)", r"text_embedding.2.\1"),
    (r"condition_embedder\.time_embedder\.linear_1\.(weight|bias)", r"time_embedding.0.\1"),
    (r"condition_embedder\.time_embedder\.linear_2\.(weight|bias)", r"time_embedding.2.\1"),
    (r"condition_embedder\.time_proj\.(weight|bias)", r"time_projection.1.\1"),
    (r"condition_embedder\.image_embedder\.norm1\.(weight|bias)", r"img_emb.proj.0.\1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.(weight|bias)", r"img_emb.proj.1.\1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2\.(weight|bias)", r"img_emb.proj.3.\1"),
    (r"condition_embedder\.image_embedder\.norm2\.(weight|bias)", r"img_emb.proj.4.\1"),
    (r"condition_embedder\.image_embedder\.pos_embed", "img_emb.emb_pos"),
    (r"scale_shift_table", "head.modulation"),
    (r"proj_out\.(weight|bias)", r"head.head.\1"),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm3.\2"),  # diffusers swapped norm2/norm3
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.(weight|bias)", r"blocks.\1.ffn.0.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.2\.(weight|bias)", r"blocks.\1.ffn.2.\2"),
    *_attention_rules("attn1", "self_attn"),
    *_attention_rules("attn2", "cross_attn",
                      [("add_k_proj", "k_img"), ("add_v_proj", "v_img"), ("norm_added_k", "norm_k_img")]),
    (r"blocks\.(\d+)\.attn2\.norm_added_q\.weight", None),  # present in some exports, unused
]

# diffusers `WanVACETransformer3DModel` -> official `VaceWanModel`: its `vace_blocks` are named as
# its main blocks, with `proj_in`/`proj_out` for the official `before_proj`/`after_proj`.
DIFFUSERS_DIT += [
    (r"vace_patch_embedding\.(weight|bias)", r"vace_patch_embedding.\1"),
    (r"vace_blocks\.(\d+)\.proj_in\.(weight|bias)", r"vace_blocks.\1.before_proj.\2"),
    (r"vace_blocks\.(\d+)\.proj_out\.(weight|bias)", r"vace_blocks.\1.after_proj.\2"),
    *[("vace_" + pattern, replacement if replacement is None else "vace_" + replacement)
      for pattern, replacement in DIFFUSERS_DIT if pattern.startswith(r"blocks\.")],
]

# Wan2.2-Animate's official files hold the motion encoder's blur kernels (constant buffers of
# LIA's `Blur`, the normalised [1,3,3,1] filter), which wanx builds and does not load.
_BLUR_KERNEL = r"motion_encoder\.enc\.net_app\.convs\.\d+\.(?:conv2|skip)\.0\.kernel"


def official_dit_rules(keys: set[str]) -> list[Rule] | None:
    """Official names as they are (None), less an Animate file's blur kernels."""
    if not any(re.fullmatch(_BLUR_KERNEL, k) for k in keys):
        return None
    return [(_BLUR_KERNEL, None), (r".+", lambda m: m[0])]


_ME, _CONVS = r"motion_encoder\.", "motion_encoder.enc.net_app.convs"
_RES_LEAVES = {"conv1.weight": "conv1.0.weight", "conv1.act_fn.bias": "conv1.1.bias", "conv2.weight": "conv2.1.weight",
               "conv2.act_fn.bias": "conv2.2.bias", "conv_skip.weight": "skip.1.weight"}
_FACE = {"to_q": "linear1_q", "to_k": ("linear1_kv", 0), "to_v": ("linear1_kv", 1), "to_out": "linear2"}


def _face_block(m: re.Match) -> str | tuple[str, int]:
    name = _FACE[m[2]]
    if isinstance(name, tuple):
        return f"face_adapter.fuser_blocks.{m[1]}.{name[0]}.{m[3]}", name[1]
    return f"face_adapter.fuser_blocks.{m[1]}.{name}.{m[3]}"


# diffusers `WanAnimateTransformer3DModel` -> official `WanAnimateModel`: its motion encoder, face
# encoder and face adapter (`to_k`/`to_v` the halves of the official fused `linear1_kv`). Its
# `conv_out` is official conv number (res blocks + 1): `diffusers_dit_rules` adds it per file.
DIFFUSERS_DIT += [
    (r"pose_patch_embedding\.(weight|bias)", r"pose_patch_embedding.\1"),
    (_ME + r"conv_in\.weight", f"{_CONVS}.0.0.weight"),
    (_ME + r"conv_in\.act_fn\.bias", f"{_CONVS}.0.1.bias"),
    (_ME + r"res_blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in _RES_LEAVES) + ")",
     lambda m: f"{_CONVS}.{int(m[1]) + 1}.{_RES_LEAVES[m[2]]}"),
    (_ME + r"motion_network\.(\d+)\.(weight|bias)", r"motion_encoder.enc.fc.\1.\2"),
    (_ME + r"motion_synthesis_weight", "motion_encoder.dec.direction.weight"),
    (r"face_encoder\.(conv1_local|conv2|conv3)\.(weight|bias)", r"face_encoder.\1.conv.\2"),
    (r"face_encoder\.(out_proj\.(?:weight|bias)|padding_tokens)", r"face_encoder.\1"),
    (r"face_adapter\.(\d+)\.(to_q|to_k|to_v|to_out)\.(weight|bias)", _face_block),
    (r"face_adapter\.(\d+)\.norm_(q|k)\.weight", r"face_adapter.fuser_blocks.\1.\2_norm.weight"),
]


def diffusers_dit_rules(keys: set[str]) -> list[Rule]:
    """`DIFFUSERS_DIT`, with an Animate file's `motion_encoder.conv_out` (after its res blocks)."""
    if "motion_encoder.conv_out.weight" not in keys:
        return DIFFUSERS_DIT
    res = len({m[1] for k in keys if (m := re.match(r"motion_encoder\.res_blocks\.(\d+)\.", k))})
    return [*DIFFUSERS_DIT, (_ME + r"conv_out\.weight", f"{_CONVS}.{res + 1}.weight")]


# diffusers `WanAnimate2Transformer3DModel` -> the Wan-Animate-2 release: its blocks lack the
# release's `.block` wrapper and name the attention projections as diffusers does; every other
# tensor keeps the official name (as the package converter,
# `convert_wan_animate_2_transformer_to_diffusers`, maps them the other way).
_ANIMATE2_ATTENTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "norm_q": "norm_q", "norm_k": "norm_k",
                       "add_k_proj": "k_img", "add_v_proj": "v_img", "norm_added_k": "norm_k_img"}
DIFFUSERS_ANIMATE2_DIT: list[Rule] = [
    (r"blocks\.(\d+)\.(self_attn|cross_attn)\.(" + "|".join(re.escape(k) for k in _ANIMATE2_ATTENTION) + r")\.(weight|bias)",
     lambda m: f"blocks.{m[1]}.block.{m[2]}.{_ANIMATE2_ATTENTION[m[3]]}.{m[4]}"),
    (r"blocks\.(\d+)\.(.+)", r"blocks.\1.block.\2"),
    (r".+", lambda m: m[0]),
]


_RESNET_LEAVES = r"(?P<leaf>norm1\.gamma|conv1\.(?:weight|bias)|norm2\.gamma|conv2\.(?:weight|bias)|conv_shortcut\.(?:weight|bias))"
_RESNET_LEAF_NAMES = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
                      "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _resnet_leaf(leaf: str) -> str:
    for diffusers, official in _RESNET_LEAF_NAMES.items():
        if leaf == diffusers or leaf.startswith(diffusers + "."):
            return official + leaf[len(diffusers):]
    raise AssertionError(leaf)


def _up_block(m: re.Match) -> str:
    # diffusers groups the decoder's flat list into stages of 3 res blocks + 1 upsampler.
    index = 4 * int(m["stage"]) + (3 if m["kind"] == "upsamplers" else int(m["i"]))
    rest = _resnet_leaf(m["leaf"]) if m["kind"] == "resnets" else m["rest"]
    return f"decoder.upsamples.{index}.{rest}"


# diffusers `AutoencoderKLWan` -> official `WanVAE_` (Wan2.1 `vae.py`, Wan2.2 `vae2_2.py`): the
# parts both generations share.
_DIFFUSERS_VAE_COMMON: list[Rule] = [
    (r"quant_conv\.(weight|bias)", r"conv1.\1"),
    (r"post_quant_conv\.(weight|bias)", r"conv2.\1"),
    (r"(encoder|decoder)\.conv_in\.(weight|bias)", r"\1.conv1.\2"),
    (r"(encoder|decoder)\.norm_out\.gamma", r"\1.head.0.gamma"),
    (r"(encoder|decoder)\.conv_out\.(weight|bias)", r"\1.head.2.\2"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(?P<rest>.+)", lambda m: f"{m[1]}.middle.1.{m['rest']}"),
    (rf"(encoder|decoder)\.mid_block\.resnets\.(?P<i>[01])\.{_RESNET_LEAVES}",
     lambda m: f"{m[1]}.middle.{2 * int(m['i'])}.{_resnet_leaf(m['leaf'])}"),
]

# Wan2.1 (flat stages).
DIFFUSERS_VAE: list[Rule] = [
    *_DIFFUSERS_VAE_COMMON,
    (rf"encoder\.down_blocks\.(?P<i>\d+)\.{_RESNET_LEAVES}",
     lambda m: f"encoder.downsamples.{m['i']}.{_resnet_leaf(m['leaf'])}"),
    (r"encoder\.down_blocks\.(?P<i>\d+)\.(?P<rest>(?:resample\.1|time_conv)\.(?:weight|bias))",
     lambda m: f"encoder.downsamples.{m['i']}.{m['rest']}"),
    (rf"decoder\.up_blocks\.(?P<stage>\d+)\.(?P<kind>resnets)\.(?P<i>\d+)\.{_RESNET_LEAVES}", _up_block),
    (r"decoder\.up_blocks\.(?P<stage>\d+)\.(?P<kind>upsamplers)\.0\.(?P<rest>(?:resample\.1|time_conv)\.(?:weight|bias))",
     _up_block),
]

# Wan2.2 (`is_residual=True`): stage i's res blocks, then its resampler, nested as in the official
# `Down_ResidualBlock`/`Up_ResidualBlock`. The released layout (2 res blocks per encoder stage, 3
# per decoder stage) puts the resampler at index 2 and 3; the shortcuts have no weights.
DIFFUSERS_VAE22: list[Rule] = [
    *_DIFFUSERS_VAE_COMMON,
    (rf"encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.{_RESNET_LEAVES}",
     lambda m: f"encoder.downsamples.{m['i']}.downsamples.{m['j']}.{_resnet_leaf(m['leaf'])}"),
    (r"encoder\.down_blocks\.(\d+)\.downsampler\.((?:resample\.1|time_conv)\.(?:weight|bias))",
     r"encoder.downsamples.\1.downsamples.2.\2"),
    (rf"decoder\.up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.{_RESNET_LEAVES}",
     lambda m: f"decoder.upsamples.{m['i']}.upsamples.{m['j']}.{_resnet_leaf(m['leaf'])}"),
    (r"decoder\.up_blocks\.(\d+)\.upsampler\.((?:resample\.1|time_conv)\.(?:weight|bias))",
     r"decoder.upsamples.\1.upsamples.3.\2"),
]


def diffusers_vae_rules(keys: set[str]) -> list[Rule]:
    """The Wan2.2 table when the encoder's stages hold `resnets` (nested), else Wan2.1's."""
    nested = any(k.startswith("encoder.down_blocks.") and ".resnets." in k for k in keys)
    return DIFFUSERS_VAE22 if nested else DIFFUSERS_VAE


# transformers `UMT5EncoderModel` (diffusers repos' text_encoder/, ComfyUI umt5 files) -> official T5Encoder.
TRANSFORMERS_T5: list[Rule] = [
    (r"(?:shared|encoder\.embed_tokens)\.weight", "token_embedding.weight"),  # tied copies of one table
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)\.weight", r"blocks.\1.attn.\2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
     r"blocks.\1.pos_embedding.embedding.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.0.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
    (r"encoder\.final_layer_norm\.weight", "norm.weight"),
    (r"spiece_model", None),  # a tokenizer some single-file exports embed as bytes
]


_CLIP_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_CLIP_LAYER = {"out_proj": "attn.proj", "layer_norm1": "norm1", "layer_norm2": "norm2", "mlp.fc1": "mlp.0",
               "mlp.fc2": "mlp.2"}


def _clip_layer(m: re.Match) -> str | tuple[str, int]:
    i, name, part = m["i"], m["name"].removeprefix("self_attn."), m["part"]
    if name in _CLIP_QKV:  # separate q/k/v -> the official fused to_qkv
        return (f"visual.transformer.{i}.attn.to_qkv.{part}", _CLIP_QKV[name])
    return f"visual.transformer.{i}.{_CLIP_LAYER[name]}.{part}"


def _count(keys: set[str], pattern: str) -> int:
    """Number of blocks: 1 + the largest index captured by `pattern` in the keys."""
    return 1 + max(int(m[1]) for k in keys if (m := re.search(pattern, k)))


def transformers_clip_rules(keys: set[str]) -> list[Rule]:
    """transformers `CLIPVisionModel(WithProjection)` (diffusers repos' image_encoder/, ComfyUI
    clip_vision files) -> official `visual.*`, keeping the blocks Wan uses."""
    num_layers = _count(keys, r"encoder\.layers\.(\d+)\.")
    p = r"(?:vision_model\.)?"
    return [
        (rf"{p}encoder\.layers\.{num_layers - 1}\..+", None),
        (rf"{p}embeddings\.class_embedding", "visual.cls_embedding"),
        (rf"{p}embeddings\.patch_embedding\.weight", "visual.patch_embedding.weight"),
        (rf"{p}embeddings\.position_embedding\.weight", "visual.pos_embedding"),
        (rf"{p}embeddings\.position_ids", None),
        (rf"{p}pre_layrnorm\.(weight|bias)", r"visual.pre_norm.\1"),
        (rf"{p}encoder\.layers\.(?P<i>\d+)\.(?P<name>self_attn\.[qkv]_proj|self_attn\.out_proj|layer_norm[12]|mlp\.fc[12])"
         r"\.(?P<part>weight|bias)", _clip_layer),
        (rf"{p}post_layernorm\..+|visual_projection\.weight", None),
    ]


def official_clip_rules(keys: set[str]) -> list[Rule]:
    """Official open-clip XLM-RoBERTa ViT-H/14 file: keep the visual tower up to the blocks Wan
    uses; drop the text tower, the logit scale and what follows the penultimate block."""
    num_layers = _count(keys, r"^visual\.transformer\.(\d+)\.")
    return [
        (rf"visual\.transformer\.{num_layers - 1}\..+", None),
        (r"visual\.(?:post_norm\..+|head|proj)", None),
        (r"visual\..+", lambda m: m[0]),
        (r"textual\..+|log_scale", None),
    ]


@dataclass(frozen=True)
class Detected:
    network: str  # "dit" | "vae" | "t5" | "clip"
    layout: str  # "official" | "diffusers" | "transformers" | "comfyui"
    prefix: str  # stripped from every key
    rules: list[Rule] | None  # None: official names already


# (network, layout, rules, keys that identify it after the prefix is stripped). Rules that depend
# on the file (which CLIP block is the unused last one) are a function of its keys.
_SIGNATURES: list[tuple[str, str, list[Rule] | Callable[[set[str]], list[Rule]] | None, tuple[str, ...]]] = [
    # Before the official signature: diffusers' Animate-2 keeps the official names outside its blocks.
    ("dit", "diffusers", DIFFUSERS_ANIMATE2_DIT,
     ("patch_embedding.weight", "time_projection.1.weight", "blocks.0.self_attn.to_q.weight")),
    ("dit", "official", official_dit_rules, ("patch_embedding.weight", "time_projection.1.weight")),
    ("dit", "diffusers", diffusers_dit_rules, ("patch_embedding.weight", "condition_embedder.time_proj.weight")),
    ("vae", "official", None, ("encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight")),
    ("vae", "diffusers", diffusers_vae_rules, ("encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight")),
    ("t5", "official", None, ("token_embedding.weight", "blocks.0.pos_embedding.embedding.weight")),
    ("t5", "transformers", TRANSFORMERS_T5, ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)),
    ("clip", "official", official_clip_rules, ("visual.patch_embedding.weight", "visual.transformer.0.attn.to_qkv.weight")),
    ("clip", "transformers", transformers_clip_rules, ("vision_model.embeddings.patch_embedding.weight",)),
    ("clip", "transformers", transformers_clip_rules, ("embeddings.patch_embedding.weight", "pre_layrnorm.weight")),
]


# Wan2.2's A14B models are two DiTs alike in every tensor name and shape: which is the
# high-noise and which the low-noise expert only shows in where each is kept.
EXPERT_FOLDERS = {"high_noise_model": "high", "low_noise_model": "low"}  # official (wan/configs)
DIFFUSERS_EXPERTS = {"transformer": "high", "transformer_2": "low"}  # diffusers' WanPipeline components
EXPERT_NAMES = ("high", "low")


def expert_of(path: str | Path) -> str | None:
    """"high" or "low" for one expert of a Wan2.2 A14B model, from where its weights are: an
    official `high_noise_model/` / `low_noise_model/` folder, diffusers' `transformer/` beside a
    `transformer_2/`, or a file named like ComfyUI's `wan2.2_t2v_high_noise_14B_fp16.safetensors`
    or QuantStack's `Wan2.2-T2V-A14B-HighNoise-Q4_K_S.gguf`.
    None when the place does not say (a Wan2.1 DiT, or an expert file under another name)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if folder.name in EXPERT_FOLDERS:
        return EXPERT_FOLDERS[folder.name]
    if folder.name in DIFFUSERS_EXPERTS and (folder.parent / "transformer_2").is_dir():
        return DIFFUSERS_EXPERTS[folder.name]
    if not path.is_dir():  # ComfyUI's high_noise; QuantStack's GGUFs write HighNoise
        name = path.name.lower().replace("-", "").replace("_", "")
        for expert in EXPERT_NAMES:
            if f"{expert}noise" in name:
                return expert
    return None


def expert_folders(folder: str | Path) -> list[Path]:
    """The high- and the low-noise expert's folders of a Wan2.2 A14B model folder (official
    or diffusers), or [] for any other path."""
    folder = Path(folder)
    for names in (EXPERT_FOLDERS, DIFFUSERS_EXPERTS):
        found = [folder / name for name in names]
        if all(p.is_dir() for p in found):
            return found
    return []


def detect(keys: Iterable[str]) -> Detected | None:
    """Which network and layout a set of tensor names is, or None for a non-Wan file."""
    keys = set(keys)
    for prefix in ("", *COMFY_PREFIXES):
        stripped = {k[len(prefix):] for k in keys if k.startswith(prefix)}
        for network, layout, rules, signature in _SIGNATURES:
            if all(s in stripped for s in signature):
                if callable(rules):
                    rules = rules(stripped)
                comfy = bool(prefix) or any(k in keys for k in COMFY_FP8_MARKERS)
                return Detected(network, "comfyui" if comfy and layout == "official" else layout, prefix, rules)
    return None


def rename(key: str, rules: list[Rule] | None) -> str | tuple[str, int] | None:
    """Official name of `key` (None: drop it; (name, i): slice i of a fused tensor).
    Raises KeyError when no rule matches."""
    if rules is None:
        return key
    for pattern, replacement in rules:
        m = re.fullmatch(pattern, key)
        if m:
            if replacement is None:
                return None
            return replacement(m) if callable(replacement) else m.expand(replacement)
    raise KeyError(key)
