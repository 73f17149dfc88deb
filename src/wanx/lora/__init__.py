"""LoRA for the Wan2.1 DiT: every format in the wild read into one form (`formats`), a live
adapter layer (`layer`), and apply / re-weight / remove, fused or live (`apply`)."""

from .apply import (LoraReport, Ramp, apply_lora, apply_to_experts, loaded_loras, lora_names, lora_steps, remove_lora,
                    set_lora_strength)
from .formats import LoraError, LoraFile, read_lora

__all__ = ["LoraError", "LoraFile", "LoraReport", "Ramp", "apply_lora", "apply_to_experts", "loaded_loras", "lora_names",
           "lora_steps", "read_lora", "remove_lora", "set_lora_strength"]
