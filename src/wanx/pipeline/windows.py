"""Context windows: a video longer than the DiT was trained on (81 frames, 21 latent frames),
denoised in one run. At every step the DiT sees overlapping windows of latent frames, each
as a video of its own (RoPE positions from 0 in every window, so the model stays in the
range it was trained on), and the guided predictions are blended over the overlaps. The
sampler still takes one step over the whole latent video, so the windows agree a little more
with each step. One window covering the video is the plain run, untouched.

Schedules (where the windows sit at step s):
- static: the same windows every step, the last one flush with the end;
- uniform: the grid slides by half a stride from step to step, so no seam stays in one place;
- looped: windows wrap around the end, for a video that loops (the last frames blend into
  the first).
Blends (the weight of each window's frames): linear ramps over the overlap (flat elsewhere),
or pyramid (highest in the middle of every window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

SCHEDULES = ("static", "uniform", "looped")
BLENDS = ("linear", "pyramid")


@dataclass(frozen=True)
class ContextWindows:
    """The request: windows of `frames` video frames (4k+1) overlapping by `overlap` video
    frames (a multiple of the VAE's temporal stride, 4), placed by `schedule`, blended by `blend`."""

    frames: int = 81
    overlap: int = 16
    schedule: str = "static"
    blend: str = "linear"
    color_match: bool = False  # hold later windows to the first one's colours (`match_colors`)


@dataclass(frozen=True)
class Windows:
    """Context windows planned for one request, in latent frames."""

    size: int  # latent frames per window
    overlap: int  # latent frames shared by neighbours
    total: int  # latent frames of the video
    schedule: str = "static"
    blend: str = "linear"
    color_match: bool = False

    @property
    def stride(self) -> int:
        return self.size - self.overlap

    def at(self, step: int) -> list[list[int]]:
        """The windows of step `step`: latent frame indices, each list `size` long."""
        if self.schedule == "looped":
            phase = (step * max(1, self.stride // 2)) % self.stride
            count = math.ceil(self.total / self.stride)
            return [[(phase + k * self.stride + i) % self.total for i in range(self.size)] for k in range(count)]
        if self.schedule == "uniform":
            phase = (step * max(1, self.stride // 2)) % self.stride
            starts = [0] + list(range(phase or self.stride, self.total - self.size, self.stride)) + \
                [self.total - self.size]
        else:
            starts = list(range(0, self.total - self.size, self.stride)) + [self.total - self.size]
        return [list(range(start, start + self.size)) for start in sorted(set(starts))]

    def weight(self, window: list[int]) -> Tensor:
        """`[size]` float32 weights of a window's frames. Linear: ramps over `overlap` frames at
        each end that meets another window (not at the video's first or last frame unless the
        windows loop); pyramid: 1, 2, .. up to the middle and down again."""
        n = self.size
        position = torch.arange(n, dtype=torch.float32)
        if self.blend == "pyramid":
            return torch.minimum(position + 1, n - position)
        w = torch.ones(n)
        if self.overlap == 0:
            return w
        ramp = (position[: self.overlap] + 1) / (self.overlap + 1)
        looped = self.schedule == "looped"
        if looped or window[0] != 0:
            w[: self.overlap] = torch.minimum(w[: self.overlap], ramp)
        if looped or window[-1] != self.total - 1:
            w[n - self.overlap:] = torch.minimum(w[n - self.overlap:], ramp.flip(0))
        return w

    def texts(self, texts: tuple, frames: list[int]) -> tuple:
        """(context, context_null) of a window: with prompts over time (context `[n, L, D]`),
        the prompt of the stretch of the video where the window's middle lies."""
        context, context_null = texts
        if len(context) == 1:
            return texts
        middle = (frames[0] + frames[-1]) / 2 / self.total
        row = min(len(context) - 1, int(middle * len(context)))
        return context[row: row + 1], context_null

    def count(self, steps: int) -> int:
        """DiT windows run over `steps` steps (a progress bar's total)."""
        return sum(len(self.at(step)) for step in range(steps))

    def run(self, step: int, x: Tensor, predict: Callable[[Tensor, list[int]], Tensor], done=None) -> Tensor:
        """The blended prediction for latents x `[B, C, F', H, W]`: predict(window latents,
        frame indices) on every window of this step, weighted and normalised per frame.
        done(): called after each window (a progress bar)."""
        out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        norm = torch.zeros(self.total, device=x.device, dtype=torch.float32)
        for window in self.at(step):
            index = torch.tensor(window, device=x.device)
            v = predict(x.index_select(2, index), window)
            w = self.weight(window).to(x.device)
            out.index_add_(2, index, v.float() * w.view(1, 1, -1, 1, 1))
            norm.index_add_(0, index, w)
            if done is not None:
                done()
        return (out / norm.view(1, 1, -1, 1, 1)).to(x.dtype)

    def describe(self, temporal: int) -> str:
        count = len(self.at(0))
        return (f"context windows: {count} of {self.size} latent frames ({video_frames(self.size, temporal)} "
                f"frames) over {self.total} ({video_frames(self.total, temporal)} frames), overlap {self.overlap} "
                f"latent frames ({self.overlap * temporal} frames), {self.schedule} schedule, {self.blend} blend")


def video_frames(latent_frames: int, temporal: int) -> int:
    return (latent_frames - 1) * temporal + 1


def plan_windows(request: ContextWindows | None, num_frames: int, temporal: int, name) -> Windows | None:
    """Check a ContextWindows request against a video of `num_frames` and convert it to latent
    frames; None when one window covers the video (the plain run)."""
    from .plan import RequestError

    if request is None:
        return None
    if not isinstance(request, ContextWindows):
        raise TypeError(f"context_windows must be a wanx.pipeline.ContextWindows, got {type(request).__name__}")
    if request.schedule not in SCHEDULES:
        raise RequestError("context_schedule", f"{name('context_schedule')} {request.schedule!r} is not one of "
                                               f"{', '.join(SCHEDULES)}")
    if request.blend not in BLENDS:
        raise RequestError("context_blend", f"{name('context_blend')} {request.blend!r} is not one of "
                                            f"{', '.join(BLENDS)}")
    frames, overlap = request.frames, request.overlap
    if frames < 1 or (frames - 1) % temporal:
        low = max(1, (frames - 1) // temporal * temporal + 1)
        raise RequestError("context_frames", f"{name('context_frames')} {frames} must be {temporal}k+1 video frames "
                                             f"(e.g. {low} or {low + temporal}; Wan is trained on 81)")
    if frames > num_frames:
        raise RequestError("context_frames", f"{name('context_frames')} {frames} is longer than the video's "
                                             f"{num_frames} frames: give at most {num_frames} (or more "
                                             f"{name('num_frames')})")
    if overlap < 0 or overlap % temporal:
        raise RequestError("context_overlap", f"{name('context_overlap')} {overlap} must be a multiple of "
                                              f"{temporal} video frames (one latent frame each), >= 0")
    if overlap >= frames:
        raise RequestError("context_overlap", f"{name('context_overlap')} {overlap} must be less than "
                                              f"{name('context_frames')} {frames} (the windows must move on)")
    total = (num_frames - 1) // temporal + 1
    size = (frames - 1) // temporal + 1
    if size == total and request.schedule != "looped":
        return None
    return Windows(size, overlap // temporal, total, request.schedule, request.blend, bool(request.color_match))


def match_colors(latents: Tensor, reference: int) -> Tensor:
    """Colour and brightness held to the first `reference` latent frames (the first window):
    each later latent frame's per-channel mean and standard deviation, taken over a moving span
    of `reference` frames around it (so motion and flicker inside a window stay as they are),
    are moved to the reference's. Wan's latent channels carry colour and brightness, so this
    is the pixel-space correction peers do (Wan2GP matches each window to the last), done on
    the small latents before decoding: the decoder streams untouched."""
    x = latents.float()
    total = x.shape[2]
    if reference >= total:
        return latents
    dims = (0, 2, 3, 4)  # per channel
    mean_ref, std_ref = x[:, :, :reference].mean(dims, keepdim=True), x[:, :, :reference].std(dims, keepdim=True)
    out = x.clone()
    half = reference // 2
    for f in range(reference, total):
        span = x[:, :, max(0, f - half): min(total, f - half + reference)]
        mean, std = span.mean(dims, keepdim=True), span.std(dims, keepdim=True)
        out[:, :, f: f + 1] = (x[:, :, f: f + 1] - mean) / std.clamp_min(1e-6) * std_ref + mean_ref
    return out.to(latents.dtype)


# -- measurements (bench/long_video.py, tests) ------------------------------------------------

def seam_frames(windows: Windows, temporal: int) -> list[int]:
    """Video frames i whose step to frame i + 1 crosses the edge of a window (the windows of
    step 0): where a window's influence begins or ends."""
    edges = set()
    for window in windows.at(0):
        for k in (window[0], window[-1] + 1):
            if 0 < k < windows.total:  # between latent frames k - 1 and k
                edges.add((k - 1) * temporal)  # the last video frame of latent k - 1
    return sorted(edges)


def seam_ratio(frames, seams: list[int]) -> tuple[float, float, float]:
    """(mean |frame difference| at the seams, inside the windows, their ratio) of uint8 frames
    `[F, H, W, 3]`; a ratio near 1 means the seams do not show as jumps."""
    import numpy as np

    video = np.asarray(frames, dtype=np.float32)
    steps = np.abs(np.diff(video, axis=0)).mean(axis=(1, 2, 3))  # [F - 1]
    at = np.zeros(len(steps), dtype=bool)
    at[[i for i in seams if i < len(steps)]] = True
    seam, inside = float(steps[at].mean()), float(steps[~at].mean())
    return seam, inside, seam / max(inside, 1e-9)


def color_drift(frames, span: int) -> dict[str, float]:
    """How far colours wander: per-channel mean (and standard deviation) of each run of `span`
    frames against the first run, the largest absolute difference in levels of 255."""
    import numpy as np

    video = np.asarray(frames, dtype=np.float32)
    runs = [video[i: i + span] for i in range(0, len(video) - span // 2, span)]
    means = np.stack([r.mean(axis=(0, 1, 2)) for r in runs])
    stds = np.stack([r.std(axis=(0, 1, 2)) for r in runs])
    return {"mean": float(np.abs(means - means[0]).max()), "std": float(np.abs(stds - stds[0]).max()),
            "runs": len(runs)}
