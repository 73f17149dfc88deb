"""LoRA files in the formats in the wild, read into one form: per official DiT module name
(`blocks.3.self_attn.q`), the weight delta's factors.

Formats, told apart by their keys (any of the prefixes `diffusion_model.`,
`model.diffusion_model.`, `transformer.`, `base_model.model.`):
- official / ComfyUI: `blocks.N.self_attn.q.lora_A.weight` + `lora_B` (or `lora_down`/`lora_up`),
  optional `.alpha`; full differences `.diff` (weights, norms) and `.diff_b` (biases), as the
  lightx2v / CausVid step-distillation LoRAs carry, alone or beside a module's LoRA factors
  (W' = W + strength x (diff + scale x up @ down)); `.diff_m` is the difference of a block's (or the
  head's) `modulation` parameter, as lightx2v's LoRA extractor writes it (`blocks.N.diff_m`);
- kohya / musubi-tuner: `lora_unet_blocks_N_self_attn_q.lora_down.weight`, `.lora_up.weight`, `.alpha`;
- diffusers / PEFT: `blocks.N.attn1.to_q.lora_A.weight` (attn1/attn2, to_q/k/v/out.0,
  add_k_proj/add_v_proj, ffn.net.0.proj/ffn.net.2, condition_embedder.*, proj_out); `lora_B.bias`;
- DiffSynth: `blocks.N.self_attn.q.lora_A.default.weight`, also in its Lightning `.ckpt`
  (`state_dict` inside; read with torch.load(weights_only=True));
- LyCORIS LoHa (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`) and LoKr (`lokr_w1` or
  `lokr_w1_a/b`, `lokr_w2` or `lokr_w2_a/b`), with their `.alpha`, in any of the namings above.

Scale = strength x alpha / rank (alpha = rank when the file has none). Every key is applied or
the file is refused, naming the key: a key read and then dropped would change the output unseen.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..loading.layouts import DIFFUSERS_DIT, rename

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")

# Module names that only diffusers uses; such LoRAs map through the checkpoint loader's diffusers table.
_DIFFUSERS_MARKERS = ("attn1", "attn2", "to_q", "to_out", "ffn.net", "condition_embedder", "proj_out", "add_k_proj")

# kohya flattens dots to underscores; official module names rebuilt by pattern.
_KOHYA = [
    # `vace_blocks_N_...`: a VACE model's blocks are named as the main ones, plus its projections
    (r"^((?:vace_)?blocks)_(\d+)_(self_attn|cross_attn)_(q|k|v|o|k_img|v_img|norm_q|norm_k|norm_k_img)$",
     r"\1.\2.\3.\4"),
    (r"^((?:vace_)?blocks)_(\d+)_ffn_(\d+)$", r"\1.\2.ffn.\3"),
    (r"^((?:vace_)?blocks)_(\d+)_(norm3|modulation)$", r"\1.\2.\3"),
    (r"^vace_blocks_(\d+)_(before_proj|after_proj)$", r"vace_blocks.\1.\2"),
    (r"^vace_patch_embedding$", "vace_patch_embedding"),
    (r"^head_modulation$", "head.modulation"),
    (r"^(text_embedding|time_embedding|time_projection)_(\d+)$", r"\1.\2"),
    (r"^img_emb_proj_(\d+)$", r"img_emb.proj.\1"),
    (r"^head_head$", "head.head"),
    (r"^patch_embedding$", "patch_embedding"),
]

# stored suffix -> (role, format)
_SUFFIXES = [
    (".lora_A.default.weight", "down", "diffsynth"), (".lora_B.default.weight", "up", "diffsynth"),
    (".lora_A.weight", "down", None), (".lora_B.weight", "up", None), (".lora_B.bias", "diff_b", None),
    (".lora_down.weight", "down", None), (".lora_up.weight", "up", None),
    (".hada_w1_a", "hada_w1_a", "loha"), (".hada_w1_b", "hada_w1_b", "loha"),
    (".hada_w2_a", "hada_w2_a", "loha"), (".hada_w2_b", "hada_w2_b", "loha"),
    (".lokr_w1", "lokr_w1", "lokr"), (".lokr_w2", "lokr_w2", "lokr"),
    (".lokr_w1_a", "lokr_w1_a", "lokr"), (".lokr_w1_b", "lokr_w1_b", "lokr"),
    (".lokr_w2_a", "lokr_w2_a", "lokr"), (".lokr_w2_b", "lokr_w2_b", "lokr"),
    (".diff_b", "diff_b", None), (".diff_m", "diff_m", None), (".diff", "diff", None), (".alpha", "alpha", None),
]


class LoraError(ValueError):
    """A LoRA that cannot be applied; the message says why in a user's words."""


