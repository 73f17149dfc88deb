"""Tiny random-weight Wan model sets in the official folder layout, made locally in seconds.

They exercise the whole path (checkpoint discovery, loading, tokenising, text and image
encoding, sampling, decoding, video files) offline on a CPU. Their videos are noise: real
videos need the real weights (`wanx download Wan-AI/Wan2.1-T2V-1.3B`).

A tiny set is byte-identical wherever and whenever it is made (by the same versions of wanx,
torch, safetensors and tokenizers), so a prompt and seed give the same tiny video on every
machine: the tokenizer is built from a fixed
vocabulary (nothing trained), every weight comes from an integer hash mapped exactly to floats
(no floating-point RNG kernels), and the one platform-dependent record `torch.save` writes is
replaced. `STAMP` records the recipe; a folder made by another recipe is made again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and numpy are imported where used: `wanx --help` reads TINY_MODELS and stays instant
    import numpy as np
    import torch

DEFAULTS_FILE = "wanx-defaults.json"  # a model folder's generation settings (hub.read_defaults)

# name -> task; "t2v-A14B" is Wan2.2's two-expert layout (high_noise_model/, low_noise_model/);
# "ti2v" is Wan2.2 TI2V-5B's: a 48-channel DiT on the Wan2.2 VAE (Wan2.2_VAE.pth).
# "vace" is Wan2.1 VACE's: the T2V DiT with VACE blocks (preset tiny-vace: a hint after both blocks).
# "animate" is Wan2.2-Animate's: the I2V DiT with the pose/face path (preset tiny-animate), with the tiny CLIP.
# "s2v" is Wan2.2-S2V's: the S2V DiT (preset tiny-s2v: audio, pose and FramePack motion paths).
# "animate2" is Wan-Animate-2's: the in-context I2V DiT (preset tiny-animate2, 10 blocks), with the tiny CLIP.
TINY_MODELS = {"tiny": "t2v", "tiny-i2v": "i2v", "tiny-flf2v": "flf2v", "tiny-moe": "t2v-A14B", "tiny-ti2v": "ti2v",
               "tiny-vace": "vace", "tiny-animate": "animate", "tiny-s2v": "s2v", "tiny-animate2": "animate2"}
EXPERT_FOLDERS = ("high_noise_model", "low_noise_model")

# Bump whenever the bytes of a tiny set change: folders with another stamp are remade.
TINY_VERSION = 3
STAMP = "wanx-tiny.json"
# Each set's `wanx-defaults.json` (hub.read_defaults): a run that leaves them unset takes a
# second, not the official 832x480x81 at 50 steps (minutes of CPU for noise). 64 is a multiple
# of every task's size step (16; 32 for TI2V) and 5 frames make two latent frames. Guidance,
# shift and negative prompt stay the official ones of the task, which the sets are there to run.
TINY_DEFAULTS = {"width": 64, "height": 64, "num_frames": 5, "num_inference_steps": 4}

# The tokenizer's vocabulary is built from these lines; other characters become <unk>.
_CORPUS = [
    "a cat walks on the grass in the sun", "a dog runs through the park at night", "the camera pans slowly to the left",
    "waves crash on a rocky beach", "a red car drives down a city street", "小猫在草地上走", "镜头切换，镜头晃动，色调艳丽，过曝，静态",
]


def wanx_home() -> Path:
    """Where wanx keeps what it makes for the user: $WANX_HOME, default ~/.cache/wanx."""
    return Path(os.environ.get("WANX_HOME", Path.home() / ".cache" / "wanx"))


def tiny_model_dir(name: str) -> Path:
    """Where `name` is kept: $WANX_HOME (default ~/.cache/wanx)/<name>; made on first use, and
    made again when it was made by another version of the recipe (its stamp differs)."""
    folder = wanx_home() / name
    if _read_stamp(folder) != _stamp(TINY_MODELS[name]):
        make_tiny_model(folder, TINY_MODELS[name])
    return folder


def make_tiny_model(folder: str | Path, task: str = "t2v", seed: int = 0) -> Path:
    """Write a tiny model set for `task` (t2v, i2v, flf2v, t2v-A14B: two experts, each in its
    official folder as two shards and an index, ti2v: with the tiny Wan2.2 VAE, or vace) with
    the official file names.

    The set is written in a private `.partial` folder beside `folder`, then renamed into place;
    an existing `folder` is replaced."""
    import torch
    from safetensors.torch import save_file

    from .configs import official_config_json
    from .models.clip import CLIPVisionEncoder
    from .models.t5 import UMT5Encoder
    from .models.transformer import WanDiT
    from .models.vae import WanVAE

    from .models.vae22 import WanVAE22

    preset = {"t2v": "tiny", "i2v": "tiny-i2v", "flf2v": "tiny-flf2v", "t2v-A14B": "tiny", "ti2v": "tiny-ti2v",
              "vace": "tiny-vace", "animate": "tiny-animate", "s2v": "tiny-s2v", "animate2": "tiny-animate2"}[task]
    experts = EXPERT_FOLDERS if task == "t2v-A14B" else ()
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.partial")  # private to this process
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a crashed run
    tmp.mkdir(parents=True)
    try:
        with torch.random.fork_rng(devices=[]):  # module init draws from the global RNG: leave the caller's alone
            dit = WanDiT(preset)
            for block in getattr(dit, "vace_blocks", ()):
                # Zero-initialised officially (a fresh VACE model is its base model); constant
                # tensors keep their values in `portable_weights`: made non-constant here so the
                # tiny set's hints act, as a trained model's do.
                for projection in (getattr(block, "before_proj", None), block.after_proj):
                    if projection is not None:
                        projection.reset_parameters()
            t5 = UMT5Encoder("tiny")
            networks = {"diffusion_pytorch_model.safetensors": dit, "Wan2.1_VAE.pth": WanVAE("tiny"),
                        "models_t5_umt5-xxl-enc-bf16.pth": t5}
            if experts:
                del networks["diffusion_pytorch_model.safetensors"]
            if task == "ti2v":  # the same weights as make_tiny_vae22's (keyed by seed and file name)
                del networks["Wan2.1_VAE.pth"]
                networks["Wan2.2_VAE.pth"] = WanVAE22("tiny-wan2.2")
            if task in ("i2v", "flf2v", "animate", "animate2"):
                networks["models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"] = CLIPVisionEncoder("tiny")
        for file, network in networks.items():
            state = portable_weights(network, f"{seed}/{file}")
            if task == "animate" and network is dit:
                _equalised_lr(state)
            if file.endswith(".safetensors"):
                save_file(state, str(tmp / file))
            else:
                save_pth(state, tmp / file)
        for expert in experts:  # alike in architecture, not in weights (each its own hash key)
            save_sharded(portable_weights(dit, f"{seed}/{expert}"), tmp / expert, shards=2)
            _write_json(tmp / expert / "config.json", official_config_json(dit.config))
        if not experts:
            _write_json(tmp / "config.json", official_config_json(dit.config))
        write_tokenizer(tmp / "google" / "umt5-xxl", vocab=t5.config.vocab)
        defaults = TINY_DEFAULTS
        if task == "s2v":
            from .audio import WAV2VEC_FOLDER, write_tiny_audio_encoder

            # S2V's wav2vec2 in its own folder, as the release keeps it (3 hidden states of
            # width 32, as preset tiny-s2v mixes); num_frames is one clip's, a multiple of 4
            write_tiny_audio_encoder(tmp / WAV2VEC_FOLDER, seed)
            defaults = {**TINY_DEFAULTS, "num_frames": 8}
        _write_json(tmp / DEFAULTS_FILE, defaults)
        _write_json(tmp / STAMP, _stamp(task, seed))  # last: a folder with a stamp is complete
        _move_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _equalised_lr(state: dict[str, torch.Tensor]) -> None:
    """The Animate motion encoder's convs and linears scale their weights by 1/sqrt(fan_in) at
    run time (equalised learning rate) and are initialised N(0, 1): at the portable bound of
    1/sqrt(fan_in) their output would not depend on the face. Scaled by sqrt(3 fan_in) in place
    (one correctly rounded multiplication: portable): uniform(-sqrt(3), sqrt(3)), variance 1."""
    for name, value in state.items():
        if name.startswith("motion_encoder.enc.") and name.endswith(".weight") and value.ndim >= 2:
            state[name] = value * math.sqrt(3 * value[0].numel())


def save_sharded(state: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    """`diffusion_pytorch_model-0000i-of-0000n.safetensors` and the index, as the official
    expert folders are kept: consecutive keys per shard, in the state dict's order."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * per:(i + 1) * per]
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(folder / "diffusion_pytorch_model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def make_tiny_vae22(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny Wan2.2 VAE (preset `tiny-wan2.2`: encoder 8 and decoder 12 wide, 48 latent
    channels, 4x16x16 stride) to `path` in the official layout, as a `Wan2.2_VAE.pth` is stored.

    Its weights are the tiny sets' portable ones, keyed by the seed alone, so they are the same
    under any file name, and a file of the same name is byte-identical wherever it is written
    (torch.save names the archive's records after the file)."""
    import torch

    from .models.vae22 import WanVAE22

    path = Path(path)
    with torch.random.fork_rng(devices=[]):  # module init draws from the global RNG: leave the caller's alone
        vae = WanVAE22("tiny-wan2.2")
    save_pth(portable_weights(vae, f"{seed}/Wan2.2_VAE.pth"), path)
    return path


def _stamp(task: str, seed: int = 0) -> dict:
    return {"wanx_tiny_version": TINY_VERSION, "task": task, "seed": seed}


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename `tmp` to `folder`, replacing an older set. A current set that another process
    (another rank) finished meanwhile is kept: it may be being read already."""
    if folder.exists() and _read_stamp(folder) == _read_stamp(tmp):
        return
    if folder.exists():
        old = folder.with_name(f"{folder.name}.{os.getpid()}.old")
        shutil.rmtree(old, ignore_errors=True)
        try:
            folder.replace(old)
        except FileNotFoundError:  # another process moved it away first
            pass
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.replace(folder)
    except OSError:
        # Another process put a set there between the two renames: keep it if it is complete and current.
        if _read_stamp(folder) != _read_stamp(tmp):
            raise


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------
# Weights


def portable_weights(module: torch.nn.Module, key: str) -> dict[str, torch.Tensor]:
    """The state dict of `module` with every floating-point tensor given values that are the
    same on every machine.

    Why: `torch.manual_seed` + the modules' own initialisation draws floats with CPU kernels
    (normal_, uniform_) whose results depend on how they are vectorised (AVX2, AVX-512, NEON)
    and on the torch version, so the same seed gave different tiny weights on different
    machines. Here each tensor is filled from an integer hash (splitmix64 of a counter, keyed
    by `key` and the tensor's name: integer arithmetic, platform-independent), whose top 24
    bits k are mapped to (2k + 1 - 2**24) / 2**24 in (-1, 1): exact in float64. That is
    multiplied by the tensor's bound (one correctly rounded IEEE multiplication) and rounded
    once to the tensor's dtype: uniform(-bound, bound) values, bit-identical everywhere.

    Bounds follow PyTorch's default Linear/Conv initialisation: 1/sqrt(fan_in) for a weight
    (fan_in = the elements of one output row; a `(1, ..., dim)` parameter such as a modulation
    table counts as `dim` wide), and a bias uses the fan_in of the weight beside it (other 1-D
    tensors: 1/16). Constant tensors (norm gains of ones, zero biases and embeddings) are
    already exact and are kept. The Wan networks save no computed buffers (their RoPE tables
    and the like are not in the state dict); a non-constant floating-point buffer, whose
    values (cos, sin, exp...) could differ between machines, is refused rather than written.
    """
    import numpy as np
    import torch

    state = module.state_dict()
    parameters = {name for name, _ in module.named_parameters()}
    out = {}
    for name, value in state.items():
        value = value.detach()
        flat = value.reshape(-1)
        if not value.is_floating_point() or value.numel() == 0 or bool((flat == flat[0]).all()):
            out[name] = value.clone().contiguous()
            continue
        if name not in parameters:
            raise ValueError(f"{type(module).__name__}.{name}: a computed floating-point buffer in the state dict; "
                             "make its values portable before writing a tiny model set")
        bound = 1.0 / math.sqrt(_fan_in(name, value, state)) if value.ndim >= 2 or _has_weight(name, state) else 1 / 16
        seed = int.from_bytes(hashlib.sha256(f"{key}/{name}".encode()).digest()[:8], "little")
        k = _splitmix64(seed, value.numel()) >> np.uint64(40)  # 24 bits: 0 .. 2**24 - 1
        unit = (k.astype(np.float64) * 2.0 + (1.0 - 2.0**24)) * 2.0**-24  # exact odd multiples of 2**-24 in (-1, 1)
        out[name] = torch.from_numpy(unit * bound).to(value.dtype).reshape(value.shape).contiguous()
    return out


def _fan_in(name: str, value: torch.Tensor, state: dict[str, torch.Tensor]) -> int:
    if value.ndim == 1:
        value = state[name.rsplit(".", 1)[0] + ".weight"]
    if value.shape[0] == 1:  # a (1, ..., dim) parameter table, e.g. modulation
        return value.shape[-1]
    return value[0].numel() if value.ndim >= 2 else 1


def _has_weight(name: str, state: dict[str, torch.Tensor]) -> bool:
    weight = state.get(name.rsplit(".", 1)[0] + ".weight")
    return name.endswith(".bias") and weight is not None and weight.ndim >= 2


def _splitmix64(seed: int, n: int) -> np.ndarray:
    """n 64-bit outputs of splitmix64 started at `seed` (Steele, Lea & Flood 2014), vectorised."""
    import numpy as np

    with np.errstate(over="ignore"):
        z = np.uint64(seed) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


# ---------------------------------------------------------------------------------------
# .pth files


def save_pth(state: dict[str, torch.Tensor], path: Path) -> None:
    """`torch.save(state, path)`, with the one machine-dependent record made portable.

    torch.save writes a zip archive (fixed 1980 timestamps, records at fixed 64-byte
    alignment) and is deterministic except for `<archive>/.data/serialization_id`: 40 digits,
    the first 20 of which hash the record names with C++ `std::hash<std::string>` in
    `std::unordered_set` iteration order, both implementation-defined (libstdc++ on Linux,
    libc++ on macOS and MSVC on Windows give different ids). That record is overwritten in
    place, same length, with digits of the SHA-256 of everything before it, and its CRC-32 is
    updated in the data descriptor and central directory. The result is an ordinary torch.save
    archive: torch.load(weights_only=True, mmap=True) reads it, and zipfile checks its CRCs.
    """
    import torch

    torch.save(state, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next((i for i in archive.infolist() if i.filename.endswith("/.data/serialization_id")), None)
    if info is None:  # older torch versions write no such record
        return
    if info.compress_type != zipfile.ZIP_STORED:
        raise RuntimeError(f"{path}: unexpected compressed serialization_id record")
    offset = info.header_offset
    name_len, extra_len = struct.unpack_from("<HH", data, offset + 26)
    start = offset + 30 + name_len + extra_len
    size = info.file_size
    digits = str(int.from_bytes(hashlib.sha256(data[:offset]).digest(), "big") % 10**size).zfill(size).encode()
    old_crc, new_crc = info.CRC, zlib.crc32(digits)
    data[start:start + size] = digits
    if struct.unpack_from("<I", data, offset + 14)[0] == old_crc:  # local header
        struct.pack_into("<I", data, offset + 14, new_crc)
    if info.flag_bits & 0x08 and data[start + size:start + size + 4] == b"PK\x07\x08":  # data descriptor
        struct.pack_into("<I", data, start + size + 4, new_crc)
    name = info.filename.encode()
    central = data.find(b"PK\x01\x02", start + size)
    while central != -1:
        if data[central + 46:central + 46 + len(name)] == name and struct.unpack_from("<H", data, central + 28)[0] == len(name):
            struct.pack_into("<I", data, central + 16, new_crc)
            break
        central = data.find(b"PK\x01\x02", central + 4)
    else:
        raise RuntimeError(f"{path}: no central directory entry for {info.filename}")
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:  # the CRCs agree with the contents
        if archive.testzip() is not None:
            raise RuntimeError(f"{path}: rewriting the serialization_id left a bad CRC")


# ---------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_vocabulary(size: int, corpus: Sequence[str] | None = None) -> list[tuple[str, float]]:
    """`size` or fewer (piece, score) pairs for a T5-style unigram model, from `corpus` only
    (default the tiny sets' `_CORPUS`; the demo model passes its captions).

    <pad>=0, </s>=1, <unk>=2; then "▁" and every character of the (NFKC-normalised) corpus,
    alone and "▁"-prefixed, so any text made of them can be tokenised; then every whole word,
    "▁"-prefixed and bare (for unspaced text); then, while there is room, the other substrings
    of the words ranked by occurrences x (length - 1), ties by the piece itself. Scores follow a fixed rule: -10 per
    piece (the fewest pieces win) plus occurrences / 1024 as the tie-break, all exactly
    representable, so the JSON is the same everywhere.
    """
    words = [word for line in (corpus or _CORPUS) for word in unicodedata.normalize("NFKC", line).split()]
    counts: dict[str, int] = {}
    for word in words:
        text = "▁" + word
        for i in range(len(text)):
            for j in range(i + 1, len(text) + 1):
                counts[text[i:j]] = counts.get(text[i:j], 0) + 1
    chars = sorted({c for word in words for c in word})
    # Whole words also without "▁": unspaced text (Chinese) has its words inside one metaspace piece.
    whole = sorted(set(words))
    pieces = dict.fromkeys(["▁", *chars, *("▁" + c for c in chars), *("▁" + w for w in whole), *whole])
    rest = sorted((p for p in counts if p not in pieces), key=lambda p: (-counts[p] * (len(p) - 1), p))
    pieces = [*pieces, *rest][: size - 3]
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -10.0 + counts.get(p, 0) / 1024) for p in pieces]


def write_tokenizer(folder: Path, vocab: int, corpus: Sequence[str] | None = None) -> None:
    """A T5-style unigram tokenizer (<pad>=0, </s>=1 appended, <unk>=2) with a fixed vocabulary
    built from `corpus` (see `tokenizer_vocabulary`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(tokenizer_vocabulary(vocab, corpus), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<unk>")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"})
