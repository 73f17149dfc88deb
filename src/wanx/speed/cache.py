"""Step caching: on denoising steps where the DiT's block stack is predicted to change little,
skip it and add the residual (block-stack output minus input) it produced at the last step it
ran, per CFG branch. Two published predictors of "little":

- TeaCache (ali-vilab/TeaCache, the `use_ret_steps` variant): the relative L1 change of the
  modulated time embedding e0 between steps, mapped through a per-model degree-4 polynomial
  and accumulated; the stack runs when the sum reaches the threshold (and for the first 5
  steps). The accumulator stays on the device; the decision is one small host read per step
  for all branches together.
- MagCache (Zehong-Ma/MagCache): a per-model table of how much the residual's magnitude
  shrinks from step to step; the product of the ratios since the last computed step gives
  an accumulated error, and the stack runs when it reaches the threshold, after K skips in a
  row, or within the first `retention` fraction of steps. The schedule needs no tensor read.

Each CFG branch (cond, uncond) keeps its own state and residual, whether the branches come in
one batched forward (rows) or in separate forwards; the pipeline says which rows are which
(`at(step, branches)`), so nothing depends on the order of calls. When only some rows of a
batch run, only those rows go through the blocks.

Published calibrations exist for T2V-1.3B, T2V-14B and I2V-14B at 480P and 720P; another model
(tiny, demo, a fine-tune of another size) uses the nearest one, said in one line, or its own
calibration from `calibrate()` (`wanx calibrate-cache`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

KINDS = ("teacache", "magcache")

# TeaCache4Wan2.1 (`use_ret_steps` variant, probe e0), np.poly1d order: highest power first.
TEACACHE_COEFFICIENTS = {
    "t2v-1.3B": (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
    "t2v-14B": (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
    "i2v-480P": (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01),
    "i2v-720P": (8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02),
}
TEACACHE_RETENTION_STEPS = 5  # the e0 coefficients were fitted without the first 5 steps
TEACACHE_THRESHOLD = {"t2v-1.3B": 0.1, "t2v-14B": 0.2, "i2v-480P": 0.3, "i2v-720P": 0.3}  # README "fast"

# MagCache4Wan2.1 residual magnitude ratios, one per forward call: [2k] cond and [2k+1] uncond
# of step k, step 0 padded with 1.0 (T2V calibrated at 50 steps, I2V at 40).
MAGCACHE_RATIOS = {
    "t2v-14B": [1.0] * 2 + [
        1.02504, 1.03017, 1.00025, 1.00251, 0.9985, 0.99962, 0.99779, 0.99771, 0.9966, 0.99658, 0.99482, 0.99476,
        0.99467, 0.99451, 0.99664, 0.99656, 0.99434, 0.99431, 0.99533, 0.99545, 0.99468, 0.99465, 0.99438, 0.99434,
        0.99516, 0.99517, 0.99384, 0.9938, 0.99404, 0.99401, 0.99517, 0.99516, 0.99409, 0.99408, 0.99428, 0.99426,
        0.99347, 0.99343, 0.99418, 0.99416, 0.99271, 0.99269, 0.99313, 0.99311, 0.99215, 0.99215, 0.99218, 0.99215,
        0.99216, 0.99217, 0.99163, 0.99161, 0.99138, 0.99135, 0.98982, 0.9898, 0.98996, 0.98995, 0.9887, 0.98866,
        0.98772, 0.9877, 0.98767, 0.98765, 0.98573, 0.9857, 0.98501, 0.98498, 0.9838, 0.98376, 0.98177, 0.98173,
        0.98037, 0.98035, 0.97678, 0.97677, 0.97546, 0.97543, 0.97184, 0.97183, 0.96711, 0.96708, 0.96349, 0.96345,
        0.95629, 0.95625, 0.94926, 0.94929, 0.93964, 0.93961, 0.92511, 0.92504, 0.90693, 0.90678, 0.8796, 0.87945,
        0.86111, 0.86189],
    "t2v-1.3B": [1.0] * 2 + [
        1.0124, 1.02213, 1.00166, 1.0041, 0.99791, 1.00061, 0.99682, 0.99762, 0.99634, 0.99685, 0.99567, 0.99586,
        0.99416, 0.99422, 0.99578, 0.99575, 0.9957, 0.99563, 0.99511, 0.99506, 0.99535, 0.99531, 0.99552, 0.99549,
        0.99541, 0.99539, 0.9954, 0.99536, 0.99489, 0.99485, 0.99518, 0.99514, 0.99484, 0.99478, 0.99481, 0.99479,
        0.99415, 0.99413, 0.99419, 0.99416, 0.99396, 0.99393, 0.99388, 0.99386, 0.99349, 0.99349, 0.99309, 0.99304,
        0.9927, 0.9927, 0.99228, 0.99226, 0.99171, 0.9917, 0.99137, 0.99135, 0.99068, 0.99063, 0.99005, 0.99003,
        0.98944, 0.98942, 0.98849, 0.98849, 0.98758, 0.98757, 0.98644, 0.98643, 0.98504, 0.98503, 0.9836, 0.98359,
        0.98202, 0.98201, 0.97977, 0.97978, 0.97717, 0.97718, 0.9741, 0.97411, 0.97003, 0.97002, 0.96538, 0.96541,
        0.9593, 0.95933, 0.95086, 0.95089, 0.94013, 0.94019, 0.92402, 0.92414, 0.90241, 0.9026, 0.86821, 0.86868,
        0.81838, 0.81939],
    "i2v-480P": [1.0] * 2 + [
        0.98783, 0.98993, 0.97559, 0.97593, 0.98311, 0.98319, 0.98202, 0.98225, 0.9888, 0.98878, 0.98762, 0.98759,
        0.98957, 0.98971, 0.99052, 0.99043, 0.99383, 0.99384, 0.98857, 0.9886, 0.99065, 0.99068, 0.98845, 0.98847,
        0.99057, 0.99057, 0.98957, 0.98961, 0.98601, 0.9861, 0.98823, 0.98823, 0.98756, 0.98759, 0.98808, 0.98814,
        0.98721, 0.98724, 0.98571, 0.98572, 0.98543, 0.98544, 0.98157, 0.98165, 0.98411, 0.98413, 0.97952, 0.97953,
        0.98149, 0.9815, 0.9774, 0.97742, 0.97825, 0.97826, 0.97355, 0.97361, 0.97085, 0.97087, 0.97056, 0.97055,
        0.96588, 0.96587, 0.96113, 0.96124, 0.9567, 0.95681, 0.94961, 0.94969, 0.93973, 0.93988, 0.93217, 0.93224,
        0.91878, 0.91896, 0.90955, 0.90954, 0.92617, 0.92616],
    "i2v-720P": [1.0] * 2 + [
        0.99428, 0.99498, 0.98588, 0.98621, 0.98273, 0.98281, 0.99018, 0.99023, 0.98911, 0.98917, 0.98646, 0.98652,
        0.99454, 0.99456, 0.9891, 0.98909, 0.99124, 0.99127, 0.99102, 0.99103, 0.99215, 0.99212, 0.99515, 0.99515,
        0.99576, 0.99572, 0.99068, 0.99072, 0.99097, 0.99097, 0.99166, 0.99169, 0.99041, 0.99042, 0.99201, 0.99198,
        0.99101, 0.99101, 0.98599, 0.98603, 0.98845, 0.98844, 0.98848, 0.98851, 0.98862, 0.98857, 0.98718, 0.98719,
        0.98497, 0.98497, 0.98264, 0.98263, 0.98389, 0.98393, 0.97938, 0.9794, 0.97535, 0.97536, 0.97498, 0.97499,
        0.973, 0.97301, 0.96827, 0.96828, 0.96261, 0.96263, 0.95335, 0.9534, 0.94649, 0.94655, 0.93397, 0.93414,
        0.91636, 0.9165, 0.89088, 0.89109, 0.8679, 0.86768],
}
# (threshold, K, retention) from the MagCache4Wan2.1 README commands
MAGCACHE_SETTINGS = {"t2v-1.3B": (0.12, 4, 0.2), "t2v-14B": (0.24, 6, 0.2), "i2v-480P": (0.24, 6, 0.2),
                     "i2v-720P": (0.24, 6, 0.2)}
BRANCHES = ("cond", "uncond")
_NOTICED: set[tuple[str, str]] = set()


def calibration_key(config, height: int, width: int) -> tuple[str, bool]:
    """The published calibration for a DiT config and video size, and whether it is that
    model's own (False: the nearest one stands in)."""
    if config.model_type == "t2v":
        if config.dim == 1536 and config.num_layers == 30:
            return "t2v-1.3B", True
        if config.dim == 5120 and config.num_layers == 40:
            return "t2v-14B", True
        return ("t2v-14B" if config.dim > 1536 else "t2v-1.3B"), False
    key = "i2v-720P" if height * width > (832 * 480 + 1280 * 720) / 2 else "i2v-480P"
    return key, config.dim == 5120 and config.num_layers == 40


