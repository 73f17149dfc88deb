"""Reading tensors from checkpoint files without loading them all: safetensors (single or
sharded, memory-mapped, headers read first) and `.pth` pickles (weights_only, mmap)."""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says which file and why."""


class DamagedCheckpoint(CheckpointError):
    """A weights file that cannot be read at all (truncated, corrupt, shards missing, a pickle
    refused), as opposed to a readable file that is not a Wan network."""


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SHARD = re.compile(r"^(?P<stem>.+)-\d{5}-of-\d{5}\.safetensors$")
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass
class TensorStore:
    """Names, shapes and dtypes of a checkpoint's tensors; each tensor read on demand."""

    path: Path
    files: list[Path]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    config_json: dict | None = None
    _where: dict[str, Path] = field(default_factory=dict)  # safetensors: key -> file
    _tensors: dict[str, Tensor] = field(default_factory=dict)  # pickles: already (mmap-)loaded
    _handles: dict[Path, object] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, key: str) -> Tensor:
        if key in self._tensors:
            return self._tensors[key]
        file = self._where[key]
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        try:
            return self._handles[file].get_tensor(key)  # type: ignore[attr-defined]
        except Exception as err:
            raise DamagedCheckpoint(f"{file}: cannot read tensor {key!r} ({err}); the file may be truncated") from err

    def close(self) -> None:
        self._handles.clear()
        self._tensors.clear()


def open_checkpoint(path: str | Path) -> TensorStore:
    """Index a checkpoint: a .safetensors file, a shard index (or one shard of a set), a
    folder holding the DiT weights (official or diffusers), or a .pth/.pt pickle."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    files = _resolve(path)
    store = TensorStore(path=path, files=files)
    if files[0].suffix in _PICKLE_SUFFIXES:
        _index_pickle(store, files[0])
    else:
        for file in files:
            _index_safetensors(store, file)
    config = files[0].parent / "config.json"
    if config.is_file():
        try:
            store.config_json = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{config}: not valid JSON ({err})") from err
    if not store.shapes:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    return store


def _resolve(path: Path) -> list[Path]:
    if path.is_dir():
        return _resolve_folder(path)
    name = path.name
    if name.endswith(".safetensors.index.json"):
        return _shards_from_index(path)
    if name.endswith(".safetensors"):
        match = _SHARD.match(name)
        index = path.with_name(f"{match['stem']}.safetensors.index.json") if match else None
        # One shard of a set stands for the whole set.
        return _shards_from_index(index) if index is not None and index.is_file() else [path]
    if path.suffix in _PICKLE_SUFFIXES:
        return [path]
    raise CheckpointError(f"{path}: unknown checkpoint format; expected .safetensors, a shard index .json, .pth or .pt")


def _resolve_folder(folder: Path) -> list[Path]:
    """The DiT weights in a model folder: `diffusion_pytorch_model*.safetensors` (official and
    diffusers `transformer/`), or the only .safetensors file there."""
    for stem in ("diffusion_pytorch_model", "model"):
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            return _shards_from_index(index)
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
    if (folder / "transformer").is_dir():  # a diffusers repository
        return _resolve_folder(folder / "transformer")
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates
    listing = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    raise CheckpointError(
        f"{folder}: no DiT weights found (expected diffusion_pytorch_model.safetensors or its .index.json); "
        f"the folder holds {listing}. Pass the weights file itself to load another network."
    )


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DamagedCheckpoint(f"{index}: not a safetensors shard index ({err})") from err
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DamagedCheckpoint(f"{index}: shard(s) missing beside the index: {', '.join(missing[:3])}")
    return files


def _index_safetensors(store: TensorStore, file: Path) -> None:
    header = _read_safetensors_header(file)
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if key in store.shapes:
            raise CheckpointError(f"{file}: tensor {key!r} appears in more than one shard")
        store.shapes[key] = tuple(entry["shape"])
        store.dtypes[key] = _DTYPES.get(entry["dtype"], torch.float32)
        store._where[key] = file


def _read_safetensors_header(file: Path) -> dict:
    """Parse the JSON header and check the file is long enough for the data it declares."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError("header length exceeds the file")
            header = json.loads(fh.read(n))
        end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise DamagedCheckpoint(f"{file}: not a readable safetensors file ({err})") from err
    if 8 + n + end > size:
        raise DamagedCheckpoint(
            f"{file}: truncated ({size} bytes, the header declares {8 + n + end}); download it again"
        )
    return header


def _index_pickle(store: TensorStore, file: Path) -> None:
    obj = _torch_load(file)
    # Some trainers wrap the weights: {"state_dict": {...}} or {"model": {...}}.
    while isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a dictionary of tensors")
    for key, value in obj.items():
        if isinstance(value, Tensor):
            store.shapes[key] = tuple(value.shape)
            store.dtypes[key] = value.dtype
            store._tensors[key] = value


def _torch_load(file: Path):
    # weights_only=True always: a checkpoint must never run code when it is opened.
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DamagedCheckpoint(
            f"{file}: refused, the pickle holds Python objects other than tensors ({first}); "
            "wanx opens .pth files with torch.load(weights_only=True) only. Use a safetensors copy of the weights."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise DamagedCheckpoint(f"{file}: unreadable or truncated ({str(err).splitlines()[0]}); download it again") from err
