"""The shapes dataset for the demo model: short captioned clips of one coloured shape moving
over a plain background, and a detector that checks a video against its caption.

Every clip is one combination of four words, each from a fixed vocabulary:

    colour      red, green, blue, yellow, white
    shape       circle, square, triangle
    motion      left, right, up, down           ("moving left", ...)
    background  black, gray

5 * 3 * 4 * 2 = 120 combinations. The six in `HELD_OUT` never appear in a written dataset,
so a model that draws them right has composed the words rather than recalled a clip; every
single word, and every pair of words, still occurs in the other 114.

Captions come in English ("a red circle moving left on a black background") and Chinese
("黑色背景上一个红色的圆形向左移动"), because Wan is prompted in both. `parse_caption` reads
either back, `detect` reads the attributes off frames, and `score` compares the two: the
build's accuracy report and the tests use them, so they work on decoded H.264 (whose colours
and edges are a little off) as well as on rendered frames.

Rendering is numpy only and seeded: the same (attrs, seed, size, frames) gives byte-identical
frames on every machine.
"""

from __future__ import annotations

import csv
import itertools
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

# Saturated, far apart in RGB, and each far from both backgrounds (>= 140 in RGB distance),
# so a nearest-colour lookup survives H.264's chroma subsampling and a small VAE's blur.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (128, 128, 128)}

ZH_COLORS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "white": "白色"}
ZH_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
ZH_MOTIONS = {"left": "向左移动", "right": "向右移动", "up": "向上移动", "down": "向下移动"}
ZH_BACKGROUNDS = {"black": "黑色", "gray": "灰色"}

LANGUAGES = ("en", "zh")
ATTRIBUTES = ("color", "shape", "motion", "background")

# Image rows grow downwards, so "up" is a negative y step.
_STEPS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
_SUPERSAMPLE = 4  # 4x4 samples per pixel: antialiased edges, so no aliasing for the VAE to learn


class Attrs(NamedTuple):
    """One clip's content; `motion` is the direction alone ("left"), captions add "moving"."""

    color: str
    shape: str
    motion: str
    background: str


# Chosen by hand: each colour, shape, motion and background is in at least one, and no two
# share three words, so every word, pair and triple of words still occurs in training; only
# the four-word combination is new.
HELD_OUT: tuple[Attrs, ...] = (
    Attrs("red", "circle", "left", "black"),
    Attrs("green", "square", "up", "gray"),
    Attrs("blue", "triangle", "right", "black"),
    Attrs("yellow", "circle", "down", "gray"),
    Attrs("white", "triangle", "left", "gray"),
    Attrs("red", "square", "down", "black"),
)


def all_combinations() -> list[Attrs]:
    """All 120 combinations, in vocabulary order."""
    return [Attrs(*c) for c in itertools.product(COLORS, SHAPES, MOTIONS, BACKGROUNDS)]


def training_combinations() -> list[Attrs]:
    """The 114 combinations a written dataset draws from: all but `HELD_OUT`."""
    held = set(HELD_OUT)
    return [a for a in all_combinations() if a not in held]


