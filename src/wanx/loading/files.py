"""Reading tensors from checkpoint files without loading them all: safetensors (single or
sharded, memory-mapped, headers read first) and `.pth` pickles (weights_only, mmap)."""

from __future__ import annotations

import errno
import json
import math
import os
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


def _damaged(file: Path, what: str) -> DamagedCheckpoint:
    return DamagedCheckpoint(f"damaged: {file}: {what}")


def _unreadable(file: Path, err: OSError) -> DamagedCheckpoint:
    """An OSError met opening a weights file, as one line (a symlink loop is ELOOP, not a traceback)."""
    if err.errno == errno.ELOOP:
        return _damaged(file, "a loop of symbolic links; point it at the weights file itself")
    if err.errno == errno.ENOENT and file.is_symlink():
        return _damaged(file, f"a symbolic link to {os.readlink(file)}, which does not exist; download it again")
    return DamagedCheckpoint(f"{file}: cannot be read ({err.strerror or err})")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SHARD = re.compile(r"^(?P<stem>.+)-\d{5}-of-\d{5}\.safetensors$")
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "C64": torch.complex64,
}
# Bits per element of every dtype the safetensors format names (F4 and F6 pack below a byte);
# a name outside this table is damage, one in it that torch lacks is merely unsupported.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "U16": 16, "I16": 16, "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32,
    "U64": 64, "I64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
# The config.json settings the DiT's config is read from (`loading._infer_config`).
CONFIG_COUNTS = ("num_heads", "num_attention_heads", "num_layers", "text_len")
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses longer headers


@dataclass
class TensorStore:
    """Names, shapes and dtypes of a checkpoint's tensors; each tensor read on demand."""

    path: Path
    files: list[Path]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    config_json: dict | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors __metadata__ (first file)
    _where: dict[str, Path] = field(default_factory=dict)  # safetensors: key -> file
    _tensors: dict[str, Tensor] = field(default_factory=dict)  # pickles: already (mmap-)loaded
    _handles: dict[Path, object] = field(default_factory=dict)
    gguf: bool = False  # a GGUF file (`loading.gguf`)
    qtypes: dict[str, str] = field(default_factory=dict)  # GGUF: key -> quant type ("Q4_0") of a packed tensor
    _packed: dict[str, Tensor] = field(default_factory=dict)  # GGUF: key -> its packed bytes (uint8, mmap)

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, key: str) -> Tensor:
        if key in self._packed:  # a quantized GGUF tensor, as float32
            from ..memory.gguf import dequantize

            return dequantize(self._packed[key], self.qtypes[key], self.shapes[key])
        if key in self._tensors:
            return self._tensors[key]
        file = self._where[key]
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        try:
            return self._handles[file].get_tensor(key)  # type: ignore[attr-defined]
        except Exception as err:
            raise _damaged(file, f"cannot read tensor {key!r} ({_first_line(err)}); the file may be truncated") from err

    def close(self) -> None:
        self._handles.clear()
        self._tensors.clear()
        self._packed.clear()


def open_checkpoint(path: str | Path) -> TensorStore:
    """Index a checkpoint: a .safetensors file, a shard index (or one shard of a set), a
    folder holding the DiT weights (official or diffusers), or a .pth/.pt pickle."""
    path = Path(path).expanduser()
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ENOENT and not path.is_symlink():
            raise CheckpointError(f"{path}: no such file or folder") from None
        raise _unreadable(path, err) from None
    from .gguf import index_gguf, is_gguf

    files = [path] if path.is_file() and is_gguf(path) else _resolve(path)  # GGUF by content, any name
    store = TensorStore(path=path, files=files)
    if files[0] == path and is_gguf(path):
        index_gguf(store, path)
    elif files[0].suffix in _PICKLE_SUFFIXES:
        _index_pickle(store, files[0])
    else:
        for file in files:
            _index_safetensors(store, file)
    config = files[0].parent / "config.json"
    if config.is_file():
        try:
            store.config_json = json.loads(config.read_text(encoding="utf-8"))
        except OSError as err:
            raise _unreadable(config, err) from None
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            raise _damaged(config, f"not valid JSON ({_first_line(err)})") from None
        if not isinstance(store.config_json, dict):
            raise _damaged(config, f"holds a JSON {type(store.config_json).__name__}, not an object of settings")
        for key in CONFIG_COUNTS:
            value = store.config_json.get(key)
            if value is not None and not (type(value) is int and value > 0):
                raise _damaged(config, f"{key} is {_short(value)}, not a positive integer")
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
    if path.suffix == ".gguf":  # GGUF is read by content: this one lacks the magic
        raise _damaged(path, "not a GGUF file (it does not start with the GGUF magic); download it again")
    raise CheckpointError(f"{path}: unknown checkpoint format; expected .safetensors, a shard index .json, .pth, .pt or .gguf")


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
    except OSError as err:
        raise _unreadable(index, err) from None
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise _damaged(index, f"not a safetensors shard index ({type(err).__name__}: {_first_line(err)})") from None
    # Shard names are plain file names beside the index: never a path that leads elsewhere.
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(name, str) and name.endswith(".safetensors") and Path(name).name == name
        for name in weight_map.values()
    ):
        raise _damaged(index, "its weight_map must map each tensor name to a .safetensors file name beside it")
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise _damaged(index, f"shard(s) missing beside the index: {', '.join(missing[:3])}; download them again")
    return files


