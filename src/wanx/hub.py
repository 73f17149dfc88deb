"""Model folders: resolve a path, tiny-model name or model id to a local folder (downloading
with huggingface_hub, or ModelScope with source="modelscope"), and find its components by
content rather than by file name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .loading import CheckpointError, inspect_checkpoint
from .tiny import TINY_MODELS, tiny_model_dir

_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


@dataclass
class ModelFiles:
    folder: Path
    model_type: str  # of the DiT: t2v | i2v | flf2v
    dit: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path
    image_encoder: Path | None = None


def resolve_model(path_or_id: str | Path, *, source: str = "huggingface") -> Path:
    """A local folder as is; `tiny`, `tiny-i2v`, `tiny-flf2v` made locally; anything else of the
    form owner/name is downloaded (or found in the cache)."""
    text = str(path_or_id)
    if text in TINY_MODELS:
        return tiny_model_dir(text)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path}: give the model folder, not a single file")
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise FileNotFoundError(f"{path}: no such model folder (or a model id like Wan-AI/Wan2.1-T2V-1.3B)")
    return download(text, source=source)


def download(model_id: str, *, source: str = "huggingface", local_dir: str | Path | None = None) -> Path:
    if source == "modelscope":
        try:
            from modelscope import snapshot_download as ms_download
        except ImportError:
            raise ImportError("source='modelscope' needs the modelscope package: pip install modelscope") from None
        return Path(ms_download(model_id, local_dir=str(local_dir) if local_dir else None))
    if source != "huggingface":
        raise ValueError(f"unknown source {source!r}: 'huggingface' or 'modelscope'")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, local_dir=str(local_dir) if local_dir else None))


def find_components(folder: str | Path) -> ModelFiles:
    """DiT, VAE, umT5, tokenizer and CLIP in an official or diffusers-layout folder, told
    apart by their tensor names (headers only for safetensors)."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    model_type = None
    for candidate in _weight_files(folder):
        try:
            info = inspect_checkpoint(candidate)
        except CheckpointError:
            continue  # not a Wan network (e.g. an unrelated file in the folder)
        if info.network not in found:
            found[info.network] = candidate
            model_type = info.config.model_type if info.network == "dit" else model_type
    tokenizer = next((p.parent for p in sorted(folder.rglob("tokenizer.json"))), None)
    expected = {
        "dit": "diffusion_pytorch_model.safetensors (or its shards and .index.json), or transformer/",
        "vae": "Wan2.1_VAE.pth, or vae/diffusion_pytorch_model.safetensors",
        "t5": "models_t5_umt5-xxl-enc-bf16.pth, or text_encoder/",
    }
    for network, files in expected.items():
        if network not in found:
            raise FileNotFoundError(f"{folder}: the model folder has no {_NAMES[network]}; expected {files}")
    if tokenizer is None:
        raise FileNotFoundError(f"{folder}: the model folder has no tokenizer; expected google/umt5-xxl/tokenizer.json "
                                "or tokenizer/tokenizer.json")
    if model_type != "t2v" and "clip" not in found:
        raise FileNotFoundError(f"{folder}: an {model_type} model needs the CLIP image encoder; expected "
                                "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or image_encoder/")
    return ModelFiles(folder, model_type, found["dit"], found["vae"], found["t5"], tokenizer, found.get("clip"))


_NAMES = {"dit": "DiT (diffusion transformer)", "vae": "VAE", "t5": "umT5 text encoder"}


def _weight_files(folder: Path) -> list[Path]:
    """Weight files in the folder and its direct subfolders; a shard set counts once, by its index."""
    files = []
    for directory in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        indexed = sorted(directory.glob("*.safetensors.index.json"))
        files.extend(indexed)
        for p in sorted(directory.iterdir()):
            if p.suffix in _WEIGHT_SUFFIXES and not (_SHARD.search(p.name) and indexed):
                files.append(p)
    return files
