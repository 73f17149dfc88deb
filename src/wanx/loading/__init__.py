"""Loading Wan2.1 checkpoints: detect the network, layout and config from tensor names and
shapes, build the module on the meta device and assign the weights (no second copy).

    model = wanx.load_model("Wan2.1-T2V-1.3B")                 # folder: the DiT
    vae = wanx.load_model("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth", dtype=torch.bfloat16)
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..models import keeps_fp32
from ..configs import (
    RELEASED_HEAD_DIM, CLIPVisionConfig, DiTConfig, T5Config, VAE22Config, VAEConfig, infer_clip_config,
    infer_dit_config, infer_t5_config, infer_vae_config, preset_name,
)
from .distilled import Distilled, find as find_distilled
from .files import FP8_DTYPES, CheckpointError, DamagedCheckpoint, TensorStore, open_checkpoint
from .layouts import CHANNEL_SCALE_SUFFIX, COMFY_FP8_MARKERS, FP8_SCALE_SUFFIXES, Detected, detect, expert_of, rename

__all__ = ["CheckpointError", "DamagedCheckpoint", "CheckpointInfo", "inspect_checkpoint", "load_model"]

# What errors call a network before its config is known (`CheckpointInfo.name` after: "Wan2.2 VAE").
NETWORK_NAMES = {"dit": "Wan DiT", "vae": "Wan VAE", "t5": "umT5 text encoder", "clip": "CLIP ViT image encoder"}


@dataclass
class CheckpointInfo:
    """What a checkpoint is, read from its headers (no weights loaded for safetensors)."""

    path: Path
    files: list[Path]
    network: str  # "dit" | "vae" | "t5"
    layout: str  # "official" | "diffusers" | "transformers" | "comfyui"
    config: DiTConfig | VAEConfig | T5Config | CLIPVisionConfig
    dtypes: dict[str, int]  # dtype name -> number of parameters stored in it
    num_params: int
    fp8_scaled: bool = False
    channel_scaled: bool = False  # lightx2v's int8/fp8 weights with a per-channel `weight_scale`
    # official name -> stored name(s); several are concatenated along dim 0 in order
    names: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    expert: str | None = None  # a Wan2.2 A14B expert: "high" or "low" noise (from where it is kept)
    distilled: Distilled | None = None  # step/CFG-distilled, as its metadata, config.json or model card says
    gguf: str | None = None  # a GGUF file: its architecture, quant types with tensor counts, bytes (one line)

    @property
    def name(self) -> str:
        """The network as `wanx info` and errors call it: "Wan2.1 VAE", "Wan2.2 VAE", ..."""
        if isinstance(self.config, VAEConfig):
            return f"Wan{self.config.generation} VAE"
        if isinstance(self.config, DiTConfig):
            return f"{generation(self.config, self.expert)} DiT"
        return NETWORK_NAMES[self.network]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype most weights are stored in; fp8 and int8 storage compute in bf16."""
        name = max(self.dtypes, key=self.dtypes.get)
        dtype = getattr(torch, name, None)  # None: a GGUF quant type ("Q4_0"), computed in bf16
        return torch.bfloat16 if dtype is None or dtype in FP8_DTYPES or dtype == torch.int8 else dtype

    def summary(self) -> str:
        cfg = self.config
        kind = f"{self.name} {cfg.model_type}" if isinstance(cfg, DiTConfig) else self.name
        preset = preset_name(cfg)
        fields = ", ".join(f"{k}={v}" for k, v in vars(cfg).items())
        storage = ", ".join(f"{d} ({n:,} params)" for d, n in sorted(self.dtypes.items(), key=lambda x: -x[1]))
        lines = [
            f"path:       {self.path}",
            f"files:      {len(self.files)} ({', '.join(f.name for f in self.files[:3])}{', ...' if len(self.files) > 3 else ''})",
            f"network:    {kind}",
            f"layout:     {self.layout}{' (fp8 scaled)' if self.fp8_scaled else ''}"
            f"{' (lightx2v per-channel weight_scale)' if self.channel_scaled else ''}",
            *([f"model:      {model_name(cfg, self.expert)}"] if isinstance(cfg, DiTConfig) else []),
            f"preset:     {preset or '(custom)'}",
            f"config:     {type(cfg).__name__}({fields})",
            f"dtype:      {storage}",
            f"parameters: {self.num_params:,} ({count_in_words(self.num_params)})",
            *([f"sampling:   {self.distilled.summary()}"] if self.distilled else []),
            *([f"gguf:       {self.gguf}"] if self.gguf else []),
        ]
        return "\n".join(lines)