def _check(attrs: Attrs) -> Attrs:
    attrs = Attrs(*attrs)
    for name, value, allowed in zip(ATTRIBUTES, attrs, (COLORS, SHAPES, MOTIONS, BACKGROUNDS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
    return attrs


# ----------------------------------------------------------------------------- captions


def words(attrs: Attrs | Sequence[str], lang: str = "en") -> list[str]:
    """The caption of a combination as its words, in English ("en") or Chinese ("zh")."""
    color, shape, motion, background = _check(attrs)
    if lang == "en":
        return ["a", color, shape, "moving", motion, "on", "a", background, "background"]
    if lang == "zh":
        turn = ZH_MOTIONS[motion]
        return [ZH_BACKGROUNDS[background], "背景", "上", "一个", ZH_COLORS[color], "的", ZH_SHAPES[shape],
                turn[:2], turn[2:]]
    raise ValueError(f"unknown caption language {lang!r}; choose one of {', '.join(LANGUAGES)}")


def caption(attrs: Attrs | Sequence[str], lang: str = "en") -> str:
    """The caption of a combination: "a red circle moving left on a black background", or
    "黑色背景上一个红色的圆形向左移动" (Chinese is written without spaces)."""
    return (" " if lang == "en" else "").join(words(attrs, lang))


def tokenizer_corpus() -> list[str]:
    """Every caption with its words apart, Chinese included, for building the demo tokenizer.
    Chinese captions have no spaces, so a vocabulary learnt from them as written holds each
    whole caption as one piece: a held-out caption then shares no token with training, and
    nothing can compose. From the words, "红色" or "向左" is one piece in every caption."""
    return [" ".join(words(a, lang)) for a in all_combinations() for lang in LANGUAGES]


def _one(found: set[str], name: str, text: str) -> str:
    if len(found) != 1:
        what = "no" if not found else f"several ({', '.join(sorted(found))})"
        raise ValueError(f"caption {text!r} names {what} {name}; it needs exactly one")
    return found.pop()


def parse_caption(text: str) -> Attrs:
    """(colour, shape, motion, background) named by an English or Chinese caption. Lenient
    about wording ("grey", "towards the left", "方形") but strict about content: a caption
    that names none or two of an attribute raises ValueError, so a bad prompt cannot score."""
    if re.search(r"[\u4e00-\u9fff]", text):
        # Background first and cut out, so its colour word (黑色/灰色) is not read as the shape's.
        backgrounds = {k for k, w in ZH_BACKGROUNDS.items() if w + "背景" in text}
        rest = re.sub("(黑色|灰色)背景", "", text)
        colors = {k for k, w in ZH_COLORS.items() if w in rest or w[0] + "的" in rest}
        shapes = {k for k, w in ZH_SHAPES.items() if w in rest}
        if not shapes and "方形" in rest:  # 正方形 is the caption's word; people also write 方形
            shapes = {"square"}
        motions = {k for k in MOTIONS if ZH_MOTIONS[k][:2] in rest}  # 向左 with or without 移动
    else:
        words = re.findall(r"[a-z]+", text.lower().replace("grey", "gray"))
        colors = {w for w in words if w in COLORS}
        shapes = {w for w in words if w in SHAPES}
        backgrounds = {w for w, nxt in zip(words, words[1:]) if w in BACKGROUNDS and nxt == "background"}
        motions = {w for w in words if w in MOTIONS}
    return Attrs(_one(colors, "colour", text), _one(shapes, "shape", text),
                 _one(motions, "motion", text), _one(backgrounds, "background", text))


# ----------------------------------------------------------------------------- rendering


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    if min(height, width) < 32:
        raise ValueError(f"clip size {height}x{width} is too small; use at least 32x32")
    return int(height), int(width)


def _coverage(shape: str, ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, side: float) -> np.ndarray:
    """Which sample points lie inside the shape; every shape fills a `side` x `side` box, so
    the box's fill ratio (square 1, circle pi/4, triangle 1/2) tells them apart."""
    dy, dx = ys - cy, xs - cx
    half = side / 2
    if shape == "circle":
        return dy * dy + dx * dx <= half * half
    if shape == "square":
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    # Apex up, base down: the half-width grows linearly from 0 at the top to `half` at the base.
    return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)


def render_clip(attrs: Attrs | Sequence[str], seed: int = 0, size: int | tuple[int, int] = 96,
                frames: int = 17) -> np.ndarray:
    """One clip, uint8 `[frames, H, W, 3]` (`size` is H=W or (H, W)). The seed draws the shape's
    size (20-28% of the short side), how far it travels (45-60% of the frame along its motion,
    at constant speed) and where it starts; the whole shape stays inside the frame throughout."""
    color, shape, motion, background = _check(attrs)
    height, width = _size(size)
    if frames < 2:
        raise ValueError(f"a clip needs at least 2 frames to move, got {frames}")
    rng = np.random.default_rng(seed)
    side = rng.uniform(0.20, 0.28) * min(height, width)
    step_y, step_x = _STEPS[motion]
    along = height if step_y else width
    # A long path: the direction is then also where the shape is (a left-moving one starts on
    # the right and ends on the left), which a model picks up from few clips; with short paths
    # from anywhere the mean clip of each direction is nearly still.
    travel = rng.uniform(0.45, 0.60) * along
    margin = side / 2 + 1  # +1: the antialiased rim stays inside too
    # Start anywhere that leaves room for the whole path, in both directions.
    lo_y, hi_y = margin, height - margin
    lo_x, hi_x = margin, width - margin
    if step_y:
        cy0 = rng.uniform(lo_y + travel, hi_y) if step_y < 0 else rng.uniform(lo_y, hi_y - travel)
        cx0 = rng.uniform(lo_x, hi_x)
    else:
        cy0 = rng.uniform(lo_y, hi_y)
        cx0 = rng.uniform(lo_x + travel, hi_x) if step_x < 0 else rng.uniform(lo_x, hi_x - travel)

    s = _SUPERSAMPLE
    ys = (np.arange(height * s) + 0.5) / s
    xs = (np.arange(width * s) + 0.5) / s
    fg = np.asarray(COLORS[color], dtype=np.float64)
    bg = np.asarray(BACKGROUNDS[background], dtype=np.float64)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    out[:] = np.rint(bg).astype(np.uint8)
    for i in range(frames):
        t = i / (frames - 1)
        cy, cx = cy0 + step_y * travel * t, cx0 + step_x * travel * t
        # Sample only the pixels the shape's box touches: the same values, a tenth of the work.
        y0, y1 = max(int(cy - side / 2) - 1, 0), min(int(cy + side / 2) + 2, height)
        x0, x1 = max(int(cx - side / 2) - 1, 0), min(int(cx + side / 2) + 2, width)
        inside = _coverage(shape, ys[y0 * s:y1 * s, None], xs[None, x0 * s:x1 * s], cy, cx, side)
        alpha = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))[..., None]
        out[i, y0:y1, x0:x1] = np.rint(bg + (fg - bg) * alpha).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- dataset


