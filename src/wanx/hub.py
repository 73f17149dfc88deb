"""Model folders: resolve a path, the `demo` or a tiny-model name, or a model id to a local
folder (downloading with huggingface_hub, or ModelScope with source="modelscope"), and find
its components by content rather than by file name. A Wan2.2 A14B folder holds two DiTs, the
high- and the low-noise expert, told apart by where each is kept (`loading.layouts.expert_of`).

A folder may also hold `wanx-defaults.json`: the generation settings its model was made for
(e.g. the demo model's 96x96, 17 frames), used for every option a request leaves unset."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .loading import CheckpointError, CheckpointInfo, DamagedCheckpoint, inspect_checkpoint
from .tiny import DEFAULTS_FILE, TINY_MODELS, tiny_model_dir

DEFAULT_KEYS = ("width", "height", "num_frames", "num_inference_steps", "guidance_scale", "shift", "sampler",
                "negative_prompt", "guidance_scale_low", "boundary")
# The released repositories `wanx download` is meant for (any other id downloads too).
MODEL_IDS = (
    "Wan-AI/Wan2.1-T2V-1.3B", "Wan-AI/Wan2.1-T2V-14B", "Wan-AI/Wan2.1-I2V-14B-480P", "Wan-AI/Wan2.1-I2V-14B-720P",
    "Wan-AI/Wan2.1-FLF2V-14B-720P", "Wan-AI/Wan2.2-T2V-A14B", "Wan-AI/Wan2.2-I2V-A14B", "Wan-AI/Wan2.2-TI2V-5B",
)
MODEL_IDS = MODEL_IDS + tuple(f"{m}-Diffusers" for m in MODEL_IDS)
DEMO_MODEL = "demo"
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".gguf")


@dataclass
class ModelFiles:
    folder: Path
    model_type: str  # of the DiT: t2v | i2v | flf2v | ti2v
    dit: Path  # with two experts: the high-noise one
    vae: Path
    text_encoder: Path
    tokenizer: Path
    image_encoder: Path | None = None
    infos: dict[str, CheckpointInfo] = field(default_factory=dict, repr=False)  # network -> what was found
    defaults: dict = field(default_factory=dict)  # the folder's wanx-defaults.json: pipeline keyword -> value
    dit_low: Path | None = None  # Wan2.2 A14B: the low-noise expert, which takes over below the boundary
    # diffusers' model_index.json: where the low-noise expert takes over (a share of the 1000
    # training timesteps; None: the pipeline's default for the model) and TI2V's per-token time
    boundary: float | None = None
    expand_timesteps: bool = False
    audio_encoder: Path | None = None  # Wan2.2 S2V: the wav2vec2 folder (wav2vec2-large-xlsr-53-english/)

    @property
    def dit_config(self):
        return self.infos["dit"].config

    @property
    def moe(self) -> bool:
        """Two experts (Wan2.2 A14B)."""
        return self.dit_low is not None

    def parameter_counts(self) -> list[tuple[str, int]]:
        """(network, parameters) of what a pipeline loads: CLIP only for image-conditioned DiTs."""
        return [(net, info.num_params) for net, info in self.infos.items() if net != "clip" or self.image_encoder]

    def stored_kinds(self) -> dict[str, dict[str, int]]:
        """Each network's parameters by the kind its file stores them in (bf16, float8_e4m3fn,
        int8, Q4_0, ...): a quantized DiT's packed size (`memory.estimate.weight_bytes`)."""
        return {net: dict(info.dtypes) for net, info in self.infos.items()}


SOURCES = ("huggingface", "modelscope")  # where model ids are downloaded from