def count_in_words(n: int) -> str:
    """A parameter count as model cards give it: 1.42 B, 4.86 M, 12.3 K (three figures)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale * 0.9995:  # 999,999 is 1.00 M, not 1000 K
            return f"{n / scale:.3g} {unit}" if n < scale * 999.5 else f"{n / scale:.0f} {unit}"
    return str(n)


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Identify a checkpoint: network, layout, config, dtypes, parameter count (and for a DiT
    kept as one of Wan2.2's two experts, which one)."""
    store = open_checkpoint(path)
    try:
        info = _identify(store)
    finally:
        store.close()
    if info.network == "dit":
        info.expert = expert_of(path)
        info.distilled = find_distilled(store.metadata, store.files, Path(path).expanduser(), store.config_json)
    return info


# Released DiTs by preset; t2v-14B's architecture is also each expert of Wan2.2 T2V-A14B.
RELEASES = {"animate-14B": "Wan2.2 Animate-14B", "s2v-14B": "Wan2.2 S2V-14B", "vace-1.3B": "Wan2.1 VACE-1.3B", "vace-14B": "Wan2.1 VACE-14B", "vace-A14B": "Wan2.2 VACE-Fun A14B",
            "t2v-1.3B": "Wan2.1 T2V-1.3B", "t2v-14B": "Wan2.1 T2V-14B", "i2v-14B": "Wan2.1 I2V-14B (480P or 720P)",
            "flf2v-14B": "Wan2.1 FLF2V-14B", "t2v-A14B": "Wan2.2 T2V-A14B", "i2v-A14B": "Wan2.2 I2V-A14B",
            "ti2v-5B": "Wan2.2 TI2V-5B"}


def generation(cfg: DiTConfig, expert: str | None = None) -> str:
    """"Wan2.2" for what only Wan2.2 has (an expert, I2V without CLIP, TI2V, Animate, S2V), else "Wan2.1"."""
    return "Wan2.2" if expert or not cfg.clip or cfg.model_type in ("ti2v", "animate", "s2v") else "Wan2.1"


def model_name(cfg: DiTConfig, expert: str | None = None) -> str:
    """The generation, model and expert a DiT config is, in words: "Wan2.2 T2V-A14B, high-noise
    expert". A 14B T2V DiT kept nowhere that tells is either Wan2.1 T2V-14B or one A14B expert."""
    preset = preset_name(cfg)
    if preset == "t2v-14B" and expert:
        preset = "t2v-A14B"
    if preset == "vace-14B" and expert:
        preset = "vace-A14B"
    if preset in RELEASES:
        name = RELEASES[preset]
    else:
        name = f"{generation(cfg, expert)} {cfg.model_type.upper()} DiT of another size ({preset or 'custom'})"
    if expert:
        return f"{name}, {expert}-noise expert"
    if preset == "t2v-14B":
        return f"{name} (or one expert of Wan2.2 T2V-A14B: the weights do not say which)"
    if preset == "i2v-A14B":
        return f"{name}, one expert (high or low noise: the weights do not say which)"
    return name