_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_FACTOR_ROLES = {"down", "up", *_LOHA, "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}


@dataclass
class LoraModule:
    """The factors of one module's delta: `up @ down` (LoRA), a LoHa or LoKr product, and/or a
    full `diff` (added to the product when both are there); `diff_b` adds to the bias.
    Scale = alpha / rank, of the product only."""

    name: str  # official module name, e.g. blocks.0.self_attn.q
    parts: dict[str, Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # role -> the key the file stores it under

    @property
    def factors(self) -> tuple[str | None, tuple[str, ...]]:
        """The low-rank product's kind (lora, loha, lokr; None without a complete one) and the
        roles it reads."""
        p = self.parts
        if "down" in p and "up" in p:
            return "lora", ("down", "up")
        if all(role in p for role in _LOHA):
            return "loha", _LOHA
        w1 = ("lokr_w1",) if "lokr_w1" in p else ("lokr_w1_a", "lokr_w1_b")
        w2 = ("lokr_w2",) if "lokr_w2" in p else ("lokr_w2_a", "lokr_w2_b")
        if all(role in p for role in w1 + w2):
            return "lokr", w1 + w2
        return None, ()

    @property
    def kind(self) -> str:
        product, _ = self.factors
        if product is not None:
            return product
        if _FACTOR_ROLES & set(self.parts):  # e.g. lora_A without lora_B, beside a diff or not
            return "incomplete"
        if "diff" in self.parts:
            return "diff"
        if "diff_b" in self.parts:
            return "bias"
        return "incomplete"

    def unused_roles(self) -> list[str]:
        """Parts the delta does not read (a second factorisation, an alpha with nothing to scale)."""
        product, roles = self.factors
        used = {*roles, "diff", "diff_b", *(["alpha"] if product else [])}
        return [role for role in self.parts if role not in used]

    @property
    def rank(self) -> int | None:
        p = self.parts
        if self.kind == "lora":
            return p["down"].shape[0]
        if self.kind == "loha":
            return p["hada_w1_b"].shape[0]
        if self.kind == "lokr" and "lokr_w2_b" in p:
            return p["lokr_w2_b"].shape[0]
        if self.kind == "lokr" and "lokr_w1_b" in p:
            return p["lokr_w1_b"].shape[0]
        return None

    @property
    def alpha(self) -> float | None:
        return float(self.parts["alpha"]) if "alpha" in self.parts else None

    @property
    def scale(self) -> float:
        """alpha / rank; 1 for full differences and for a LoKr without factored parts."""
        rank = self.rank
        if rank is None:
            return 1.0
        return (self.alpha if self.alpha is not None else rank) / rank

    def added_to(self, weight: Tensor, strength: float) -> Tensor:
        """A new float32 tensor: weight + strength * delta (one fused op for a low-rank LoRA)."""
        if self.kind == "lora" and self.parts["down"].ndim == 2:
            down = self.parts["down"].to(weight.device, torch.float32)
            up = self.parts["up"].to(weight.device, torch.float32)
            weight = torch.addmm(weight, up, down, alpha=strength * self.scale)
            delta = self.parts["diff"].float() if "diff" in self.parts else None
        else:
            delta = self.delta()
        return weight if delta is None else weight + strength * delta.to(weight.device).reshape(weight.shape)

    def delta(self) -> Tensor | None:
        """The full weight delta in float32: the product (scale included) plus `diff` (None for
        a bias-only module)."""
        product = self.product()
        diff = self.parts.get("diff")
        if diff is None:
            return product
        return diff.float() if product is None else product.reshape(diff.shape) + diff.float()

    def product(self) -> Tensor | None:
        """The low-rank product's delta in float32, scale included (None without one)."""
        p = {k: v.float() for k, v in self.parts.items()}
        kind = self.kind
        if kind == "lora":
            down, up = p["down"], p["up"]
            if down.ndim > 2:  # a conv LoRA (patch embedding): [r, in, kt, kh, kw] / [out, r, 1, 1, 1]
                return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * self.scale
            return up @ down * self.scale
        if kind == "loha":
            return (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * self.scale
        if kind == "lokr":
            w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
            w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
            return torch.kron(w1, w2) * self.scale
        return None


@dataclass
class LoraFile:
    """A LoRA read from disk: its format, modules and what base model it was made for."""

    path: Path | None
    format: str
    modules: dict[str, LoraModule]
    sha256: str = ""
    unknown_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors header's __metadata__

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values() if m.rank is not None})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules.values() if m.alpha is not None})

    @property
    def num_blocks(self) -> int | None:
        """Blocks the LoRA reaches (its highest block index + 1)."""
        blocks = [int(m.group(1)) for name in self.modules if (m := re.match(r"blocks\.(\d+)\.", name))]
        return max(blocks) + 1 if blocks else None

    @property
    def width(self) -> int | None:
        """The model width, from an attention projection's input size."""
        for name, module in self.modules.items():
            if re.search(r"\.(self_attn|cross_attn)\.(q|k|v|o)$", name):
                delta_in = module.parts.get("down")
                if delta_in is not None:
                    return delta_in.shape[1]
                if "diff" in module.parts:
                    return module.parts["diff"].shape[1]
        return None

    @property
    def image_conditioned(self) -> bool:
        return any(re.search(r"\.(k_img|v_img|norm_k_img)$", n) or n.startswith("img_emb.") for n in self.modules)

    def describe_base(self) -> str:
        blocks, width = self.num_blocks, self.width
        size = {30: "1.3B", 40: "14B"}.get(blocks or 0) or {1536: "1.3B", 5120: "14B"}.get(width or 0)
        parts = [f"Wan2.1 {size}" if size else "Wan2.1 DiT"]
        if blocks:
            parts.append(f"{blocks} blocks" + ("" if blocks in (30, 40) else " reached"))
        if width:
            parts.append(f"width {width}")
        parts.append("I2V/FLF2V (image cross-attention)" if self.image_conditioned else "T2V or I2V")
        return ", ".join(parts)

    def summary(self) -> str:
        kinds = sorted({m.kind + ("+diff" if m.factors[0] and "diff" in m.parts else "") for m in self.modules.values()})
        lines = [
            f"path:       {self.path}",
            "network:    LoRA for the Wan2.1 DiT",
            f"format:     {self.format} ({', '.join(kinds)})",
            f"modules:    {len(self.modules)}",
            f"rank:       {', '.join(map(str, self.ranks)) or '-'}",
            f"alpha:      {', '.join(f'{a:g}' for a in self.alphas) or '(none: alpha = rank)'}",
            f"base model: {self.describe_base()}",
            f"sha256:     {self.sha256[:16]}",
        ]
        from .defaults import distilled_steps, metadata_defaults

        try:
            settings = metadata_defaults(self.metadata)
        except ValueError as err:
            settings, note = {}, str(err)
        else:
            note = ""
        steps = distilled_steps(self.path.name if self.path else "", self.metadata)
        if settings:
            lines.append("settings:   " + ", ".join(f"{k} {v:g}" if not isinstance(v, str) else f"{k} {v}"
                                                    for k, v in settings.items()) + " (its metadata)")
        elif steps is not None:
            lines.append(f"settings:   looks {steps}-step distilled: try --steps {steps} --guidance 1 --shift 5")
        if note:
            lines.append(f"settings:   {note}")
        return "\n".join(lines)