def resolve_model(path_or_id: str | Path, *, source: str = "huggingface") -> Path:
    """A local folder as is; `demo` (the trained demo model shipped in the package); `tiny`,
    `tiny-i2v`, `tiny-flf2v`, `tiny-moe`, `tiny-ti2v`, `tiny-vace`, `tiny-animate`, `tiny-animate2`, `tiny-s2v` made
    locally; anything else of the form owner/name is downloaded
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
    if not is_model_id(text):
        import difflib

        near = difflib.get_close_matches(text, [DEMO_MODEL, *TINY_MODELS], n=1, cutoff=0.7)
        hint = f"did you mean {near[0]}?" if near else "a model id is owner/name, e.g. Wan-AI/Wan2.1-T2V-1.3B"
        raise FileNotFoundError(f"{text}: no such model folder ({hint})")
    return download(text, source=source)


def is_model_id(text: str) -> bool:
    """Whether a name that is no local path reads as a Hub repository id: owner/name, each of
    letters, digits, '-', '_', '.' and neither starting nor ending with '-' or '.'. So ./x, ../x,
    /x, ~/x and a/b/c are folders; and so is models/x when models/ is a folder here."""
    part = r"[\w](?:[\w.-]*[\w])?"
    return bool(re.fullmatch(rf"{part}/{part}", text)) and not Path(text.split("/")[0]).is_dir()


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
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: {' or '.join(map(repr, SOURCES))}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_dir=str(local_dir) if local_dir else None))
    except GatedRepoError:
        raise ValueError(f"{model_id}: the repository is gated; accept its terms on the Hub and log in "
                         "(`hf auth login`)") from None
    except RepositoryNotFoundError:
        import difflib

        near = difflib.get_close_matches(model_id, MODEL_IDS, n=1, cutoff=0.8)
        hint = f"did you mean {near[0]}?" if near else "check the id, e.g. Wan-AI/Wan2.1-T2V-1.3B or Wan-AI/Wan2.2-T2V-A14B"
        raise ValueError(f"{model_id}: no such model on the Hugging Face Hub (or it is private); {hint}") from None
    except LocalEntryNotFoundError as err:  # offline, DNS, refused connections, timeouts: huggingface_hub says so
        raise ValueError(f"{model_id}: the Hugging Face Hub cannot be reached and the model is not in the local cache "
                         f"({type(err.__cause__ or err).__name__}); download it where there is a connection and give its folder "
                         "with --model PATH") from None
    except OSError as err:  # anything else (disk full, a server error) is not "unreachable": say what it was
        raise ValueError(f"{model_id}: the download failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                         ) from None


def find_model(path_or_id: str | Path, *, dit: str | Path | None = None, dit_low: str | Path | None = None,
               source: str = "huggingface") -> ModelFiles:
    """`resolve_model` + `find_components`; `path_or_id` may also be a DiT file (a ComfyUI
    single file, e.g. one expert), whose folder then holds the other components."""
    path = Path(str(path_or_id)).expanduser()
    if path.is_file():
        if dit is not None:
            raise ValueError(f"{path}: a DiT file is given as the model; give --dit only with a model folder")
        return find_components(path.parent, dit=path, dit_low=dit_low)
    return find_components(resolve_model(path_or_id, source=source), dit=dit, dit_low=dit_low)


def find_components(folder: str | Path, *, dit: str | Path | None = None,
                    dit_low: str | Path | None = None) -> ModelFiles:
    """DiT, VAE, umT5, tokenizer and CLIP in an official or diffusers-layout folder, told
    apart by their tensor names (headers only for safetensors). `dit` chooses the DiT file
    when the folder holds several (e.g. a bf16 and an fp8 copy side by side).

    Wan2.2 A14B: the two experts are found where they are kept (official `high_noise_model/`
    and `low_noise_model/`, diffusers `transformer/` and `transformer_2/`, files named
    `*high_noise*` and `*low_noise*`); `dit_low` names the low-noise expert's file (with `dit`
    the high-noise one, or alone when the folder holds one other DiT)."""
    folder = Path(folder)
    found = find_networks(folder)
    experts = _experts(folder, found.pop("dit", []), dit, dit_low)
    chosen: dict[str, tuple[Path, CheckpointInfo]] = dict(experts)
    for network, entries in found.items():
        if len(entries) > 1:
            listing = ", ".join(str(p.relative_to(folder)) for p, _ in entries)
            how = "choose one with --dit FILE" if network == "dit" else "move all but one out of the folder"
            raise ValueError(f"{folder}: {len(entries)} {_NAMES.get(network, network)} files ({listing}); {how}")
        chosen[network] = entries[0]
    tokenizer = next((p.parent for p in sorted(folder.rglob("tokenizer.json"))), None)
    expected = {
        "dit": "diffusion_pytorch_model.safetensors (or its shards and .index.json), or transformer/",
        "vae": "Wan2.1_VAE.pth (Wan2.2 TI2V-5B: Wan2.2_VAE.pth), or vae/diffusion_pytorch_model.safetensors",
        "t5": "models_t5_umt5-xxl-enc-bf16.pth, or text_encoder/",
    }
    for network, files in expected.items():
        if network not in chosen:
            raise FileNotFoundError(f"{folder}: the model folder has no {_NAMES[network]}; expected {files}")
    if tokenizer is None:
        raise FileNotFoundError(f"{folder}: the model folder has no tokenizer; expected google/umt5-xxl/tokenizer.json "
                                "or tokenizer/tokenizer.json")
    config = chosen["dit"][1].config
    model_type = config.model_type
    if config.has_image_input and "clip" not in chosen:
        raise FileNotFoundError(f"{folder}: an {model_type} model needs the CLIP image encoder; expected "
                                "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or image_encoder/")
    if not config.has_image_input:
        chosen.pop("clip", None)  # Wan2.2 I2V has no CLIP: a stray encoder file is not loaded
    clip = chosen.get("clip", (None, None))[0]
    audio_encoder = _audio_encoder(folder) if model_type == "s2v" else None
    index = _model_index(folder)
    boundary = index.get("boundary_ratio") if "dit_low" in chosen else None
    defaults = read_defaults(folder)
    if boundary is not None:  # the repository's own boundary, unless wanx-defaults.json says otherwise
        defaults.setdefault("boundary", float(boundary))
    return ModelFiles(folder, model_type, chosen["dit"][0], chosen["vae"][0], chosen["t5"][0], tokenizer, clip,
                      infos={network: info for network, (_, info) in chosen.items()}, defaults=defaults,
                      dit_low=chosen["dit_low"][0] if "dit_low" in chosen else None,
                      boundary=float(boundary) if boundary is not None else None,
                      expand_timesteps=bool(index.get("expand_timesteps", False)), audio_encoder=audio_encoder)


def _audio_encoder(folder: Path) -> Path:
    """An S2V folder's wav2vec2 audio encoder, kept beside the DiT as the release keeps it."""
    from .audio import WAV2VEC_FOLDER

    path = folder / WAV2VEC_FOLDER
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: an s2v model (Wan2.2 S2V) needs its audio encoder; expected {WAV2VEC_FOLDER}/ "
                                "(config.json, model.safetensors, preprocessor_config.json) beside the DiT")
    return path