@dataclass
class CacheStats:
    """Block-stack passes per branch: computed and skipped (a skipped pass adds a residual)."""

    computed: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def total_computed(self) -> int:
        return sum(self.computed.values())

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        done, total = self.total_computed, self.total_computed + self.total_skipped
        return f"{done}/{total} block passes computed ({self.total_skipped} skipped)"


@dataclass
class _Branch:
    residual: Tensor | None = None
    previous: Tensor | None = None  # TeaCache: the probe at the last step
    accumulated: Tensor | float = 0.0  # TeaCache: device scalar; MagCache: error (float)
    ratio: float = 1.0  # MagCache
    skips: int = 0  # MagCache: skipped in a row
    probe_change: float = 0.0  # calibration: the probe's relative L1 change at this step


class StepCache:
    """A wrapper of `WanDiT.loop_wrappers`, put first (outermost: it sees whole tensors, outside
    sequence parallelism) by `add_to(dit)` and taken off by `remove()`. Use: `start(num_steps,
    dit, height, width)` per video, `at(step, branches)` before each DiT call, `stats` after."""

    def __init__(self, kind: str, threshold: float | None = None, *, magcache_k: int | None = None,
                 retention: float | None = None, calibration: dict | str | Path | None = None, quiet: bool = False):
        if kind not in KINDS:
            raise ValueError(f"cache must be one of {', '.join(KINDS)}, got {kind!r}")
        if threshold is not None and threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        self.kind, self.threshold, self.magcache_k, self.retention = kind, threshold, magcache_k, retention
        self.calibration = load_calibration(calibration) if isinstance(calibration, (str, Path)) else calibration
        self.quiet = quiet
        self.recording: dict[str, list] | None = None  # calibrate(): every step computed, measured
        self.stats = CacheStats()
        self.num_steps, self._step, self._branches = 0, 0, ("cond",)
        self.dit = None  # the model whose loop it wraps (`add_to`)

    # -- the pipeline's side ---------------------------------------------------------------

    def start(self, num_steps: int, config, height: int, width: int) -> None:
        """A new video: forget every branch, resolve the calibration and settings."""
        self.num_steps, self._state = num_steps, {}
        self.stats = CacheStats()
        key, own = calibration_key(config, height, width)
        cal = self.calibration or {}
        if self.kind == "teacache":
            self.coefficients = tuple(cal.get("teacache", TEACACHE_COEFFICIENTS[key]))
            self.active_threshold = self.threshold if self.threshold is not None else TEACACHE_THRESHOLD[key]
        else:
            ratios = cal.get("magcache", MAGCACHE_RATIOS[key])
            self.ratios = resample_ratios(ratios, num_steps)
            threshold, k, retention = MAGCACHE_SETTINGS[key]
            self.active_threshold = self.threshold if self.threshold is not None else threshold
            self.k = self.magcache_k if self.magcache_k is not None else k
            self.retained = int(2 * num_steps * (self.retention if self.retention is not None else retention))
        if not own and not self.calibration and (self.kind, key) not in _NOTICED and not self.quiet:
            _NOTICED.add((self.kind, key))  # once per process, not once per video or cache
            print(f"{self.kind}: no published calibration for this model; using Wan2.1 {key}'s "
                  f"(`wanx calibrate-cache` fits its own)", file=sys.stderr)

    def at(self, step: int, branches: Sequence[str]) -> None:
        """The next DiT call is denoising step `step` for these branches (one per batch row)."""
        self._step, self._branches = step, tuple(branches)

    # -- the DiT's side ----------------------------------------------------------------------

    def add_to(self, dit) -> StepCache:
        """Put this cache around `dit`'s block loop (outermost); `remove()` takes it off."""
        self.remove()
        self.dit = dit
        dit.loop_wrappers.insert(0, self)
        return self

    def remove(self) -> None:
        dit = getattr(self, "dit", None)
        if dit is not None:
            dit.loop_wrappers[:] = [w for w in dit.loop_wrappers if w is not self]
            self.dit = None

    def __call__(self, run, state) -> Tensor:
        x, e0 = state.x, state.e0
        branches = self._branches if len(self._branches) == x.shape[0] else ("cond",) * x.shape[0]
        if self.num_steps == 0:  # not started by a pipeline: a plain forward
            return run(state)
        compute = self._decide(branches, e0)
        rows = [i for i, c in enumerate(compute) if c]
        out = x.clone() if len(rows) < len(branches) else None
        if rows:
            def take(t):
                return t if t is None or t.shape[0] == 1 else t[rows]
            part = x if out is None else x[rows]
            result = run(replace(state, x=part, **{name: take(getattr(state, name)) for name in state.batch_fields}))
            residual = result - part
            for j, i in enumerate(rows):
                self._record(branches[i], residual[j:j + 1])
                self._state[branches[i]].residual = residual[j:j + 1]
            if out is None:
                out = result
            else:
                out[rows] = result
        for i, c in enumerate(compute):
            if not c:
                out[i:i + 1] += self._state[branches[i]].residual
        for name, c in zip(branches, compute):
            counts = self.stats.computed if c else self.stats.skipped
            counts[name] = counts.get(name, 0) + 1
        return out

    def _decide(self, branches: Sequence[str], e0: Tensor) -> list[bool]:
        states = [self._state.setdefault(name, _Branch()) for name in branches]
        if self.recording is not None:
            for row, state in enumerate(states):
                probe = _probe(e0, row)
                if state.previous is not None:
                    state.probe_change = float((probe - state.previous).abs().mean() / state.previous.abs().mean())
                state.previous = probe
            return [True] * len(branches)
        if self.kind == "magcache":
            return [self._magcache(name, state) for name, state in zip(branches, states)]
        return self._teacache(branches, states, e0)

    def _teacache(self, branches, states, e0: Tensor) -> list[bool]:
        if self.active_threshold <= 0:  # 0: every step computed (the plain run, for comparison)
            return [True] * len(branches)
        forced, flags = [], []
        for row, state in enumerate(states):
            probe = _probe(e0, row)
            must = self._step < TEACACHE_RETENTION_STEPS or state.previous is None or state.residual is None
            if must:
                state.accumulated = torch.zeros((), device=e0.device)
            else:
                change = (probe - state.previous).abs().mean() / state.previous.abs().mean()
                # a fitted polynomial can dip below 0 near 0; a negative change would never recompute
                state.accumulated = state.accumulated + _polyval(self.coefficients, change).clamp(min=0)
            state.previous = probe
            forced.append(must)
            flags.append(state.accumulated >= self.active_threshold)
        undecided = [i for i, f in enumerate(forced) if not f]
        decided = torch.stack([flags[i] for i in undecided]).tolist() if undecided else []  # the one host read
        compute = list(forced)
        for i, value in zip(undecided, decided):
            compute[i] = bool(value)
        for state, c in zip(states, compute):
            if c:
                state.accumulated = torch.zeros((), device=e0.device)
        return compute

    def _magcache(self, name: str, state: _Branch) -> bool:
        kind = name.split("@")[0]  # a context window's branch is "cond@<its first latent frame>"
        branch = BRANCHES.index(kind) if kind in BRANCHES else 0
        call = 2 * self._step + branch
        if call < self.retained or state.residual is None:
            return True
        state.ratio *= self.ratios[min(call, len(self.ratios) - 1)]
        state.skips += 1
        state.accumulated += abs(1 - state.ratio)
        if state.accumulated < self.active_threshold and state.skips <= self.k:
            return False
        state.accumulated, state.ratio, state.skips = 0.0, 1.0, 0
        return True

    def _record(self, name: str, residual: Tensor) -> None:
        """calibrate(): per branch and step, the probe's and the residual's relative L1 change
        (TeaCache's fit) and the residual's per-token magnitude ratio (MagCache's table)."""
        if self.recording is None:
            return
        state = self._state[name]
        previous = state.residual
        if previous is not None and previous.shape == residual.shape:
            rel = float((residual - previous).abs().mean() / previous.abs().mean())
            ratio = float((residual.float().norm(dim=-1) / previous.float().norm(dim=-1)).mean())
            self.recording.setdefault(name, []).append((self._step, state.probe_change, rel, ratio))