def _index_safetensors(store: TensorStore, file: Path) -> None:
    header = read_safetensors_header(file)
    for key, entry in header.items():
        if key == "__metadata__":
            if not store.metadata:
                store.metadata = dict(entry)
            continue
        if key in store.shapes:
            raise CheckpointError(f"{file}: tensor {key!r} appears in more than one shard")
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {key!r} is stored as {entry['dtype']}, which wanx cannot read")
        store.shapes[key] = tuple(entry["shape"])
        store.dtypes[key] = _DTYPES[entry["dtype"]]
        store._where[key] = file


def read_safetensors_header(file: str | Path) -> dict:
    """The JSON header of a safetensors file, checked as the safetensors library checks it but
    without reading any tensor data: an object of tensors whose dtype, shape and data span
    agree, whose spans tile the data section (sorted, no overlap, no gap) and fit in the file.
    Anything else raises DamagedCheckpoint saying `damaged: FILE: what`, before other code
    can trip over it."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8:
                raise _damaged(file, f"only {size} bytes, too short for a safetensors file; download it again")
            if n > size - 8:
                raise _damaged(file, f"not a safetensors file, or truncated: its header length ({n:,} bytes) "
                                     f"exceeds the file ({size:,} bytes)")
            if n > MAX_HEADER_BYTES:
                raise _damaged(file, f"a header of {n:,} bytes (safetensors allows {MAX_HEADER_BYTES:,})")
            raw = fh.read(n)
    except OSError as err:
        raise _unreadable(file, err) from None
    try:
        header = json.loads(raw.decode("utf-8"))  # the format says UTF-8: no guessing of UTF-16
    except UnicodeDecodeError:
        raise _damaged(file, "the header is not UTF-8 text") from None
    except ValueError as err:
        raise _damaged(file, f"the header is not valid JSON ({_first_line(err)})") from None
    except RecursionError:
        raise _damaged(file, "the header's JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise _damaged(file, f"the header is a JSON {type(header).__name__}, not an object of tensors")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _damaged(file, "its __metadata__ must map names to strings")
            continue
        problem = _entry_problem(entry)
        if problem:
            raise _damaged(file, f"tensor {_short(key)}: {problem}")
        spans.append((*entry["data_offsets"], key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            how = "overlaps the tensor before it" if begin < position else f"leaves {begin - position:,} bytes unused before it"
            raise _damaged(file, f"tensor {_short(key)} {how} (data_offsets [{begin}, {end}])")
        position = end
    data = size - 8 - n
    if position > data:
        raise _damaged(file, f"truncated ({size:,} bytes, the header declares {8 + n + position:,}); download it again")
    if position < data:
        raise _damaged(file, f"{data - position:,} bytes after the last tensor that no tensor claims")
    return header


def _entry_problem(entry) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(entry, dict):
        return f"a JSON {type(entry).__name__}, not an object with dtype, shape and data_offsets"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        return f"unknown dtype {_short(dtype)}"
    if not _naturals(shape):
        return f"shape {_short(shape)} is not a list of non-negative integers"
    if not (_naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        return f"data_offsets {_short(offsets)} is not [begin, end] with 0 <= begin <= end"
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        needs = f"{bits // 8:,}" if bits % 8 == 0 else f"{bits / 8:,.1f}"
        return f"shape {_short(shape)} of {dtype} needs {needs} bytes but its data_offsets span {offsets[1] - offsets[0]:,}"
    return None


def _naturals(value) -> bool:
    # bool is an int subclass, and JSON true is no dimension
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


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
    except OSError as err:
        raise _unreadable(file, err) from None
    except Exception as err:  # torch.load has no error type of its own for a bad file
        refused = _refused(err)
        if refused:
            raise DamagedCheckpoint(
                f"{file}: refused, the pickle holds Python objects other than tensors ({refused}); "
                "wanx opens .pth files with torch.load(weights_only=True) only. Use a safetensors copy of the weights."
            ) from None
        raise _damaged(file, f"unreadable or truncated ({_torch_reason(err)}); download it again") from None


def _refused(err: Exception) -> str | None:
    """What weights_only=True refused to build (a global, a class, a function), or None when
    the pickle is not refused but broken (truncated, random bytes: "Unsupported operand")."""
    text = str(err)
    named = re.search(r"GLOBAL (\S+)", text)
    if named:
        return named[1]
    if "allowlisted" in text or "unrecognized function" in text:
        reason = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
        return reason[1].strip() if reason else _first_line(err)
    return None


def _torch_reason(err: Exception) -> str:
    """torch.load's reason in a few words, without its advice to retry with weights_only=False
    (which is for refused objects, not for a corrupt file)."""
    text = str(err)
    unpickler = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    if unpickler:
        return f"not a valid pickle: {unpickler[1].strip()}"
    if isinstance(err, EOFError):
        return "the file ends early"
    return _first_line(err).split(". ")[0].rstrip(".")