def find_networks(folder: str | Path) -> dict[str, list[tuple[Path, CheckpointInfo]]]:
    """Every Wan network's weights in the folder and its direct subfolders, by network ("dit",
    "vae", "t5", "clip"), told apart by their tensor names; files of anything else are passed over."""
    found: dict[str, list[tuple[Path, CheckpointInfo]]] = {}
    for candidate in _weight_files(Path(folder)):
        try:
            info = inspect_checkpoint(candidate)
        except DamagedCheckpoint:
            raise  # a truncated download must be named, not taken for a missing component
        except CheckpointError:
            continue  # a readable file that is no Wan network (e.g. a LoRA or an unrelated model)
        found.setdefault(info.network, []).append((candidate, info))
    return found


def check_dits(folder: str | Path, dits: list[tuple[Path, CheckpointInfo]]) -> None:
    """The ValueError `find_components` raises for these DiT files of a folder when no --dit
    chooses (several that are not one Wan2.2 expert pair), so that `wanx info` says it too."""
    _experts(Path(folder), dits, None, None)


_NAMES = {"dit": "DiT (diffusion transformer)", "vae": "VAE", "t5": "umT5 text encoder", "clip": "CLIP image encoder"}


def _experts(folder: Path, dits: list[tuple[Path, CheckpointInfo]], dit, dit_low) -> dict[str, tuple[Path, CheckpointInfo]]:
    """{"dit": (path, info)} for one DiT, plus "dit_low" for a Wan2.2 A14B pair."""
    def given(path, flag: str) -> tuple[Path, CheckpointInfo]:
        info = inspect_checkpoint(path)
        if info.network != "dit":
            raise ValueError(f"{path}: {flag} must be a DiT checkpoint; this is a {info.network}")
        return Path(path), info

    if dit_low is not None:
        low = given(dit_low, "--model-low")
        if dit is not None:
            high = given(dit, "--dit")
        else:
            others = [(p, i) for p, i in dits if p.resolve() != low[0].resolve() and i.expert != "low"]
            if len(others) != 1:
                listing = ", ".join(str(p.relative_to(folder)) for p, _ in others) or "none"
                raise ValueError(f"{folder}: with --model-low, the folder must hold one other DiT, the high-noise "
                                 f"expert (found: {listing}); choose it with --dit FILE")
            high = others[0]
        pair = {"dit": high, "dit_low": low}
    elif dit is not None:
        return {"dit": given(dit, "--dit")}
    elif not dits:
        return {}
    elif len(dits) == 1:
        return {"dit": dits[0]}
    else:
        by_expert = {info.expert: (p, info) for p, info in dits}
        if len(dits) != 2 or set(by_expert) != {"high", "low"}:
            listing = ", ".join(str(p.relative_to(folder)) for p, _ in dits)
            raise ValueError(f"{folder}: {len(dits)} {_NAMES['dit']} files ({listing}); choose one with --dit FILE "
                             "(or two Wan2.2 experts with --dit HIGH --model-low LOW)")
        pair = {"dit": by_expert["high"], "dit_low": by_expert["low"]}
    (high_path, high), (low_path, low) = pair["dit"], pair["dit_low"]
    if high.config != low.config:
        raise ValueError(f"{folder}: the two experts differ in architecture ({high_path.name}: {high.config.model_type} "
                         f"dim {high.config.dim}; {low_path.name}: {low.config.model_type} dim {low.config.dim}); "
                         "a Wan2.2 A14B model's high- and low-noise experts are alike")
    return pair


def _model_index(folder: Path) -> dict:
    """A diffusers repository's model_index.json (empty when there is none)."""
    path = folder / "model_index.json"
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return index if isinstance(index, dict) else {}


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
