"""Prompts to umT5 embeddings, as the official pipeline does it.

Prompts are cleaned (ftfy, HTML unescaping, whitespace), tokenised with the checkpoint's own
tokenizer (`google/umt5-xxl/tokenizer.json`, read locally with `tokenizers`, never fetched),
padded/truncated to 512 with EOS, encoded, then trimmed to the true token count and
zero-padded back to 512: padded positions carry zeros, not encoder states.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch
from torch import Tensor

TEXT_LEN = 512


def clean_prompt(text: str) -> str:
    """The official 'whitespace' cleaning: ftfy fix, HTML unescape twice, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy is optional: it only repairs mis-decoded (mojibake) text
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class Tokenizer:
    """A `tokenizer.json` read with `tokenizers`: EOS appended by its post-processor,
    truncated and padded to `length`."""

    def __init__(self, path: str | Path, length: int = TEXT_LEN):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (expected the google/umt5-xxl tokenizer folder)")
        self.length = length
        self._tok = HFTokenizer.from_file(str(file))
        pad_id = self._tok.token_to_id("<pad>")
        self._tok.enable_truncation(max_length=length)
        self._tok.enable_padding(length=length, pad_id=0 if pad_id is None else pad_id, pad_token="<pad>")

    def count(self, prompt: str) -> int:
        """The tokens of `prompt` (EOS included) before truncation: more than `length` are not read."""
        if not hasattr(self, "_whole"):
            from tokenizers import Tokenizer as HFTokenizer

            self._whole = HFTokenizer.from_str(self._tok.to_str())
            self._whole.no_truncation()
            self._whole.no_padding()
        return len(self._whole.encode(clean_prompt(prompt)).ids)

    def first_too_long(self, texts: list[str], limit: int) -> tuple[int, int] | None:
        """(index, tokens) of the first text with more than `limit` tokens (the model would cut
        it), or None. Counted untruncated: the mask of `__call__` stops at `length`."""
        for k, text in enumerate(texts):
            count = self.count(text)
            if count > limit:
                return k, count
        return None

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """-> input_ids `[B, length]` int64, attention_mask `[B, length]` int64."""
        encodings = self._tok.encode_batch([clean_prompt(p) for p in prompts])
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask


class TextEncoder:
    """umT5 + tokenizer. `encode(prompts) -> (embeddings [B, 512, dim], lengths [B])`.

    Embeddings beyond each prompt's token count (EOS included) are zero. The same prompt is
    encoded once per process: results are cached on CPU.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, device: str | torch.device | None = None):
        self.model, self.tokenizer = model, tokenizer
        # Where the encoder computes; its weights may live elsewhere between uses (offloading).
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._cache: dict[str, tuple[Tensor, int]] = {}

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, tokenizer: str | Path, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "TextEncoder":
        from .loading import load_model

        tok = Tokenizer(tokenizer)  # fail on a missing tokenizer before loading 11 GB of weights
        return cls(load_model(checkpoint, dtype=dtype, device=device), tok)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            ids, mask = self.tokenizer(todo)
            states = self.model(ids.to(self.device), mask.to(self.device)).float().cpu()
            for prompt, row, n in zip(todo, states, mask.sum(1).tolist()):
                self._cache[prompt] = (row[:n].clone(), n)
        dim = self.model.config.dim
        out = torch.zeros(len(prompts), self.tokenizer.length, dim)
        lengths = torch.zeros(len(prompts), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            states, n = self._cache[prompt]
            out[i, :n], lengths[i] = states, n
        return out, lengths