def write_dataset(folder: str | Path, *, clips_per_combination: int = 1, count: int | None = None,
                  seed: int = 0, size: int | tuple[int, int] = 96, frames: int = 17, fps: int = 16,
                  languages: Sequence[str] = LANGUAGES) -> Path:
    """Write a training set to `folder` (new or empty): one mp4 per clip and a `metadata.csv`
    (`file_name,text`), the layout `wanx prepare` reads. Returns the csv's path.

    Clips cycle through `training_combinations()`: `clips_per_combination` of each, or `count`
    clips in all when given. Each clip has one caption, and the language rotates per combination
    and per clip (clip k of combination c is in `languages[(c + k) % len(languages)]`), so with
    one clip per combination half the combinations are English and half Chinese, and with two
    or more every combination is seen in every language, never as the same clip twice.
    Clip i's seed is derived from (`seed`, i): the same arguments write identical frames."""
    from wanx.video import Video

    folder = Path(folder)
    for lang in languages:
        if lang not in LANGUAGES:
            raise ValueError(f"unknown caption language {lang!r}; choose from {', '.join(LANGUAGES)}")
    if not languages:
        raise ValueError("give at least one caption language")
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder}: not empty; write the dataset to a new folder so no old clips mix in")
    combos = training_combinations()
    total = count if count is not None else clips_per_combination * len(combos)
    if total < 1:
        raise ValueError(f"nothing to write: {total} clips")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(total):
        c, k = i % len(combos), i // len(combos)
        attrs = combos[c]
        clip_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        name = f"{i:05d}_{attrs.color}_{attrs.shape}_{attrs.motion}_{attrs.background}.mp4"
        Video(render_clip(attrs, clip_seed, size, frames), fps=fps).save(folder / name)
        rows.append((name, caption(attrs, languages[(c + k) % len(languages)])))
    # The csv last: a folder interrupted mid-write has no metadata, so it is not read as complete.
    csv_path = folder / "metadata.csv"
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("file_name", "text"))
        writer.writerows(rows)
    return csv_path


# ----------------------------------------------------------------------------- detector


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [np.linalg.norm(rgb - np.asarray(palette[n], dtype=np.float64)) for n in names]
    return names[int(np.argmin(distances))]


