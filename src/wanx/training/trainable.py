"""What a run trains on the DiT: a LoRA injected on its block Linear layers (or every weight
with `full`), Wan's from-scratch initialisation, and gradient checkpointing of its blocks."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..lora.formats import LoraModule
from ..lora.layer import LoraAdapter, attach
from ..memory.fp8 import FP8Linear
from ..memory.gguf import GGUFLinear
from ..memory.int8 import Int8Linear

# the layers a LoRA trains on (frozen bases may be quantized or packed)
LINEARS = (nn.Linear, FP8Linear, Int8Linear, GGUFLinear)
from ..memory.streaming import compute_device

if TYPE_CHECKING:
    from .recipe import TrainConfig


# --lora-blocks: the block lists a LoRA trains on. A VACE model has two: the main blocks (what the
# video looks like; the default, as on every model) and its VACE blocks (how the control video,
# mask and references steer it; DiffSynth-Studio's VACE LoRA example trains those alone).
LORA_BLOCKS = {"main": ("blocks",), "vace": ("vace_blocks",), "both": ("blocks", "vace_blocks")}


def add_trainable_lora(dit: nn.Module, rank: int, alpha: float | None, targets: tuple[str, ...],
                       generator: torch.Generator, blocks: tuple[str, ...] = ("blocks",)) -> dict[str, LoraAdapter]:
    """A trainable LoRA on every Linear of the block lists `blocks` whose name ends in one of
    `targets`: down Kaiming-uniform, up zero (the model starts unchanged), scale alpha / rank.
    The adapters live where the DiT computes, resident even when its frozen blocks are streamed."""
    device = compute_device(dit)
    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {rank}")
    check_targets(dit, targets, blocks)
    adapters = {}
    for name, layer in dit.named_modules():
        if isinstance(layer, LINEARS) and name.startswith(tuple(f"{b}." for b in blocks)) \
                and name.endswith(tuple(f".{t}" for t in targets)):
            bound = 1 / math.sqrt(layer.in_features)
            down = (torch.rand(rank, layer.in_features, generator=generator) * 2 - 1) * bound
            module = LoraModule(name, {"down": down, "up": torch.zeros(layer.out_features, rank),
                                       "alpha": torch.tensor(float(alpha if alpha is not None else rank))})
            adapter = LoraAdapter(module, 1.0, device=device, dtype=torch.float32)  # fp32 on any base
            adapter.down.requires_grad_(True)
            adapter.up.requires_grad_(True)
            attach(layer, "train", adapter)
            adapters[name] = adapter
    return adapters


def check_targets(dit: nn.Module, targets: tuple[str, ...], blocks: tuple[str, ...] = ("blocks",)) -> None:
    """Each of `targets` must name block Linear layers of `dit` (a meta-device DiT will do) in
    the block lists `blocks`: a misspelt one would otherwise train nothing where it was meant to."""
    if not all(isinstance(getattr(dit, b, None), nn.ModuleList) for b in blocks):
        raise ValueError("--lora-blocks vace|both trains a VACE model's VACE blocks; this model has none: drop it")
    paths = list(dict.fromkeys(name.split(".", 2)[2] for name, layer in dit.named_modules()
                               if isinstance(layer, LINEARS) and name.startswith(tuple(f"{b}." for b in blocks))))
    if not targets:  # paths: e.g. self_attn.q, in module order
        raise ValueError("--targets is empty; give block Linear layers such as q,k,v,o,ffn.0,ffn.2")
    for target in targets:
        if not any(f".{path}".endswith(f".{target}") for path in paths):
            short = dict.fromkeys(p.split(".", 1)[1] if p.startswith(("self_attn.", "cross_attn.")) else p for p in paths)
            raise ValueError(f"--targets: {target!r} matches no Linear layer of the DiT's blocks; valid: "
                             f"{', '.join(short)} (or self_attn.X / cross_attn.X for one attention)")


# official block module -> diffusers (the inverse of the loader's diffusers table for the
# layers LoRAs train; `read_lora` maps these names back, which the tests check)
_TO_DIFFUSERS = {"self_attn": "attn1", "cross_attn": "attn2", "q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0",
                 "k_img": "add_k_proj", "v_img": "add_v_proj", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
                 "before_proj": "proj_in", "after_proj": "proj_out"}  # a VACE block's


def lora_state(adapters: dict[str, LoraAdapter], fmt: str = "official") -> dict[str, Tensor]:
    """The LoRA in the official/ComfyUI key format (`diffusion_model.…lora_A/lora_B/alpha`),
    or diffusers/PEFT (`transformer.blocks.N.attn1.to_q.lora_A.weight`, alpha/rank folded into B)."""
    state = {}
    for name, adapter in adapters.items():
        down = adapter.down.detach().float().cpu().contiguous()
        up = adapter.up.detach().float().cpu().contiguous()
        if fmt == "diffusers":
            blocks, block, rest = name.split(".", 2)
            parts = rest.split(".", 1) if rest.startswith(("self_attn", "cross_attn")) else [rest]
            key = f"transformer.{blocks}.{block}." + ".".join(_TO_DIFFUSERS[p] for p in parts)
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, (up * adapter.scale).contiguous()
            continue
        key = f"diffusion_model.{name}"
        state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, up
        state[f"{key}.alpha"] = torch.tensor(adapter.scale * adapter.down.shape[0])
    return state


class Trainable:
    """What is trained: a LoRA (its adapters) or the whole DiT; saved and restored in one
    format, the official key names."""

    def __init__(self, dit: nn.Module, config: TrainConfig):
        self.dit, self.config = dit, config
        dit.requires_grad_(False)
        if config.full:
            if any(isinstance(m, (FP8Linear, Int8Linear)) for m in dit.modules()):
                raise ValueError("--full trains every weight: load the DiT in bf16/fp32, not --fp8 (nor an fp8/int8 "
                                 "file)")
            if any(isinstance(m, GGUFLinear) for m in dit.modules()):
                raise ValueError("--full trains every weight: a GGUF DiT's are packed; train a LoRA on it, or --full "
                                 "from a bf16/fp32 checkpoint")
            if config.from_scratch:
                init_weights(dit, torch.Generator().manual_seed(config.seed))
            dit.requires_grad_(True)
            self.adapters = {}
            self.params = list(dit.parameters())
        else:
            init = torch.Generator().manual_seed(config.seed)
            self.adapters = add_trainable_lora(dit, config.lora_rank, config.lora_alpha, config.targets, init,
                                               LORA_BLOCKS[config.lora_blocks])
            self.params = [p for a in self.adapters.values() for p in (a.down, a.up)]

    def state(self, fmt: str = "official") -> dict[str, Tensor]:
        if self.config.full:
            return {k: v.detach().cpu().contiguous() for k, v in self.dit.state_dict().items()}
        return lora_state(self.adapters, fmt)

    def load(self, state: dict[str, Tensor]) -> None:
        if self.config.full:
            pairs = [(state.get(name), tensor) for name, tensor in self.dit.state_dict().items()]
        else:
            pairs = [(state.get(f"diffusion_model.{name}.lora_{ab}.weight"), tensor)
                     for name, adapter in self.adapters.items() for ab, tensor in (("A", adapter.down), ("B", adapter.up))]
        if any(saved is None or saved.shape != tensor.shape for saved, tensor in pairs):  # a checkpoint from before
            raise ValueError("--resume: the checkpoint was trained with other settings (another --model, --lora-rank, "
                             "--targets or --full); resume with the ones it was made with")
        with torch.no_grad():
            for saved, tensor in pairs:
                tensor.copy_(saved)

    @property
    def file_name(self) -> str:
        """The weights' name inside a checkpoint (the final file is `final_file`)."""
        return "model.safetensors" if self.config.full else "lora.safetensors"

