"""Apply, re-weight and remove LoRAs on a built WanDiT, checked before anything changes.

Live (the default on an FP8 or streamed base): adapters added to each layer's output
(`layer.LoraAdapter`). Fused (the default on a resident bf16/fp32 base): W += strength x delta
in float32, cast back (an FP8 layer is dequantised, merged and requantized); the original
tensors are kept (a reference when they are memory-mapped, a CPU copy otherwise) so removing a
LoRA restores them bit for bit instead of subtracting. Norm and modulation differences (`.diff`
of a non-Linear) are always fused: they are tiny.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..memory.fp8 import FP8Linear, quantize_weight
from ..memory.streaming import compute_device, streamer_of
from .formats import LoraError, LoraFile, LoraModule, read_lora
from .layer import LoraAdapter, adapter_of, attach, detach


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

    def __str__(self) -> str:
        rank = "/".join(map(str, self.ranks)) or "full"
        return (f"LoRA {self.name}: {self.format} format, {self.matched}/{self.modules} modules matched, rank {rank}, "
                f"strength {self.strength:g}, {'fused' if self.fused else 'live'}")


@dataclass
class _Loaded:
    lora: LoraFile
    strength: float
    fused: bool
    targets: dict[str, nn.Module | nn.Parameter]
    report: LoraReport


# model -> {name: its loaded LoRA}, in load order (weak: a dropped model is not kept alive).
_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def loaded_loras(dit: nn.Module) -> dict[str, _Loaded]:
    """The LoRAs loaded on `dit`, by name, in load order (the registry itself: do not change it)."""
    return _LOADED.setdefault(dit, {})


def apply_lora(dit: nn.Module, source: str | Path | dict | LoraFile, strength: float = 1.0, *,
               fuse: bool | None = None, name: str | None = None, streamed: bool | None = None,
               device: torch.device | str | None = None) -> LoraReport:
    """Apply a LoRA to `dit` (see module doc). Nothing changes when a check fails. name: default
    the file's stem, or where a loaded LoRA has it, more of its path (`lora_names`).
    streamed: whether the model's weights are streamed block by block (no fusing then);
    device: where it computes (a live LoRA's adapters are made there). Both default to what
    `memory.streaming` records for the model (`streamer_of`, `compute_device`)."""
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
    targets = match(dit, lora)
    if streamed is None:
        streamed = streamer_of(dit) is not None
    fp8 = any(isinstance(t, FP8Linear) for t in targets.values())
    if fuse is None:
        fuse = not (streamed or fp8)
    if fuse and streamed:
        raise LoraError("a streamed model keeps its weights off the device between blocks: load the LoRA live "
                        "(fuse=False), or without offloading to fuse it")
    if streamed and any(not _is_linear(t) for t in targets.values()):
        names = [n for n, t in targets.items() if not _is_linear(t)]
        raise LoraError(f"the LoRA changes norm/modulation weights ({', '.join(names[:3])}), which cannot be changed "
                        "on a streamed model yet: load it without offloading")
    report = LoraReport(name, lora.format, len(targets), len(lora.modules), lora.ranks, float(strength), fuse, lora.sha256)
    loaded[name] = _Loaded(lora, float(strength), fuse, targets, report)
    if fuse:
        _rebuild_fused_weights(dit, set(targets.values()))
    else:
        # On a streamed model the weights wait in host memory between blocks; the adapters are
        # small and stay resident where the blocks compute.
        device = compute_device(dit) if device is None else torch.device(device)
        for module_name, target in targets.items():
            if _is_linear(target):
                weight = target.weight
                dtype = target.compute_dtype if isinstance(target, FP8Linear) else weight.dtype
                attach(target, name, LoraAdapter(lora.modules[module_name], strength, device=device, dtype=dtype))
        _rebuild_fused_weights(dit, {t for t in targets.values() if not _is_linear(t)})
    return report


def apply_to_experts(experts: dict[str, nn.Module], source, strength: float = 1.0, *, expert: str | None = None,
                     name: str | None = None, fuse: bool | None = None, streamed: bool | None = None,
                     device=None) -> LoraReport:
    """A LoRA on a pipeline's DiT(s) (`experts`: {"dit": ...} plus "dit_low" for Wan2.2 A14B):
    both experts, or one with expert "high"/"low". Nothing changes when a check fails."""
    if expert not in (None, "high", "low"):
        raise ValueError(f"expert must be 'high', 'low' or None (both), got {expert!r}")
    if expert is not None and "dit_low" not in experts:
        raise ValueError(f"a LoRA for the {expert}-noise expert needs a model with two experts (Wan2.2 A14B)")
    chosen = {None: list(experts.values()), "high": [experts["dit"]], "low": [experts.get("dit_low")]}[expert]
    lora = source if isinstance(source, LoraFile) else read_lora(source)  # read once for both experts
    report = apply_lora(chosen[0], lora, strength, fuse=fuse, name=name, streamed=streamed, device=device)
    try:
        for dit in chosen[1:]:  # under the first expert's name, which may have been made unique there
            apply_lora(dit, lora, strength, fuse=fuse, name=report.name, streamed=streamed, device=device)
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


def set_lora_strength(dit: nn.Module, name: str, strength: float) -> None:
    entry = _entry(dit, name)
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


def match(dit: nn.Module, lora: LoraFile) -> dict[str, nn.Module | nn.Parameter]:
    """The DiT module (or parameter) for every LoRA module, or a LoraError that says why not."""
    where = lora.path or "the LoRA"
    if lora.unknown_keys:
        raise LoraError(f"{where}: {len(lora.unknown_keys)} key(s) are not LoRA weights wanx knows: "
                        f"{', '.join(lora.unknown_keys[:5])}")
    cfg = dit.config
    size = {30: "1.3B", 40: "14B"}
    blocks = lora.num_blocks
    if blocks and blocks > cfg.num_layers:
        raise LoraError(f"{where}: this LoRA targets a {blocks}-block model{_size(size, blocks)}; the loaded model has "
                        f"{cfg.num_layers} blocks{_size(size, cfg.num_layers)}")
    if lora.width and lora.width != cfg.dim:
        widths = {1536: "1.3B", 5120: "14B"}
        raise LoraError(f"{where}: this LoRA is for a model of width {lora.width}{_size(widths, lora.width)}; the loaded "
                        f"model has width {cfg.dim}{_size(widths, cfg.dim)}")
    if lora.image_conditioned and not cfg.has_image_input:
        image_keys = [n for n in lora.modules if re.search(r"(k_img|v_img|norm_k_img)$", n) or n.startswith("img_emb.")]
        raise LoraError(f"{where}: the LoRA has image cross-attention keys (k_img/v_img): it was trained on an I2V model; "
                        f"this is a T2V model ({', '.join(image_keys[:5])})")
    targets, missing, misfit = {}, [], []
    for name, module in lora.modules.items():
        target = _resolve(dit, name)
        if target is None:
            missing.append(name)
            continue
        weight = target.weight if isinstance(target, nn.Module) else target
        wrong = [want for want in _delta_shapes(module)
                 if tuple(want) != tuple(weight.shape) and _squeeze(want) != _squeeze(weight.shape)]
        if wrong:
            misfit.append(f"{name} {list(wrong[0])} (model {list(weight.shape)})")
            continue
        if "diff_b" in module.parts and (getattr(target, "bias", None) is None
                                         or target.bias.shape != module.parts["diff_b"].shape):
            misfit.append(f"{name} bias {list(module.parts['diff_b'].shape)}")
            continue
        targets[name] = target
    if missing:
        raise LoraError(f"{where}: {len(missing)} LoRA module(s) match no module of this Wan2.1 DiT: "
                        f"{', '.join(missing[:5])}")
    if misfit:
        raise LoraError(f"{where}: {len(misfit)} LoRA module(s) do not fit the model's shapes: {'; '.join(misfit[:5])}")
    return targets


def _size(table: dict, key) -> str:
    return f" (Wan2.1 {table[key]})" if key in table else ""


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
    return target if isinstance(getattr(target, "weight", None), Tensor) else None


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
    return isinstance(target, (nn.Linear, FP8Linear))


# -- fusing ------------------------------------------------------------------------------


def _rebuild_fused_weights(dit: nn.Module, targets: set) -> None:
    """Set each target's weights to its original plus every fused LoRA on it, in load order."""
    loaded = loaded_loras(dit)
    for target in targets:
        _restore(target)
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
        _set_weights(target, weight, bias)


def _stash(target) -> None:
    """Keep the original tensors (by reference when memory-mapped on the CPU, else a CPU copy)."""
    if hasattr(target, "_lora_original"):
        return
    tensors = {"weight": target.weight if isinstance(target, nn.Module) else target}
    if isinstance(target, nn.Module) and getattr(target, "bias", None) is not None:
        tensors["bias"] = target.bias
    if isinstance(target, FP8Linear):
        tensors["scale"] = target.scale
    kept = {k: (v.data if v.device.type == "cpu" else v.data.to("cpu")) for k, v in tensors.items()}
    object.__setattr__(target, "_lora_original", kept)


def _restore(target) -> None:
    original = getattr(target, "_lora_original", None)
    if original is None:
        return
    for key, tensor in original.items():
        param = target if key == "weight" and not isinstance(target, nn.Module) else getattr(target, key)
        param.data = tensor.to(param.device) if tensor.device != param.device else tensor
    object.__delattr__(target, "_lora_original")


def _float_weights(target) -> tuple[Tensor, Tensor | None]:
    """The weight and bias in float32, without a copy when they are float32 already."""
    if isinstance(target, FP8Linear):
        weight = target.weight.float() * target.scale[:, None]
    else:
        weight = (target.weight if isinstance(target, nn.Module) else target).detach().float()
    bias = getattr(target, "bias", None) if isinstance(target, nn.Module) else None
    return weight, (None if bias is None else bias.detach().float())


def _set_weights(target, weight: Tensor, bias: Tensor | None) -> None:
    if isinstance(target, FP8Linear):
        q, scale = quantize_weight(weight)
        target.weight.data, target.scale.data = q, scale
    else:
        param = target.weight if isinstance(target, nn.Module) else target
        param.data = weight.to(param.dtype)
    if bias is not None:
        target.bias.data = bias.to(target.bias.dtype)