def detect(frames: np.ndarray) -> dict:
    """Read a clip's attributes off its frames (uint8 `[F, H, W, 3]`):

        color       nearest of COLORS to the moving object's colour
        shape       circle/square/triangle from how much of its bounding box it fills
        motion      left/right/up/down: the main axis and sign of its centroid's travel
        background  nearest of BACKGROUNDS to the frames' median colour

    plus the measurements behind them (`fill_ratio`, `displacement` as (dy, dx) in pixels
    over the clip). An attribute that cannot be read (no object found, an object that does not
    move) is None, so a failed generation scores as a miss rather than raising."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got {frames.shape}")
    pixels = frames.astype(np.float32)
    # The object covers under a tenth of the frame, so the median pixel is background; every
    # other row and column of every other frame is plenty to find it.
    bg_rgb = np.median(pixels[::2, ::2, ::2].reshape(-1, 3), axis=0)
    result: dict = {"color": None, "shape": None, "motion": None,
                    "background": _nearest(bg_rgb, BACKGROUNDS), "fill_ratio": None, "displacement": None}
    diff = pixels - bg_rgb
    distance = np.sqrt(np.einsum("fhwc,fhwc->fhw", diff, diff))
    far = distance.max()
    if far < 40:  # nothing stands out from the background
        return result
    # The object's colour from its core only: edges are blends with the background, and
    # H.264's half-resolution chroma smears them further.
    core = distance > 0.7 * np.percentile(distance[distance > 20], 90)
    fg_rgb = np.median(pixels[core], axis=0)
    result["color"] = _nearest(fg_rgb, COLORS)
    # Coverage along the background-to-object line; > 0.5 is the shape at its true size,
    # whatever the antialiasing or blur did to its rim.
    axis = fg_rgb - bg_rgb
    coverage = (diff @ axis) / (axis @ axis)
    mask = coverage > 0.5

    centroids, fills = [], []
    for i, m in enumerate(mask):
        ys, xs = np.nonzero(m)
        if len(ys) < 4:
            continue
        w = np.clip(coverage[i][ys, xs], 0, 1)
        centroids.append((i, np.average(ys, weights=w), np.average(xs, weights=w)))
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(len(ys) / box)
    if not fills:
        return result
    fill = float(np.median(fills))
    result["fill_ratio"] = fill
    # Ideal ratios are 1/2, pi/4 and 1; pixel rounding and H.264 move them a little. Measured
    # on 342 decoded 96x96 clips: triangle 0.50-0.63, circle 0.75-0.84, square 0.93-1.00, so
    # every one right (and every one of 600 rendered clips); a blurry generated clip may not be.
    result["shape"] = "triangle" if fill < 0.68 else "circle" if fill < 0.88 else "square"
    if len(centroids) >= 2:
        t, cy, cx = (np.asarray(v, dtype=np.float64) for v in zip(*centroids))
        # Least-squares slope times the clip's length: robust to one frame's jitter.
        dy = float(np.polyfit(t, cy, 1)[0] * (len(frames) - 1))
        dx = float(np.polyfit(t, cx, 1)[0] * (len(frames) - 1))
        result["displacement"] = (dy, dx)
        if max(abs(dy), abs(dx)) >= 2.0:  # under two pixels over the clip is standing still
            if abs(dx) >= abs(dy):
                result["motion"] = "right" if dx > 0 else "left"
            else:
                result["motion"] = "down" if dy > 0 else "up"
    return result


def score(frames: np.ndarray, text: str) -> dict[str, bool]:
    """Per attribute, whether the video shows what the caption says: {"color": True, ...}."""
    wanted = parse_caption(text)
    found = detect(frames)
    return {name: found[name] == getattr(wanted, name) for name in ATTRIBUTES}


def accuracy(clips: Iterable[tuple[np.ndarray, str]]) -> dict[str, float]:
    """The share of (frames, caption) pairs each attribute matches in, "agrees" (the colour and
    the motion both match: the demo model's acceptance figure) and "all" (every attribute)."""
    hits = {name: 0 for name in (*ATTRIBUTES, "agrees", "all")}
    n = 0
    for frames, text in clips:
        s = score(frames, text)
        for name in ATTRIBUTES:
            hits[name] += s[name]
        hits["agrees"] += s["color"] and s["motion"]
        hits["all"] += all(s.values())
        n += 1
    return {name: h / max(n, 1) for name, h in hits.items()}