def load_model(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               quantize: str | None = None, progress: bool = False) -> nn.Module:
    """Load a Wan2.1 network from a file, shard set or model folder (a folder means its DiT).

    dtype: compute dtype of the weights (default: as stored; fp8 storage -> bf16). Parameters
    the model declares in `keep_in_fp32` stay float32 whatever the dtype.
    quantize: "fp8" (or "fp8_fast": torch._scaled_mm on GPUs with FP8 tensor cores) stores the
    block Linear weights as float8_e4m3fn with per-channel scales (`wanx.memory.fp8`),
    quantized tensor by tensor as they are read, so no float copy of the model ever exists;
    fp8 files (ComfyUI fp8_e4m3fn / fp8_scaled, lightx2v `*_fp8`) go into FP8 layers as stored.
    "int8": the same layers in int8 with per-channel scales (`wanx.memory.int8`), quantized as
    read; lightx2v's `*_int8` files go into them as stored. Default: FP8 layers when the file
    stores its weights in fp8, INT8 layers when it holds int8 ones; "none" dequantises such
    files to `dtype`.
    GGUF files: by default the block Linear weights stored quantized stay packed in GGUFLinear
    layers (`wanx.memory.gguf`, dequantized per call); other tensors are dequantized to `dtype`;
    "none" dequantizes everything, "fp8" re-quantizes the dequantized weights to fp8.
    progress: a bar per tensor.
    """
    from ..memory.fp8 import FP8Linear, fp8_layer_names, quantize_fp8
    from ..memory.int8 import Int8Linear, quantize_int8

    if quantize not in (None, "none", "fp8", "fp8_fast", "int8"):
        raise ValueError(f"quantize must be 'fp8', 'fp8_fast', 'int8' or 'none', got {quantize!r}")
    store = open_checkpoint(path)
    try:
        info = _identify(store)
        model = _build(info)
        _check_tensors(info, store, model)
        keep_fp32 = getattr(model, "keep_in_fp32", ())
        target = dtype or info.compute_dtype
        items = model.state_dict().items()
        stored_fp8 = getattr(torch, max(info.dtypes, key=info.dtypes.get), None) in FP8_DTYPES
        if quantize is None and stored_fp8:
            quantize = "fp8"
        elif quantize is None and "int8" in info.dtypes:  # lightx2v int8: kept int8, whatever else it holds
            quantize = "int8"
        # The layers stored quantized (FP8 or INT8, the same ones): filled from the file as read.
        fp8_layers = set(fp8_layer_names(model)) if quantize in ("fp8", "fp8_fast", "int8") else set()
        if quantize == "int8":  # on the meta device: only the module types change here
            quantize_int8(model, compute_dtype=target)
        elif fp8_layers:
            quantize_fp8(model, compute_dtype=target, fast=quantize == "fp8_fast")
        # GGUF: block Linear weights stored quantized stay packed (GGUFLinear) unless asked for fp8 or "none"
        gguf_layers = _swap_gguf(model, info, store, target) if store.qtypes and quantize is None else set()
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(items, desc=f"loading {info.name}", unit="tensor", leave=False)
        state = {}
        for name, meta in items:
            layer, _, leaf = name.rpartition(".")
            if layer in fp8_layers and leaf == "weight":
                weight, scale = _read_parts(store, info.names[name], dequantize=False)
                module: FP8Linear | Int8Linear = model.get_submodule(layer)
                module.set_weight(weight.reshape(meta.shape).to(device), scale=None if scale is None else scale.to(device))
                continue
            if layer in gguf_layers and leaf == "weight":
                model.get_submodule(layer).set_weight(store._packed[info.names[name][0]].to(device))
                continue
            tensor = _read_parts(store, info.names[name])[0].reshape(meta.shape)
            want = torch.float32 if keeps_fp32(name, keep_fp32) else target
            state[name] = tensor.to(device=device, dtype=want if meta.is_floating_point() else meta.dtype)
        model.load_state_dict(state, assign=True, strict=not (fp8_layers or gguf_layers))
    finally:
        store.close()
    return model.eval()


