"""Model folders: resolve a path, the `demo` or a tiny-model name, or a model id to a local
folder (downloading with huggingface_hub, or ModelScope with source="modelscope"), and find
its components by content rather than by file name.

A folder may also hold `wanx-defaults.json`: the generation settings its model was made for
(e.g. the demo model's 96x96, 17 frames), used for every option a request leaves unset."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .loading import CheckpointError, CheckpointInfo, DamagedCheckpoint, inspect_checkpoint
from .tiny import TINY_MODELS, tiny_model_dir

DEFAULTS_FILE = "wanx-defaults.json"
DEFAULT_KEYS = ("width", "height", "num_frames", "num_inference_steps", "guidance_scale", "shift", "sampler",
                "negative_prompt")
DEMO_MODEL = "demo"
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
    infos: dict[str, CheckpointInfo] = field(default_factory=dict, repr=False)  # network -> what was found
    defaults: dict = field(default_factory=dict)  # the folder's wanx-defaults.json: pipeline keyword -> value

    @property
    def dit_config(self):
        return self.infos["dit"].config

    def parameter_counts(self) -> list[tuple[str, int]]:
        """(network, parameters) of what a pipeline loads: CLIP only for image-conditioned DiTs."""
        return [(net, info.num_params) for net, info in self.infos.items() if net != "clip" or self.image_encoder]


def resolve_model(path_or_id: str | Path, *, source: str = "huggingface") -> Path:
    """A local folder as is; `demo` (the trained demo model shipped in the package); `tiny`,
    `tiny-i2v`, `tiny-flf2v` made locally; anything else of the form owner/name is downloaded
    (or found in the cache)."""
    text = str(path_or_id)
    if text == DEMO_MODEL:
        return demo_model_dir()
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


def demo_model_dir() -> Path:
    """The demo model's folder inside the installed package (`python -m wanx.demo.build` makes it)."""
    folder = Path(__file__).parent / "demo" / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: the demo model is missing from this install; reinstall wanx, or rebuild "
                                "it with `make demo-model` and copy demo-build/model there")
    return folder


def read_defaults(folder: Path) -> dict:
    """The folder's `wanx-defaults.json` (empty when it has none), checked key by key."""
    path = Path(folder) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        defaults = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(defaults, dict):
        raise ValueError(f"{path}: must hold one JSON object of generation settings")
    unknown = sorted(set(defaults) - set(DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown setting {unknown[0]!r}; known: {', '.join(DEFAULT_KEYS)}")
    return defaults


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
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_dir=str(local_dir) if local_dir else None))
    except GatedRepoError:
        raise ValueError(f"{model_id}: the repository is gated; accept its terms on the Hub and log in "
                         "(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{model_id}: no such model on the Hugging Face Hub (or it is private); "
                         "check the id, e.g. Wan-AI/Wan2.1-T2V-1.3B") from None
    except LocalEntryNotFoundError as err:  # offline, DNS, refused connections, timeouts: huggingface_hub says so
        raise ValueError(f"{model_id}: the Hugging Face Hub cannot be reached and the model is not in the local cache "
                         f"({type(err.__cause__ or err).__name__}); download it where there is a connection and give its folder "
                         "with --model PATH") from None
    except OSError as err:  # anything else (disk full, a server error) is not "unreachable": say what it was
        raise ValueError(f"{model_id}: the download failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                         ) from None


def find_components(folder: str | Path, *, dit: str | Path | None = None) -> ModelFiles:
    """DiT, VAE, umT5, tokenizer and CLIP in an official or diffusers-layout folder, told
    apart by their tensor names (headers only for safetensors). `dit` chooses the DiT file
    when the folder holds several (e.g. a bf16 and an fp8 copy side by side)."""
    folder = Path(folder)
    found: dict[str, list[tuple[Path, CheckpointInfo]]] = {}
    for candidate in _weight_files(folder):
        try:
            info = inspect_checkpoint(candidate)
        except DamagedCheckpoint:
            raise  # a truncated download must be named, not taken for a missing component
        except CheckpointError:
            continue  # a readable file that is no Wan network (e.g. a LoRA or an unrelated model)
        found.setdefault(info.network, []).append((candidate, info))
    if dit is not None:
        info = inspect_checkpoint(dit)
        if info.network != "dit":
            raise ValueError(f"{dit}: --dit must be a DiT checkpoint; this is a {info.network}")
        found["dit"] = [(Path(dit), info)]
    chosen: dict[str, tuple[Path, CheckpointInfo]] = {}
    for network, entries in found.items():
        if len(entries) > 1:
            listing = ", ".join(str(p.relative_to(folder)) for p, _ in entries)
            how = "choose one with --dit FILE" if network == "dit" else "move all but one out of the folder"
            raise ValueError(f"{folder}: {len(entries)} {_NAMES.get(network, network)} files ({listing}); {how}")
        chosen[network] = entries[0]
    tokenizer = next((p.parent for p in sorted(folder.rglob("tokenizer.json"))), None)
    expected = {
        "dit": "diffusion_pytorch_model.safetensors (or its shards and .index.json), or transformer/",
        "vae": "Wan2.1_VAE.pth, or vae/diffusion_pytorch_model.safetensors",
        "t5": "models_t5_umt5-xxl-enc-bf16.pth, or text_encoder/",
    }
    for network, files in expected.items():
        if network not in chosen:
            raise FileNotFoundError(f"{folder}: the model folder has no {_NAMES[network]}; expected {files}")
    if tokenizer is None:
        raise FileNotFoundError(f"{folder}: the model folder has no tokenizer; expected google/umt5-xxl/tokenizer.json "
                                "or tokenizer/tokenizer.json")
    model_type = chosen["dit"][1].config.model_type
    if model_type != "t2v" and "clip" not in chosen:
        raise FileNotFoundError(f"{folder}: an {model_type} model needs the CLIP image encoder; expected "
                                "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or image_encoder/")
    clip = chosen.get("clip", (None, None))[0]
    return ModelFiles(folder, model_type, chosen["dit"][0], chosen["vae"][0], chosen["t5"][0], tokenizer, clip,
                      infos={network: info for network, (_, info) in chosen.items()}, defaults=read_defaults(folder))


_NAMES = {"dit": "DiT (diffusion transformer)", "vae": "VAE", "t5": "umT5 text encoder", "clip": "CLIP image encoder"}


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