def read_lora(source: str | Path | dict[str, Tensor]) -> LoraFile:
    """Read a LoRA (.safetensors, or a .ckpt/.pth/.pt opened with weights_only=True, or a state
    dict) into official module names. Raises LoraError for a file that is not a LoRA."""
    path = None
    digest, metadata = "", {}
    if isinstance(source, dict):
        state = source
    else:
        path = Path(source).expanduser()
        state, digest, metadata = _load(path)
    where = str(path) if path else "the LoRA"
    modules: dict[str, LoraModule] = {}
    formats: set[str] = set()
    unknown = []
    for key, tensor in state.items():
        if not isinstance(tensor, Tensor):
            continue
        parsed = _parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        name, role, fmt = parsed
        formats.add(fmt)
        module = modules.setdefault(name, LoraModule(name))
        if role in module.parts:  # e.g. lora_A and lora_down, or two prefixes, for one module
            raise LoraError(f"{where}: {module.keys[role]} and {key} both hold the {role} of {name}; the file holds "
                            "that module twice (mis-converted?)")
        module.parts[role], module.keys[role] = tensor, key
    if not modules:
        sample = ", ".join(list(state)[:4])
        raise LoraError(f"{where}: not a LoRA for the Wan2.1 DiT (no lora_A/lora_B, lora_down/lora_up, LoHa, LoKr or "
                        f"diff keys; it holds {sample or 'nothing'})")
    incomplete = [n for n, m in modules.items() if m.kind == "incomplete"]
    if incomplete:
        raise LoraError(f"{where}: {len(incomplete)} module(s) have only part of a LoRA (e.g. lora_A without lora_B): "
                        f"{', '.join(incomplete[:5])}; the file may be truncated or mis-converted")
    for name, module in modules.items():  # every key is applied, or the file is refused: never a silent drop
        unused = module.unused_roles()
        if unused:
            key = module.keys[unused[0]]
            product, roles = module.factors
            why = (f"an alpha, and {name} has no lora_A/lora_B, LoHa or LoKr factors for it to scale" if unused[0] == "alpha"
                   else f"{name} takes its product from {', '.join(module.keys[r] for r in roles)} ({product}), and a "
                        "module takes one factorisation")
            raise LoraError(f"{where}: key {key} would not be applied: {why}")
    fmt = "+".join(sorted(formats)) if len(formats) > 1 else next(iter(formats))
    return LoraFile(path, fmt, modules, digest, unknown, metadata)


