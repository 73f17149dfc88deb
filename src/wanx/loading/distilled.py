"""Whether a DiT is step/CFG-distilled, as its file or model folder says it: `wanx info` shows
"distilled (4 steps, no CFG)" so nobody runs such weights at 50 guided steps by mistake.

What the releases write, and so what is read here (nothing is guessed from file names):
- LightX2V's run configs (`configs/distill/*.json`, also kept as config.json beside the weights):
  `denoising_step_list` (the timesteps, e.g. [1000, 750, 500, 250]), `infer_steps` and
  `enable_cfg: false`. The same keys are read from a safetensors file's `__metadata__` (values
  are strings there: "4", "false", "[1000, 750, 500, 250]"), directly or as one JSON `config`.
- Hugging Face model cards (README.md front matter) of lightx2v's StepDistill-CfgDistill and
  Distill-Models repositories and of their re-uploads: the tag `distillation` and
  `inference: parameters: num_inference_steps: 4`; "no CFG" when the card says the guidance
  is distilled too ("CfgDistill", "CFG distillation", "without CFG", Lightning's "without the
  need of CFG").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# The card phrases that say the guidance was distilled away as well (lightx2v, Lightning).
_NO_CFG = re.compile(r"cfg[\s_-]?distill|without (the need of )?(the )?cfg|guidance distillation|cfg[- ]free", re.I)
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.S)


@dataclass(frozen=True)
class Distilled:
    steps: int | None
    cfg: bool  # False: distilled guidance, run it at --guidance 1
    source: str  # the file that says so

    def summary(self) -> str:
        what = ", ".join(([f"{self.steps} steps"] if self.steps else []) + ([] if self.cfg else ["no CFG"]))
        flags = " ".join(([f"--steps {self.steps}"] if self.steps else []) + ([] if self.cfg else ["--guidance 1"]))
        return f"distilled ({what or 'steps not stated'}; {self.source})" + (f": run it with {flags}" if flags else "")


def from_settings(settings: dict, source: str) -> Distilled | None:
    """LightX2V's config keys, as JSON values or as the strings safetensors metadata holds."""
    def value(key):
        raw = settings.get(key)
        if isinstance(raw, str):
            if raw.strip().lower() in ("true", "false"):  # str(True) as well as JSON's true
                return raw.strip().lower() == "true"
            try:
                return json.loads(raw)
            except ValueError:
                return raw
        return raw

    if isinstance(settings.get("config"), str):  # one JSON config kept in the metadata
        nested = value("config")
        if isinstance(nested, dict):
            found = from_settings(nested, source)
            if found:
                return found
    step_list, infer_steps, enable_cfg = value("denoising_step_list"), value("infer_steps"), value("enable_cfg")
    if not isinstance(step_list, list) and enable_cfg is not False:
        return None  # a base model's run config also has infer_steps; only these two say "distilled"
    steps = len(step_list) if isinstance(step_list, list) and step_list else infer_steps
    return Distilled(steps=steps if type(steps) is int and steps > 0 else None, cfg=enable_cfg is not False, source=source)


def from_model_card(text: str, source: str) -> Distilled | None:
    """A Hugging Face model card: the `distillation` tag and the card's inference step count."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return None
    import yaml  # a dependency of huggingface_hub

    try:
        card = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    if not isinstance(card, dict):
        return None
    tags = card.get("tags") or []
    tags = [str(t).lower() for t in (tags if isinstance(tags, list) else [tags])]
    if not any(t in ("distillation", "distilled", "step-distillation") for t in tags):
        return None
    params = (card.get("inference") or {}).get("parameters") if isinstance(card.get("inference"), dict) else None
    steps = params.get("num_inference_steps") if isinstance(params, dict) else None
    return Distilled(steps=steps if type(steps) is int and steps > 0 else None, cfg=not _NO_CFG.search(text), source=source)


def find(metadata: dict, files: list[Path], path: Path, config_json: dict | None) -> Distilled | None:
    """The first of: the weights' metadata, config.json beside them, the model card (README.md)
    beside them or in the folder given (a diffusers repository keeps its DiT in transformer/)."""
    found = from_settings(metadata, f"{files[0].name} metadata") if metadata else None
    if found is None and config_json:
        found = from_settings(config_json, "config.json")
    folders = dict.fromkeys([files[0].parent, *([path] if path.is_dir() else [])])
    for folder in folders if found is None else ():
        card = folder / "README.md"
        if card.is_file():
            try:
                found = from_model_card(card.read_text(encoding="utf-8", errors="replace"), "README.md")
            except OSError:
                found = None
            if found:
                break
    return found