# ---------------------------------------------------------------------------------------


def _swap_gguf(model: nn.Module, info: CheckpointInfo, store: TensorStore, compute_dtype: torch.dtype) -> set[str]:
    """On the meta model, the block Linear layers (as FP8 picks them) whose GGUF weight is
    quantized become GGUFLinear of that type; returns their names."""
    from ..memory.fp8 import fp8_layer_names
    from ..memory.gguf import GGUFLinear

    swapped = set()
    for name in fp8_layer_names(model):
        stored = info.names.get(name + ".weight", ())
        if len(stored) != 1 or stored[0] not in store.qtypes:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        setattr(parent, attr, GGUFLinear(linear.in_features, linear.out_features, store.qtypes[stored[0]],
                                         linear.bias is not None, compute_dtype=compute_dtype, device="meta"))
        swapped.add(name)
    return swapped


def _identify(store: TensorStore) -> CheckpointInfo:
    found = detect(store.keys())
    if found is None and any(k.endswith("vace_patch_embedding.weight") for k in store.keys()):
        raise CheckpointError(
            f"{store.path}: only the VACE blocks of a VACE model (a \"VACE module\" file, without the T2V DiT it is "
            "added to); wanx loads whole VACE models: use the full Wan2.1-VACE (or Wan2.2 VACE-Fun) DiT file"
        )
    if found is None:
        sample = ", ".join(store.keys()[:4])
        raise CheckpointError(
            f"{store.path}: not a Wan2.1 checkpoint (no DiT, VAE or umT5 tensor names found; it holds {sample}, ...)"
        )
    names, unmapped = _official_names(store, found)
    if unmapped:
        raise CheckpointError(
            f"{store.path}: {found.layout} {NETWORK_NAMES[found.network]}: {len(unmapped)} tensor(s) with unknown names: "
            f"{', '.join(unmapped[:5])}"
        )
    shapes = {official: _stored_shape(store, parts) for official, parts in names.items()}
    try:
        config = _infer_config(found.network, shapes, store)
    except KeyError as err:
        raise CheckpointError(
            f"{store.path}: {found.layout} {NETWORK_NAMES[found.network]} is missing tensor {err.args[0]!r}"
        ) from None
    counts: Counter[str] = Counter()
    for stored in (key for parts in names.values() for key in parts):
        kind = store.qtypes.get(stored) or str(store.dtypes[stored]).removeprefix("torch.")
        counts[kind] += math.prod(store.shapes[stored])
        if problem := _unknown_scale(store, stored):
            raise CheckpointError(f"{store.path}: {problem}")
    return CheckpointInfo(
        path=store.path, files=store.files, network=found.network, layout="gguf" if store.gguf else found.layout,
        config=config, dtypes=dict(counts), num_params=sum(counts.values()),
        fp8_scaled=any(k.endswith(FP8_SCALE_SUFFIXES[0]) for k in store.keys()),
        channel_scaled=any(k.endswith(CHANNEL_SCALE_SUFFIX) for k in store.keys()), names=names,
        gguf=_gguf_line(store) if store.gguf else None,
    )


def _unknown_scale(store: TensorStore, weight: str) -> str | None:
    """What is wrong with an int8 or fp8 `weight` whose scale is not lightx2v's per-channel one
    (int8 without any scale; int8 or fp8 with a block-wise or per-tensor `weight_scale`, as
    lightx2v's 128x128-block files write), or None. An fp8 weight without `weight_scale` is
    ComfyUI's (no scale, or its `scale_weight`)."""
    dtype = store.dtypes[weight]
    key = weight + "_scale"
    if not (dtype == torch.int8 or (dtype in FP8_DTYPES and key in store.shapes)) or _channel_scale(store, weight):
        return None
    kind = str(dtype).removeprefix("torch.")
    shape = list(store.shapes[weight])
    if key not in store.shapes:
        found = f"no {key}"
    else:
        scale = list(store.shapes[key])
        layout = "per-tensor" if math.prod(scale) == 1 and len(scale) < 2 else \
            "block-wise" if len(scale) == 2 and len(shape) == 2 else "unknown"
        found = f"{key} is {scale}: {layout} scales"
    return (f"{weight} is stored as {kind} without a per-channel scale ({found}); wanx reads int8/fp8 weights "
            f"with one float scale per output channel ([{shape[0]}] or [{shape[0]}, 1], as lightx2v's per-channel "
            "files), or fp8 as ComfyUI writes it: a quantized layout wanx does not know")