@torch.no_grad()
def init_weights(dit: nn.Module, generator: torch.Generator) -> None:
    """Wan's start for training a DiT from nothing, every parameter drawn from `generator`
    (none kept from what was loaded): Xavier-uniform Linear weights and patch embedding, zero
    Linear biases, N(0, 0.02) text and time embeddings, a zero output layer (the untrained model
    predicts zero velocity instead of large random vectors), norms at 1 and 0, modulation
    N(0, 1/dim), and the patch embedding's bias as PyTorch draws a convolution's."""
    def uniform(tensor: Tensor, bound: float) -> None:
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (2 * bound) - bound)

    def xavier(weight: Tensor) -> None:
        fan_out, fan_in = weight.shape[0], weight[0].numel()
        uniform(weight, math.sqrt(6 / (fan_in + fan_out)))

    small = {id(m) for e in (dit.text_embedding, dit.time_embedding) for m in e.modules()}
    for module in dit.modules():
        own = dict(module.named_parameters(recurse=False))
        unknown = set(own) - {"weight", "bias"} if isinstance(module, (nn.Linear, nn.Conv3d)) else set()
        if unknown:  # e.g. a layer a transform swapped in: its extra state has no rule here
            raise ValueError(f"init_weights: no rule for {type(module).__name__}.{', '.join(sorted(unknown))}")
        if isinstance(module, nn.Linear):
            if id(module) in small:
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
            else:
                xavier(module.weight)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Conv3d):
            xavier(module.weight)
            if module.bias is not None:
                uniform(module.bias, 1 / math.sqrt(module.weight[0].numel()))
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "Norm" in type(module).__name__:
            for name, param in own.items():
                param.fill_(1.0 if name == "weight" else 0.0)
        else:
            for name, param in own.items():
                if name == "modulation":
                    param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[-1]))
                elif name == "emb_pos":
                    param.zero_()
                else:
                    raise ValueError(f"init_weights: no rule for {type(module).__name__}.{name}")
    dit.head.head.weight.zero_()


def checkpointed(inner, block: nn.Module, *inputs):
    """A block wrapper (the first of `WanDiT.block_wrappers`): run a block without keeping its
    activations; they are recomputed for the backward pass (one block's activations alive at a
    time instead of all of them), through the wrappers inside (a streamed block loads again)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(inner, block, *inputs, use_reentrant=False)


def checkpointed_offloaded(inner, block: nn.Module, *inputs):
    """As `checkpointed`, and the block inputs it keeps wait in (pinned) host memory."""
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpointed(inner, block, *inputs)

