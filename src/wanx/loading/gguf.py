"""Reading GGUF files of Wan DiTs as city96's ComfyUI-GGUF conversions write them: the
architecture in `general.architecture` ("wan"), official tensor names, a mix of quantized and
F16/BF16/F32 tensors, and tensors of more than 4 dims (the patch embedding) stored flattened
with their shape in `comfy.gguf.orig_shape.<name>`.

The file is memory-mapped (`gguf.GGUFReader`, copy-on-write so torch can wrap the arrays
without a copy); quantized tensors are kept packed (`TensorStore.packed`) and dequantized only
when asked for as floats. The `gguf` package is imported here only, when a GGUF is opened.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..memory.gguf import TYPES, packed_bytes, qtype_id

MAGIC = b"GGUF"
ARCHITECTURES = ("wan",)  # what city96's converter writes for Wan2.1 and Wan2.2 DiTs
ORIG_SHAPE = "comfy.gguf.orig_shape."
_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def is_gguf(path: Path) -> bool:
    """A GGUF file by content: its first four bytes are the magic."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


def index_gguf(store, file: Path) -> None:
    """Fill a TensorStore from a GGUF file: shapes (torch order, original shapes restored),
    float tensors as mmap-backed tensors, quantized ones packed with their type."""
    from .files import CheckpointError, DamagedCheckpoint

    try:
        from gguf import GGUFReader
    except ImportError:  # a dependency, but say what to do if it is missing
        raise CheckpointError(f"{file}: reading GGUF files needs the gguf package (pip install gguf)") from None
    try:
        reader = GGUFReader(file, "c")
    except Exception as err:  # the reader has no error type of its own; a short file fails in numpy
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DamagedCheckpoint(f"damaged: {file}: an unreadable or truncated GGUF ({reason}); download it again") from None
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{file}: a GGUF of architecture {arch!r}, not a Wan DiT; wanx reads GGUF files of Wan2.1/Wan2.2 DiTs "
            f"(general.architecture {' or '.join(map(repr, ARCHITECTURES))}, as city96's conversions); "
            "text encoders and VAEs load from their safetensors/.pth files"
        )
    store.metadata = {"general.architecture": arch}
    store.gguf = True
    for tensor in reader.tensors:
        try:
            qtype = TYPES[qtype_id(tensor.tensor_type)][0]
        except ValueError as err:
            raise CheckpointError(f"{file}: tensor {tensor.name!r}: {err}") from None
        orig = _field(reader, ORIG_SHAPE + tensor.name)
        shape = tuple(int(d) for d in orig) if orig is not None else tuple(int(d) for d in reversed(tensor.shape))
        data = torch.from_numpy(tensor.data)
        if data.numel() * data.element_size() != packed_bytes(qtype, shape):
            raise DamagedCheckpoint(f"damaged: {file}: tensor {tensor.name!r} holds {data.numel() * data.element_size():,} "
                                    f"bytes, not the {packed_bytes(qtype, shape):,} of {qtype} {list(shape)}")
        if qtype in _FLOAT:
            store._tensors[tensor.name] = data.reshape(-1).view(torch.uint8).view(_FLOAT[qtype]).reshape(shape)
            store.dtypes[tensor.name] = _FLOAT[qtype]
        else:
            store._packed[tensor.name] = data.reshape(-1)
            store.qtypes[tensor.name] = qtype
            store.dtypes[tensor.name] = torch.float32  # what `get` gives: dequantized
        store.shapes[tensor.name] = shape


def _field(reader, name: str):
    field = reader.get_field(name)
    return None if field is None else field.contents()