def _channel_scale(store: TensorStore, weight: str) -> str | None:
    """The key of `weight`'s lightx2v per-channel scale, when `weight` is an int8 or fp8 matrix
    with a float `weight_scale` of one value per output channel beside it; else None (a scale
    of any other shape, or beside a float weight, is a layout wanx does not know: left to be
    refused as an unexpected tensor)."""
    key = weight + "_scale"
    if not weight.endswith(".weight") or key not in store.shapes or len(store.shapes.get(weight, ())) != 2:
        return None
    out = store.shapes[weight][0]
    quantized = store.dtypes[weight] == torch.int8 or store.dtypes[weight] in FP8_DTYPES
    per_channel = tuple(store.shapes[key]) in ((out,), (out, 1)) and store.dtypes[key].is_floating_point
    return key if quantized and per_channel else None


def _gguf_line(store: TensorStore) -> str:
    """'architecture wan; Q4_0 x 240, F32 x 90; 1.2 GB of tensors': what a GGUF holds."""
    from ..memory.gguf import packed_bytes

    kinds: Counter[str] = Counter()
    size = 0
    for key, shape in store.shapes.items():
        kind = store.qtypes.get(key) or {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[
            str(store.dtypes[key]).removeprefix("torch.")]
        kinds[kind] += 1
        size += packed_bytes(kind, shape)
    types = ", ".join(f"{k} x {n}" for k, n in kinds.most_common())
    return f"architecture {store.metadata.get('general.architecture')}; {types} tensors; {size:,} bytes of tensors"



def _official_names(store: TensorStore, found: Detected) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    names: dict[str, tuple[str, ...]] = {}
    parts: dict[str, dict[int, str]] = {}
    unmapped = []
    for stored in store.keys():
        if stored in COMFY_FP8_MARKERS or stored.endswith(FP8_SCALE_SUFFIXES):
            continue  # consumed by `_read`
        if stored.endswith(CHANNEL_SCALE_SUFFIX) and _channel_scale(store, stored.removesuffix("_scale")) == stored:
            continue  # consumed by `_read`
        if not stored.startswith(found.prefix):
            unmapped.append(stored)
            continue
        try:
            official = rename(stored[len(found.prefix):], found.rules)
        except KeyError:
            unmapped.append(stored)
            continue
        if isinstance(official, tuple):  # one slice of a fused official tensor
            parts.setdefault(official[0], {})[official[1]] = stored
        elif official is not None:
            names[official] = (stored,)
    for official, pieces in parts.items():
        names[official] = tuple(pieces[i] for i in sorted(pieces))
    return names, unmapped


def _stored_shape(store: TensorStore, parts: tuple[str, ...]) -> tuple[int, ...]:
    first = store.shapes[parts[0]]
    if len(parts) == 1:
        return tuple(first)
    return (sum(store.shapes[p][0] for p in parts), *first[1:])


def _same_shape(stored: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Equal, or equal once singleton dims are dropped ([D] stored for [1, 1, D]; diffusers' [C]
    for the official Animate motion encoder's [1, C, 1, 1] biases)."""
    def strip(shape):
        return [n for n in shape if n != 1]

    return tuple(stored) == tuple(expected) or strip(stored) == strip(expected)


def _infer_config(network: str, shapes: dict, store: TensorStore) -> DiTConfig | VAEConfig | T5Config | CLIPVisionConfig:
    if network == "vae":
        return infer_vae_config(shapes)
    if network == "t5":
        return infer_t5_config(shapes)
    if network == "clip":
        return infer_clip_config(shapes)
    cfg_json = store.config_json or {}
    heads = cfg_json.get("num_heads") or cfg_json.get("num_attention_heads")
    dim = shapes["patch_embedding.weight"][0]
    if not heads and dim % RELEASED_HEAD_DIM:
        raise CheckpointError(
            f"{store.path}: cannot tell the head count of a DiT of width {dim} (released models use head dim "
            f"{RELEASED_HEAD_DIM}); put a config.json with \"num_heads\" beside the weights"
        )
    try:
        # The text is zero-padded to text_len before the text MLP and cross-attention sees every
        # position, so a model trained at another length (the demo's 32) must keep it.
        return infer_dit_config(shapes, num_heads=heads, num_layers=cfg_json.get("num_layers"),
                                text_len=cfg_json.get("text_len"), vace_layers=cfg_json.get("vace_layers"),
                                audio_inject_layers=cfg_json.get("audio_inject_layers"))
    except ValueError as err:
        raise CheckpointError(f"{store.path}: {err}") from None


def _build(info: CheckpointInfo) -> nn.Module:
    from ..models.clip import CLIPVisionEncoder
    from ..models.t5 import UMT5Encoder
    from ..models.transformer import WanDiT
    from ..models.vae import WanVAE
    from ..models.vae22 import WanVAE22

    vae = WanVAE22 if isinstance(info.config, VAE22Config) else WanVAE
    builder = {"dit": WanDiT, "vae": vae, "t5": UMT5Encoder, "clip": CLIPVisionEncoder}[info.network]
    with torch.device("meta"):
        return builder(info.config)


def _check_tensors(info: CheckpointInfo, store: TensorStore, model: nn.Module) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in info.names]
    unexpected = ["+".join(info.names[k]) for k in info.names if k not in expected]
    mismatched = [
        f"{'+'.join(info.names[k])} {list(_stored_shape(store, info.names[k]))} (model {list(v.shape)})"
        for k, v in expected.items()
        if k in info.names and not _same_shape(_stored_shape(store, info.names[k]), tuple(v.shape))
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})")
    if mismatched:
        problems.append(f"{len(mismatched)} mis-shaped ({'; '.join(mismatched[:3])})")
    if problems:
        raise CheckpointError(
            f"{store.path}: {info.layout} layout {info.name} does not match the inferred config: "
            + "; ".join(problems)
        )


def _read_parts(store: TensorStore, parts: tuple[str, ...], *, dequantize: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tensor, scale): one stored tensor, or several concatenated along dim 0 (dequantised
    when fused: per-tensor fp8 scales cannot be kept across a concatenation)."""
    if len(parts) == 1:
        return _read(store, parts[0], dequantize=dequantize)
    return torch.cat([_read(store, p)[0] for p in parts], dim=0), None


def _read(store: TensorStore, stored: str, *, dequantize: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tensor, scale): a stored tensor and its ComfyUI `scale_weight` or lightx2v per-channel
    `weight_scale` (as `[out, 1]`) if it has one. With `dequantize`, fp8 and int8 weights come
    back as float (scaled) and the scale as None."""
    tensor = store.get(stored)
    scale = None
    if tensor.dtype in FP8_DTYPES or tensor.dtype == torch.int8:
        scale_key = stored.removesuffix(".weight") + FP8_SCALE_SUFFIXES[0]
        channel_key = _channel_scale(store, stored)
        if channel_key is not None:
            scale = store.get(channel_key).float().reshape(-1, 1)
        elif scale_key in store.shapes:
            scale = store.get(scale_key).float()
        if dequantize:
            tensor, scale = (tensor.float() * scale if scale is not None else tensor.to(torch.bfloat16)), None
    return tensor, scale