def _load(path: Path) -> tuple[dict[str, Tensor], str, dict[str, str]]:
    from ..loading.files import CheckpointError, _torch_load  # weights_only=True, refuses code

    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from ..loading.files import read_safetensors_header
        header = read_safetensors_header(path)  # a damaged file: "damaged: FILE: what", in one line
        metadata = header.get("__metadata__")
        metadata = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
        try:
            return load_file(str(path)), digest.hexdigest(), metadata
        except Exception as err:  # safetensors raises its own error types
            raise LoraError(f"{path}: not a readable safetensors file ({err})") from None
    if path.suffix in (".ckpt", ".pth", ".pt", ".bin"):
        try:
            obj = _torch_load(path)
        except CheckpointError as err:
            raise LoraError(str(err)) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # a Lightning checkpoint
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise LoraError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
        return obj, digest.hexdigest(), {}
    raise LoraError(f"{path}: unknown LoRA file type; expected .safetensors, .ckpt, .pth or .pt")


def _parse_key(key: str) -> tuple[str, str, str] | None:
    """(official module name, role, format) of a stored key, or None."""
    for suffix, role, fmt in _SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        return None
    for prefix in PREFIXES:
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            break
    if stem.startswith("pipe.dit."):  # DiffSynth's training module
        stem = stem[len("pipe.dit."):]
    if role == "diff_m":  # lightx2v: `blocks.N.diff_m` holds the difference of `blocks.N.modulation`
        stem, role = stem + ("_modulation" if stem.startswith("lora_unet_") else ".modulation"), "diff"
    if stem.startswith("lora_unet_"):
        stem = stem[len("lora_unet_"):]
        for pattern, repl in _KOHYA:
            if re.match(pattern, stem):
                return re.sub(pattern, repl, stem), role, fmt or "kohya"
        return None
    if any(marker in stem for marker in _DIFFUSERS_MARKERS):
        try:
            official = rename(f"{stem}.weight", DIFFUSERS_DIT)
        except KeyError:
            return None
        return (official.removesuffix(".weight"), role, fmt or "diffusers") if isinstance(official, str) else None
    return stem, role, fmt or "official"
