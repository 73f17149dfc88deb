"""Apply, re-weight and remove LoRAs on a built WanDiT, checked before anything changes.

Live (the default on an FP8, GGUF or streamed base): adapters added to each layer's output
(`layer.LoraAdapter`). Fused (the default on a resident bf16/fp32 base): W += strength x delta
in float32, cast back (an FP8 layer is dequantised, merged and requantized); the original
tensors are kept (a reference when they are memory-mapped, a CPU copy otherwise) so removing a
LoRA restores them bit for bit instead of subtracting. Norm and modulation differences (`.diff`
of a non-Linear) are always fused: they are tiny (on a streamed model, into the streamer's host
copies: `BlockStreamer.replace`).
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..memory import int8
from ..memory.fp8 import FP8Linear, quantize_weight
from ..memory.gguf import GGUFLinear
from ..memory.int8 import Int8Linear

QUANTIZED = (FP8Linear, Int8Linear)  # weight * per-channel scale: live adapters by default, fused = requantized
from ..memory.streaming import compute_device, streamer_of
from .formats import LoraError, LoraFile, LoraModule, read_lora
from .layer import LoraAdapter, adapter_of, attach, detach


@dataclass(frozen=True)
class Ramp:
    """A strength that goes linearly from `start` (first step) to `end` (last step), whatever
    the number of steps: `apply_lora(dit, path, Ramp(1.0, 0.5))`, `--lora PATH:1.0-0.5`."""

    start: float
    end: float

    def values(self, steps: int) -> list[float]:
        if steps == 1:
            return [self.start]
        return [self.start + (self.end - self.start) * i / (steps - 1) for i in range(steps)]

    def __str__(self) -> str:
        return f"{self.start:g}-{self.end:g}"


Strength = float | Sequence[float] | Ramp  # one for every step, one per step, or a ramp over the steps


def strength_schedule(strength: Strength) -> tuple[float, list[float] | Ramp | None]:
    """(the strength of the first step, the per-step schedule or None for a fixed strength);
    raises LoraError for a strength that is not finite or an empty list."""
    if isinstance(strength, Ramp):
        values, schedule = [strength.start, strength.end], strength
    elif isinstance(strength, (int, float)):
        values, schedule = [float(strength)], None
    else:
        values = schedule = [float(v) for v in strength]
        if not values:
            raise LoraError("a per-step LoRA strength needs one value per denoising step; the list is empty")
    if not all(math.isfinite(v) for v in values):
        raise LoraError(f"a LoRA strength must be a finite number, got {strength!r}")
    return values[0], schedule


def describe_strength(strength: float, schedule: list[float] | Ramp | None) -> str:
    if schedule is None:
        return f"strength {strength:g}"
    if isinstance(schedule, Ramp):
        return f"strength {schedule} over the steps"
    return f"strength per step {','.join(f'{v:g}' for v in schedule)}"


@dataclass
class LoraReport:
    name: str
    format: str
    matched: int
    modules: int
    ranks: list[int]
    strength: float
    fused: bool
    sha256: str = ""
    keys: int = 0  # tensors in the file
    applied_keys: int = 0  # of them, applied (all unless loaded with partial=True)
    not_applied: list[str] = field(default_factory=list)  # the keys left out (partial=True)
    schedule: list[float] | Ramp | None = None  # per-step strengths

    def __str__(self) -> str:
        rank = "/".join(map(str, self.ranks)) or "full"
        line = (f"LoRA {self.name}: {self.format} format, {self.matched}/{self.modules} modules matched, rank {rank}, "
                f"{describe_strength(self.strength, self.schedule)}, {'fused' if self.fused else 'live'}")
        if self.not_applied:
            line += (f"; partial: {self.applied_keys}/{self.keys} tensors applied, not applied: "
                     f"{_leftover_summary(self.not_applied)}")
        return line


@dataclass
class _Loaded:
    lora: LoraFile
    strength: float
    fused: bool
    targets: dict[str, nn.Module | nn.Parameter]
    report: LoraReport
    schedule: list[float] | Ramp | None = None  # per-step strengths (live adapters only)


# model -> {name: its loaded LoRA}, in load order (weak: a dropped model is not kept alive).
_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def loaded_loras(dit: nn.Module) -> dict[str, _Loaded]:
    """The LoRAs loaded on `dit`, by name, in load order (the registry itself: do not change it)."""
    return _LOADED.setdefault(dit, {})


def apply_lora(dit: nn.Module, source: str | Path | dict | LoraFile, strength: Strength = 1.0, *,
               fuse: bool | None = None, name: str | None = None, streamed: bool | None = None,
               device: torch.device | str | None = None, partial: bool = False) -> LoraReport:
    """Apply a LoRA to `dit` (see module doc). Nothing changes when a check fails. name: default
    the file's stem, or where a loaded LoRA has it, more of its path (`lora_names`).
    strength: a number, one per denoising step (a list), or a `Ramp(start, end)`; a per-step
    strength loads live (the pipeline sets each step's value on the adapters: `lora_steps`).
    streamed: whether the model's weights are streamed block by block (no fusing then);
    device: where it computes (a live LoRA's adapters are made there). Both default to what
    `memory.streaming` records for the model (`streamer_of`, `compute_device`).
    partial: apply the modules this model has and leave the others (e.g. a Wan2.1 I2V LoRA's
    image cross-attention on Wan2.2), naming them in the report; default: such a LoRA is refused."""
    strength, schedule = strength_schedule(strength)
    lora = source if isinstance(source, LoraFile) else read_lora(source)
    loaded = loaded_loras(dit)
    if name is None and lora.path is not None:
        again = [n for n, entry in loaded.items() if entry.lora.path is not None and _same_file(entry.lora.path, lora.path)]
        if again:  # e.g. a notebook cell run twice: stacking it twice would be a quiet surprise
            raise LoraError(f"{lora.path} is loaded already (as {again[0]!r}): unload it first, or give a name to "
                            "load it twice")
        name = lora_names([lora.path], taken=loaded)[0]
    name = name or f"lora{len(loaded)}"
    if name in loaded:
        raise LoraError(f"a LoRA named {name!r} is loaded already: unload it first, or give another name")
    targets = match(dit, lora, partial=partial)
    if streamed is None:
        streamed = streamer_of(dit) is not None
    fp8 = any(isinstance(t, QUANTIZED) for t in targets.values())
    packed = any(isinstance(t, GGUFLinear) for t in targets.values())
    if fuse and packed:
        raise LoraError("a GGUF base keeps its weights packed: fusing would dequantize, add and re-quantize them "
                        "(a second, lossy rounding); load the LoRA live (fuse=False, the default)")
    if schedule is not None and fuse:
        raise LoraError("a per-step LoRA strength changes between steps on the live adapters: load it with "
                        "fuse=False (or leave fuse unset)")
    if fuse is None:
        fuse = not (streamed or fp8 or packed or schedule is not None)
    if fuse and streamed:
        raise LoraError("a streamed model keeps its weights off the device between blocks: load the LoRA live "
                        "(fuse=False), or without offloading to fuse it")
    left = not_applied(lora, targets)
    keys = sum(len(m.keys) for m in lora.modules.values()) + len(lora.unknown_keys)
    report = LoraReport(name, lora.format, len(targets), len(lora.modules), lora.ranks, float(strength), fuse, lora.sha256,
                        keys=keys, applied_keys=keys - len(left), not_applied=left, schedule=schedule)
    loaded[name] = _Loaded(lora, float(strength), fuse, targets, report, schedule)
    if fuse:
        _rebuild_fused_weights(dit, set(targets.values()))
    else:
        # On a streamed model the weights wait in host memory between blocks; the adapters are
        # small and stay resident where the blocks compute.
        device = compute_device(dit) if device is None else torch.device(device)
        for module_name, target in targets.items():
            if _is_linear(target):
                dtype = target.compute_dtype if isinstance(target, (*QUANTIZED, GGUFLinear)) else target.weight.dtype
                attach(target, name, LoraAdapter(lora.modules[module_name], strength, device=device, dtype=dtype))
        _rebuild_fused_weights(dit, {t for t in targets.values() if not _is_linear(t)})
    return report


def apply_to_experts(experts: dict[str, nn.Module], source, strength: Strength = 1.0, *, expert: str | None = None,
                     name: str | None = None, fuse: bool | None = None, streamed: bool | None = None,
                     device=None, partial: bool = False) -> LoraReport:
    """A LoRA on a pipeline's DiT(s) (`experts`: {"dit": ...} plus "dit_low" for Wan2.2 A14B):
    both experts, or one with expert "high"/"low". Nothing changes when a check fails."""
    if expert not in (None, "high", "low"):
        raise ValueError(f"expert must be 'high', 'low' or None (both), got {expert!r}")
    if expert is not None and "dit_low" not in experts:
        raise ValueError(f"a LoRA for the {expert}-noise expert needs a model with two experts (Wan2.2 A14B)")
    chosen = {None: list(experts.values()), "high": [experts["dit"]], "low": [experts.get("dit_low")]}[expert]
    lora = source if isinstance(source, LoraFile) else read_lora(source)  # read once for both experts
    report = apply_lora(chosen[0], lora, strength, fuse=fuse, name=name, streamed=streamed, device=device,
                        partial=partial)
    try:
        for dit in chosen[1:]:  # under the first expert's name, which may have been made unique there
            apply_lora(dit, lora, strength, fuse=fuse, name=report.name, streamed=streamed, device=device,
                       partial=partial)
    except Exception:
        remove_lora(chosen[0], report.name)
        raise
    return report


def lora_names(paths: list[str | Path], taken: Iterable[str] = ()) -> list[str]:
    """Distinct readable names for LoRAs loaded together: each file's stem; stems that clash
    (with each other or with a name in `taken`) take as many of their folders as tell them
    apart (`a/lora`, `b/lora`), else their file names (`style.ckpt`), else a number (`lora-2`)."""
    paths = [Path(p).expanduser() for p in paths]
    taken = set(taken)
    names: list[str | None] = [None] * len(paths)
    groups: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        groups.setdefault(path.stem, []).append(i)
    for stem, group in groups.items():
        folders = {i: [f for f in paths[i].parent.parts if f not in (paths[i].anchor, ".")] for i in group}
        tries = [[stem] * len(group)]
        tries += [["/".join([*folders[i][-depth:], stem]) for i in group]
                  for depth in range(1, max(len(f) for f in folders.values()) + 1)]
        tries.append([paths[i].name for i in group])
        chosen = next((t for t in tries if len(set(t)) == len(t) and not taken & set(t)), None)
        if chosen is None:  # the same file twice: lora, lora-2, ...
            chosen, numbered = [], taken | set()
            for _ in group:
                chosen.append(next(n for k in range(1, len(taken) + len(group) + 2)
                                   if (n := stem if k == 1 else f"{stem}-{k}") not in numbered))
                numbered.add(chosen[-1])
        for i, name in zip(group, chosen):
            names[i] = name
        taken |= set(chosen)
    return names


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return a == b


def set_lora_strength(dit: nn.Module, name: str, strength: Strength) -> None:
    """A new strength for a loaded LoRA: a number, or per step (a list or `Ramp`) on a live one."""
    entry = _entry(dit, name)
    value, schedule = strength_schedule(strength)
    if schedule is not None and entry.fused:
        raise LoraError(f"LoRA {name!r} is fused into the weights: a per-step strength needs it loaded live "
                        "(fuse=False)")
    entry.schedule = entry.report.schedule = schedule
    _set_strength(dit, name, entry, value)


def lora_steps(dits: Iterable[nn.Module], steps: int) -> Callable[[int], None] | None:
    """For a run of `steps` denoising steps: a function that gives every LoRA with a per-step
    strength on `dits` (a pipeline's experts) its strength of step i, or None when none has one.
    Raises LoraError (before any work) when a list's length is not `steps`. Only the live
    adapters' strength data changes between steps (no weight is re-fused or moved); a norm or
    modulation difference, always fused, is re-fused when its strength changes (a few vectors)."""
    scheduled = []
    for dit in dits:
        for name, entry in loaded_loras(dit).items():
            if entry.schedule is None:
                continue
            if isinstance(entry.schedule, Ramp):
                values = entry.schedule.values(steps)
            elif len(entry.schedule) != steps:
                raise LoraError(f"LoRA {name!r} has {len(entry.schedule)} per-step strengths for {steps} steps: give "
                                "one per step, or a range START-END")
            else:
                values = entry.schedule
            scheduled.append((dit, name, entry, values))
    if not scheduled:
        return None

    def at(step: int) -> None:
        for dit, name, entry, values in scheduled:
            if values[step] != entry.strength:
                _set_strength(dit, name, entry, values[step])
    return at


def _set_strength(dit: nn.Module, name: str, entry: _Loaded, strength: float) -> None:
    entry.strength = entry.report.strength = float(strength)
    for target in entry.targets.values():
        adapter = adapter_of(target, name)
        if adapter is not None:
            adapter.strength = float(strength)
    _rebuild_fused_weights(dit, {t for t in entry.targets.values() if entry.fused or not _is_linear(t)})


def remove_lora(dit: nn.Module, name: str | None = None) -> None:
    """Remove one LoRA by name, or all of them; fused weights come back bit for bit."""
    loaded = loaded_loras(dit)
    if name is not None:
        _entry(dit, name)  # an unknown name is an error
    touched: set = set()
    for n in ([name] if name is not None else list(loaded)):
        for target in loaded.pop(n).targets.values():
            if _is_linear(target):
                detach(target, n)
            touched.add(target)
    _rebuild_fused_weights(dit, touched)


def _entry(dit: nn.Module, name: str) -> _Loaded:
    loaded = loaded_loras(dit)
    if name not in loaded:
        raise LoraError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(loaded) or 'none'})")
    return loaded[name]


# -- matching and diagnostics ------------------------------------------------------------


def match(dit: nn.Module, lora: LoraFile, *, partial: bool = False) -> dict[str, nn.Module | nn.Parameter]:
    """The DiT module (or parameter) for every LoRA module, or a LoraError that says why not.
    partial: modules (and keys) this model has no place for are left out instead (`not_applied`
    names them); a LoRA for another model size stays an error, as does one of which nothing fits."""
    where = lora.path or "the LoRA"
    if lora.unknown_keys and not partial:
        raise LoraError(f"{where}: {len(lora.unknown_keys)} key(s) are not LoRA weights wanx knows: "
                        f"{', '.join(lora.unknown_keys[:5])}")
    cfg = dit.config
    size = {30: "1.3B", 40: "14B"}
    blocks = lora.num_blocks
    if blocks and blocks > cfg.num_layers:
        raise LoraError(f"{where}: this LoRA targets a {blocks}-block model{_size(size, blocks)}; the loaded model has "
                        f"{cfg.num_layers} blocks{_size(size, cfg.num_layers)}")
    if lora.width and lora.width != cfg.dim:
        widths = {1536: "1.3B", 5120: "14B", 3072: "TI2V-5B"}
        raise LoraError(f"{where}: this LoRA is for a model of width {lora.width}{_size(widths, lora.width)}; the loaded "
                        f"model has width {cfg.dim}{_size(widths, cfg.dim)}")
    if lora.image_conditioned and not cfg.has_image_input and not partial:
        image_keys = [n for n in lora.modules if re.search(r"(k_img|v_img|norm_k_img)$", n) or n.startswith("img_emb.")]
        model = ("a Wan2.2 I2V model, which has no image cross-attention (no CLIP)" if cfg.model_type == "i2v"
                 else f"a {cfg.model_type.upper()} model")
        raise LoraError(f"{where}: the LoRA has image cross-attention keys (k_img/v_img): it was trained on an I2V model; "
                        f"this is {model} ({', '.join(image_keys[:3])}, ...; --lora-partial applies the rest)")
    targets, missing, misfit = {}, [], []
    for name, module in lora.modules.items():
        target = _resolve(dit, name)
        if target is None:
            missing.append(name)
            continue
        shape = _weight_shape(target)
        wrong = [want for want in _delta_shapes(module)
                 if tuple(want) != tuple(shape) and _squeeze(want) != _squeeze(shape)]
        if wrong:
            misfit.append(f"{name} {list(wrong[0])} (model {list(shape)})")
            continue
        if "diff_b" in module.parts and (getattr(target, "bias", None) is None
                                         or target.bias.shape != module.parts["diff_b"].shape):
            misfit.append(f"{name} bias {list(module.parts['diff_b'].shape)}")
            continue
        targets[name] = target
    if missing and not partial:
        raise LoraError(f"{where}: {len(missing)} LoRA module(s) match no module of this Wan2.1 DiT: "
                        f"{', '.join(missing[:5])} (--lora-partial applies the others)")
    if misfit:
        raise LoraError(f"{where}: {len(misfit)} LoRA module(s) do not fit the model's shapes: {'; '.join(misfit[:5])}")
    if not targets:
        raise LoraError(f"{where}: no module of the LoRA is in this model (e.g. {', '.join(missing[:3])}): it is "
                        "for another model")
    return targets


def not_applied(lora: LoraFile, targets: dict) -> list[str]:
    """The file's keys that `targets` (from `match`) leave out, in file order."""
    left = [key for name, module in lora.modules.items() if name not in targets for key in module.keys.values()]
    return left + list(lora.unknown_keys)


def _leftover_summary(keys: list[str]) -> str:
    """The keys left out, in one line: block numbers folded (`blocks.*.cross_attn.k_img.lora_down.weight x40`)."""
    groups: dict[str, int] = {}
    for key in keys:
        folded = re.sub(r"(blocks[._])\d+", r"\1*", key)
        groups[folded] = groups.get(folded, 0) + 1
    return ", ".join(f"{k} x{n}" if n > 1 else k for k, n in groups.items())


def _size(table: dict, key) -> str:
    if key not in table:
        return ""
    return f" (Wan2.2 {table[key]})" if table[key] == "TI2V-5B" else f" (Wan2.1 {table[key]})"


def _squeeze(shape) -> tuple:
    return tuple(s for s in shape if s != 1)


def _resolve(dit: nn.Module, name: str) -> nn.Module | nn.Parameter | None:
    try:
        target = dit.get_submodule(name)
    except AttributeError:
        try:
            return dit.get_parameter(name)
        except AttributeError:
            return None
    return target if isinstance(getattr(target, "weight", None), Tensor) or isinstance(target, GGUFLinear) else None


def _weight_shape(target) -> tuple[int, ...]:
    if isinstance(target, GGUFLinear):  # packed: no weight tensor of its shape
        return (target.out_features, target.in_features)
    return tuple((target.weight if isinstance(target, nn.Module) else target).shape)


def _delta_shapes(module: LoraModule) -> list[tuple[int, ...]]:
    """The shapes of the module's weight deltas: its product's and its diff's."""
    p = module.parts
    kind = module.kind
    shapes = [tuple(p["diff"].shape)] if "diff" in p else []
    if kind == "lora":
        shapes.append((p["up"].shape[0], *p["down"].shape[1:]))
    elif kind == "loha":
        shapes.append((p["hada_w1_a"].shape[0], p["hada_w1_b"].shape[1]))
    elif kind == "lokr":
        def dims(full, a, b):
            return p[full].shape if full in p else (p[a].shape[0], p[b].shape[1])
        (o1, i1), (o2, i2) = dims("lokr_w1", "lokr_w1_a", "lokr_w1_b"), dims("lokr_w2", "lokr_w2_a", "lokr_w2_b")
        shapes.append((o1 * o2, i1 * i2))
    return shapes


def _is_linear(target) -> bool:
    return isinstance(target, (nn.Linear, *QUANTIZED, GGUFLinear))


# -- fusing ------------------------------------------------------------------------------


def _rebuild_fused_weights(dit: nn.Module, targets: set) -> None:
    """Set each target's weights to its original plus every fused LoRA on it, in load order."""
    loaded = loaded_loras(dit)
    for target in targets:
        _restore(dit, target)
        contributions = [(entry, name) for entry in loaded.values() for name, t in entry.targets.items()
                         if t is target and (entry.fused or not _is_linear(t))]
        if not contributions:
            continue
        _stash(target)
        weight, bias = _float_weights(target)  # may be the original tensors themselves: never written
        for entry, name in contributions:
            module = entry.lora.modules[name]
            weight = module.added_to(weight, entry.strength)
            if "diff_b" in module.parts and bias is not None:
                bias = bias + entry.strength * module.parts["diff_b"].to(bias.device, torch.float32)
        _set_weights(dit, target, weight, bias)


def _assign(dit: nn.Module, param: nn.Parameter, tensor: Tensor) -> None:
    """param's new values; on a streamed model through the streamer, which keeps the host copy."""
    streamer = streamer_of(dit)
    if streamer is None or not streamer.replace(param, tensor):
        param.data = tensor.to(param.device) if tensor.device != param.device else tensor


def _stash(target) -> None:
    """Keep the original tensors (by reference when memory-mapped on the CPU, else a CPU copy)."""
    if hasattr(target, "_lora_original"):
        return
    tensors = {"weight": target.weight if isinstance(target, nn.Module) else target}
    if isinstance(target, nn.Module) and getattr(target, "bias", None) is not None:
        tensors["bias"] = target.bias
    if isinstance(target, QUANTIZED):
        tensors["scale"] = target.scale
    kept = {k: (v.data if v.device.type == "cpu" else v.data.to("cpu")) for k, v in tensors.items()}
    object.__setattr__(target, "_lora_original", kept)


def _restore(dit: nn.Module, target) -> None:
    original = getattr(target, "_lora_original", None)
    if original is None:
        return
    for key, tensor in original.items():
        param = target if key == "weight" and not isinstance(target, nn.Module) else getattr(target, key)
        _assign(dit, param, tensor)
    object.__delattr__(target, "_lora_original")


def _float_weights(target) -> tuple[Tensor, Tensor | None]:
    """The weight and bias in float32, without a copy when they are float32 already."""
    if isinstance(target, QUANTIZED):
        weight = target.weight.float() * target.scale[:, None]
    else:
        weight = (target.weight if isinstance(target, nn.Module) else target).detach().float()
    bias = getattr(target, "bias", None) if isinstance(target, nn.Module) else None
    return weight, (None if bias is None else bias.detach().float())


def _set_weights(dit: nn.Module, target, weight: Tensor, bias: Tensor | None) -> None:
    if isinstance(target, QUANTIZED):
        q, scale = (int8.quantize_weight if isinstance(target, Int8Linear) else quantize_weight)(weight)
        target.weight.data, target.scale.data = q, scale
    else:
        param = target.weight if isinstance(target, nn.Module) else target
        _assign(dit, param, weight.to(param.dtype))
    if bias is not None:
        _assign(dit, target.bias, bias.to(target.bias.dtype))