def _probe(e0: Tensor, row: int) -> Tensor:
    """TeaCache's probe for a batch row: the row's e0, or the one e0 a batch shares."""
    return (e0[row] if e0.shape[0] > 1 else e0[0]).float()


def _polyval(coefficients: Sequence[float], x: Tensor) -> Tensor:
    """Horner's rule on the device (np.poly1d order), so the accumulator never leaves it."""
    result = torch.zeros_like(x)
    for c in coefficients:
        result = result * x + c
    return result


def resample_ratios(ratios: Sequence[float], num_steps: int) -> list[float]:
    """A per-call table made at another step count, to `num_steps`: each branch's stream
    picked at the nearest index (first and last kept), then interleaved again."""
    if len(ratios) == 2 * num_steps:
        return list(ratios)
    out = []
    streams = [list(ratios[0::2]), list(ratios[1::2])]
    picked = []
    for stream in streams:
        if num_steps == 1:
            picked.append([stream[-1]])
            continue
        scale = (len(stream) - 1) / (num_steps - 1)
        picked.append([stream[int(round(i * scale))] for i in range(num_steps)])
    for cond, uncond in zip(*picked):
        out += [cond, uncond]
    return out


# -- calibration ---------------------------------------------------------------------------


CALIBRATION_FILE = "wanx-cache-calibration.json"


