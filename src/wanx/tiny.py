"""Tiny random-weight Wan2.1 model sets in the official folder layout, made locally in seconds.

They exercise the whole path (checkpoint discovery, loading, tokenising, text and image
encoding, sampling, decoding, video files) offline on a CPU. Their videos are noise: real
videos need the real weights (`wanx download Wan-AI/Wan2.1-T2V-1.3B`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_MODELS = {"tiny": "t2v", "tiny-i2v": "i2v", "tiny-flf2v": "flf2v"}

# Enough text for a small unigram vocabulary; other characters become <unk>.
_CORPUS = [
    "a cat walks on the grass in the sun", "a dog runs through the park at night", "the camera pans slowly to the left",
    "waves crash on a rocky beach", "a red car drives down a city street", "小猫在草地上走", "镜头切换，镜头晃动，色调艳丽，过曝，静态",
]


def tiny_model_dir(name: str) -> Path:
    """Where `name` is kept: $WANX_HOME (default ~/.cache/wanx)/<name>; made on first use."""
    home = Path(os.environ.get("WANX_HOME", Path.home() / ".cache" / "wanx"))
    folder = home / name
    if not (folder / "config.json").is_file():
        make_tiny_model(folder, TINY_MODELS[name])
    return folder


def make_tiny_model(folder: str | Path, task: str = "t2v", seed: int = 0) -> Path:
    """Write a tiny model set for `task` (t2v, i2v, flf2v) with the official file names."""
    from safetensors.torch import save_file

    from .configs import official_config_json
    from .models.clip import CLIPVisionEncoder
    from .models.t5 import UMT5Encoder
    from .models.transformer import WanDiT
    from .models.vae import WanVAE

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    preset = {"t2v": "tiny", "i2v": "tiny-i2v", "flf2v": "tiny-flf2v"}[task]
    dit = WanDiT(preset)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(tmp / "diffusion_pytorch_model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(official_config_json(dit.config)))
    torch.save(WanVAE("tiny").state_dict(), tmp / "Wan2.1_VAE.pth")
    torch.save(UMT5Encoder("tiny").state_dict(), tmp / "models_t5_umt5-xxl-enc-bf16.pth")
    _write_tokenizer(tmp / "google" / "umt5-xxl", vocab=UMT5Encoder("tiny").config.vocab)
    if task != "t2v":
        torch.save(CLIPVisionEncoder("tiny").state_dict(), tmp / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def _write_tokenizer(folder: Path, vocab: int) -> None:
    """A T5-style unigram tokenizer (<pad>=0, </s>=1 appended, <unk>=2) trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_CORPUS * 10, trainers.UnigramTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}))
