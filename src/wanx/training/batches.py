"""The prepared items a run trains on (`wanx prepare` writes them): found in the dataset's
cache, grouped by latent shape, and drawn in a fixed order from the seed and the epoch."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn


def cached_items(data: Path) -> list[Path]:
    """The prepared items: `data/.wanx-cache/*.safetensors`, or `data/*.safetensors`."""
    from .prepare import EMPTY_TEXT_FILE

    data = Path(data)
    if not data.is_dir():
        raise ValueError(f"{data}: no such dataset or cache folder")
    for folder in (data / ".wanx-cache", data):
        files = sorted(p for p in folder.glob("*.safetensors") if p.name != EMPTY_TEXT_FILE)
        if files:
            return files
    raise ValueError(f"{data}: no prepared items; run `wanx prepare {data} --model ...` first")


class CachedDataset:
    """The prepared items, grouped by latent shape (their bucket): a micro-batch is stacked
    from one group. Every epoch is a fresh permutation from the seed; no item is dropped (a
    group's last batch may be smaller)."""

    def __init__(self, files: list[Path], batch_size: int = 1, repeats: int = 1, seed: int = 0,
                 empty_text: bool = False):
        from safetensors import safe_open
        from safetensors.torch import load_file

        from .prepare import EMPTY_TEXT_FILE, check_item

        self.files, self.batch_size, self.repeats, self.seed = files, batch_size, repeats, seed
        self.empty_text = None  # [L, text_dim]: the empty prompt, for caption dropout
        if empty_text:
            path = files[0].parent / EMPTY_TEXT_FILE
            if not path.is_file():
                raise ValueError(f"{path.parent}: no {EMPTY_TEXT_FILE} (caches made before wanx cached the empty "
                                 "prompt); run `wanx prepare` again, which adds it and keeps the items")
            self.empty_text = load_file(str(path))["context"]
        self.shapes, self.settings = [], set()
        for path in files:
            check_item(path)
            with safe_open(str(path), framework="pt") as fh:
                shape = tuple(fh.get_slice("latents").get_shape())
                if "vace_context" in fh.keys():  # its reference frames too: a batch stacks both
                    shape += tuple(fh.get_slice("vace_context").get_shape())
                self.shapes.append(shape)
                self.settings.add((fh.metadata() or {}).get("settings", ""))
        counts: dict[tuple, int] = {}
        for shape in self.shapes:
            counts[shape] = counts.get(shape, 0) + repeats
        self.batches_per_epoch = sum(math.ceil(n / batch_size) for n in counts.values())
        self._epoch, self._order = -1, []

    def batch(self, index: int) -> list[int]:
        """The items of global micro-batch `index` (epochs follow each other)."""
        epoch, position = divmod(index, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._epoch_batches(epoch)
        return self._order[position]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        indices = [i for i in range(len(self.files)) for _ in range(self.repeats)]
        batches, open_ = [], {}
        for k in torch.randperm(len(indices), generator=generator).tolist():
            shape = self.shapes[indices[k]]
            open_.setdefault(shape, []).append(indices[k])
            if len(open_[shape]) == self.batch_size:
                batches.append(open_.pop(shape))
        batches.extend(open_.values())  # the remainders, in the order their groups opened
        return batches

    def load(self, indices: list[int], device: torch.device) -> dict[str, Tensor]:
        """x0 `[B, 16, F', h, w]`, context `[B, L, text_dim]` (zero-padded to the longest, as
        the DiT pads anyway), for caption dropout `empty_text` `[1, L, text_dim]` padded the
        same, for I2V items clip_features and y, for VACE items vace_context."""
        from safetensors.torch import load_file

        states = [load_file(str(self.files[i])) for i in indices]
        texts = [s["context"] for s in states] + ([self.empty_text] if self.empty_text is not None else [])
        longest = max(t.shape[0] for t in texts)
        texts = [nn.functional.pad(t, (0, 0, 0, longest - t.shape[0])) for t in texts]
        batch = {"x0": torch.stack([s["latents"] for s in states]), "context": torch.stack(texts[: len(states)])}
        if self.empty_text is not None:
            batch["empty_text"] = texts[-1][None].to(batch["context"].dtype)
        for key in ("clip_features", "y", "vace_context"):
            if key in states[0]:
                batch[key] = torch.stack([s[key] for s in states])
        return {k: v.to(device) for k, v in batch.items()}