def calibration_path(folder: str | Path) -> Path:
    """Where `wanx calibrate-cache` keeps a model folder's calibration: in the folder when it is
    the user's own, else (the demo shipped in the package, a Hugging Face or ModelScope cache
    snapshot, a folder the user cannot write) under $WANX_HOME/calibrations/, named after the
    model and a digest of the folder's path (another snapshot is another model)."""
    import hashlib

    from ..tiny import wanx_home

    folder = Path(folder).resolve()
    if _users_own(folder):
        return folder / CALIBRATION_FILE
    parts = folder.parts
    repo = next((p.removeprefix("models--") for p, q in zip(parts, parts[1:])
                 if p.startswith("models--") and q == "snapshots"), None)
    name = "demo" if folder == _package() / "demo" / "model" else repo or folder.name
    digest = hashlib.sha1(str(folder).encode("utf-8")).hexdigest()[:10]
    return wanx_home() / "calibrations" / f"{name}-{digest}.json"


def find_calibration(folder: str | Path) -> Path | None:
    """The calibration `wanx calibrate-cache` made for a model folder (`calibration_path`), or
    one the folder holds itself; None when there is neither."""
    for path in (calibration_path(folder), Path(folder) / CALIBRATION_FILE):
        if path.is_file():
            return path
    return None


