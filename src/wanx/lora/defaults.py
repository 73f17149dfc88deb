"""Generation settings a LoRA brings: those its safetensors metadata names (steps, guidance,
shift, sampler), else a hint when its name or metadata says it is step-distilled.

Step-distilled LoRAs (lightx2v StepDistill/CfgDistill, Wan2.2 Lightning, CausVid, rCM) are made
for a few steps without classifier-free guidance; run with the model's 50-step defaults they
give a burnt-out video. Their published model cards give 4 steps, guidance 1 (CFG off), shift 5
(lightx2v's `infer_steps`, `sample_guide_scale`, `sample_shift` in its configs); a file that
writes such keys into its metadata is read here. The request layer (CLI) fills only the options
the user left unset, and says so.
"""

from __future__ import annotations

import json
import re

# request key -> the metadata keys that may hold it, in order of preference
METADATA_KEYS = {
    "steps": ("wanx_steps", "num_inference_steps", "inference_steps", "infer_steps", "sample_steps", "steps"),
    "guidance": ("wanx_guidance", "guidance_scale", "sample_guide_scale", "cfg_scale", "guidance", "cfg"),
    "shift": ("wanx_shift", "sample_shift", "flow_shift", "shift"),
    "sampler": ("wanx_sampler", "sampler", "sample_solver"),
}
_DISTILLED = re.compile(r"lightx2v|lightning|causvid|rcm|step[-_]?distill|cfg[-_]?distill|distill|turbo|dmd|lcm",
                        re.IGNORECASE)
_STEPS_IN_NAME = re.compile(r"(\d+)[-_ ]?(?:steps?|nfe)|nfe[-_ ]?(\d+)", re.IGNORECASE)


def metadata_defaults(metadata: dict[str, str]) -> dict[str, int | float | str]:
    """The settings a LoRA's metadata names ({"steps": 4, "guidance": 1.0, ...}); a value that
    does not read as its kind raises ValueError naming the key."""
    found: dict[str, int | float | str] = {}
    if "enable_cfg" in metadata and metadata["enable_cfg"].strip().lower() in ("false", "0"):
        found["guidance"] = 1.0  # lightx2v: CFG distilled away
    for option, keys in METADATA_KEYS.items():
        key = next((k for k in keys if k in metadata), None)
        if key is None:
            continue
        text = metadata[key].strip()
        try:
            value = json.loads(text) if option != "sampler" else text
            if option == "steps":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError
            elif option in ("guidance", "shift"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError
                value = float(value)
        except ValueError:
            raise ValueError(f"its metadata {key}={text!r} is not a valid {option}") from None
        found[option] = value
    return found


def distilled_steps(name: str, metadata: dict[str, str]) -> int | None:
    """The step count a LoRA looks distilled for (from its file name or metadata), or None
    when nothing says it is step-distilled. 4 when it is, without a number."""
    text = " ".join([name, *(f"{k} {v}" for k, v in metadata.items() if isinstance(v, str) and len(v) < 200)])
    if not _DISTILLED.search(text):
        return None
    match = _STEPS_IN_NAME.search(name) or _STEPS_IN_NAME.search(text)
    if match:
        steps = int(match.group(1) or match.group(2))
        if 1 <= steps <= 16:
            return steps
    return 4