def _package() -> Path:
    return Path(__file__).resolve().parents[1]


def _users_own(folder: Path) -> bool:
    """A model folder the user made or chose (a `wanx download --dir` folder, a fine-tune), as
    opposed to one a tool keeps: the package's own files and download caches are not for
    user data (a reinstall or a cache cleanup would lose it, or write into site-packages)."""
    import os

    if folder.is_relative_to(_package()):
        return False
    parts = folder.parts
    if any(p.startswith("models--") and q == "snapshots" for p, q in zip(parts, parts[1:])):
        return False  # huggingface_hub's cache layout
    modelscope = Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope")).resolve()
    if folder.is_relative_to(modelscope):
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def load_calibration(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such cache calibration file (make one with `wanx calibrate-cache`)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a cache calibration file ({err})") from None
    if not isinstance(data, dict) or not ({"teacache", "magcache"} & data.keys()):
        raise ValueError(f"{path}: not a cache calibration file (needs 'teacache' and/or 'magcache')")
    return data


def fit_calibration(recordings: list[dict[str, list]], num_steps: int) -> dict:
    """TeaCache: a degree-4 polynomial from the probe's to the residual's relative L1 change
    (steps after the retained ones); MagCache: the mean magnitude ratio per step and branch,
    padded with 1.0 for step 0, interleaved cond/uncond."""
    import numpy as np

    xs, ys = [], []
    table = {name: [[] for _ in range(num_steps)] for name in BRANCHES}
    for recording in recordings:
        for name, rows in recording.items():
            for step, probe_change, rel, ratio in rows:
                if step >= TEACACHE_RETENTION_STEPS:
                    xs.append(probe_change)
                    ys.append(rel)
                if name in table:
                    table[name][step].append(ratio)
    if len(xs) < 5:
        raise ValueError(f"calibration needs more steps after the first {TEACACHE_RETENTION_STEPS}: use --steps 20 or more")
    coefficients = [float(c) for c in np.polyfit(np.array(xs), np.array(ys), 4)]
    ratios = []
    for step in range(num_steps):
        for name in BRANCHES:
            values = table[name][step]
            fallback = table["cond"][step] or [1.0]
            ratios.append(round(float(np.mean(values or fallback)), 5) if step else 1.0)
    return {"teacache": coefficients, "magcache": ratios, "num_steps": num_steps}


def calibrate(pipe, prompts: Sequence[str], *, num_inference_steps: int = 50, progress: bool = True,
              **request) -> dict:
    """Generate `prompts` uncached, measuring every step, and fit this model's own TeaCache
    polynomial and MagCache table (`fit_calibration`)."""
    cache = StepCache("teacache", quiet=True)
    cache.recording = {}
    recordings = []
    previous_cache = getattr(pipe, "step_cache", None)
    pipe.step_cache = cache
    try:
        for prompt in prompts:
            cache.recording = {}
            pipe(prompt, num_inference_steps=num_inference_steps, progress=progress, output_type="latents", **request)
            recordings.append(cache.recording)
    finally:
        pipe.step_cache = previous_cache
    return fit_calibration(recordings, num_inference_steps)

