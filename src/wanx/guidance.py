"""Classifier-free guidance in one place: the formula, and the strategies that compute its two
branches (one batch of two, two passes, or the two halves of the ranks with CFG parallel).

A strategy is called once per step with `branch(x, t, context, names) -> velocity`, the
model function of one expert for a batch of branches (`names` tells a step cache which
branches the batch holds), and returns the guided velocity.

The variants (`CFG` with its schedule: `cfg_steps`, a scale per step; `CFGZeroStar`, `APG`,
`SLG`, `NAG`) take the step they are at too (`Step`: index, total, the expert's DiT) and
compute their two branches as the pipeline's choice above does (`bind`). SLG and NAG act
inside the DiT only through its seams (`WanDiT.block_wrappers`, `CrossAttention.attention_fn`)
for the span of one pass; the model's math is untouched. `wanx.request.guidance_from_options`
builds one from the request keys (`--cfg-steps`, `--cfg-zero-star`, `--apg`, `--slg-layers`, ...).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Branch = Callable[[Tensor, Tensor, Tensor, tuple[str, ...]], Tensor]


def cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: u + g * (c - u)."""
    return uncond + scale * (cond - uncond)


class Guidance:
    """cond and uncond as one batch of two (the default: one pass over the weights)."""

    name = "batched"

    def __call__(self, branch: Branch, x: Tensor, t: Tensor, context: Tensor, context_null: Tensor | None,
                 scale: float) -> Tensor:
        if context_null is None or scale == 1.0:
            return branch(x, t, context, ("cond",))
        return self.guided(branch, x, t, context, context_null, scale)

    def guided(self, branch: Branch, x: Tensor, t: Tensor, context: Tensor, context_null: Tensor, scale: float):
        return cfg(*self.pair(branch, x, t, context, context_null), scale)

    def pair(self, branch: Branch, x: Tensor, t: Tensor, context: Tensor, context_null: Tensor):
        """The cond and uncond predictions, computed the way this strategy computes them."""
        return branch(torch.cat([x, x]), t, torch.cat([context, context_null]), ("cond", "uncond")).chunk(2)


class TwoPass(Guidance):
    """cond and uncond one after the other: half the activations of a batch of two. The
    negative pass keeps the image conditioning, as the official code does."""

    name = "two-pass"

    def pair(self, branch, x, t, context, context_null):
        uncond = branch(x, t, context_null, ("uncond",))
        return branch(x, t, context, ("cond",)), uncond


class ParallelHalves(Guidance):
    """CFG parallel: this rank's half of the world computes one branch; each pair of ranks
    swaps its results (`distributed.cfg.CfgParallel`)."""

    name = "cfg-parallel"

    def __init__(self, pair):
        self.ranks = pair  # distributed.cfg.CfgParallel

    def pair(self, branch, x, t, context, context_null):
        mine = self.ranks.branch
        return self.ranks.combine(branch(x, t, context if mine == "cond" else context_null, (mine,)))


# --- guidance variants ----------------------------------------------------------------------
# Each is a strategy with a schedule (`cfg_steps`, a scale per step) and, where it has one, its
# own formula or its own pass. The pipeline binds it to the way its branches are computed (one
# batch of two, two passes, CFG parallel: `passes`), calls `start(steps)` once per request and
# passes each call the `Step` it is at.


@dataclass(frozen=True)
class Step:
    """Where the loop is: denoising step `index` (from 0) of `total`, run by expert `dit` (the
    seams a variant uses are that DiT's)."""

    index: int
    total: int
    dit: nn.Module | None = None


class CFG:
    """Classifier-free guidance with a schedule. cfg_steps: real CFG on the first N steps only,
    then one pass per step (the cond branch); scales: a guidance scale per step (overrides the
    request's). A step whose scale is 1 runs one DiT pass, never two."""

    name = "cfg"

    def __init__(self, *, cfg_steps: int | None = None, scales: Sequence[float] | None = None):
        self.cfg_steps = cfg_steps
        self.scales = None if scales is None else tuple(float(s) for s in scales)
        self.passes: Guidance = Guidance()

    def bind(self, passes: Guidance) -> "CFG":
        """A copy of this strategy computing its branches as `passes` does (the pipeline's choice)."""
        bound = copy.copy(self)
        bound.passes = passes
        return bound

    def start(self, steps: int) -> None:
        """A new request of `steps` steps: state from an earlier one (momentum) is dropped."""

    def scale_at(self, scale: float, step: Step) -> float:
        if self.scales is not None:
            scale = self.scales[min(step.index, len(self.scales) - 1)]
        if self.cfg_steps is not None and step.index >= self.cfg_steps:
            scale = 1.0
        return scale

    def __call__(self, branch: Branch, x: Tensor, t: Tensor, context: Tensor, context_null: Tensor | None,
                 scale: float, step: Step) -> Tensor:
        scale = self.scale_at(scale, step)
        if context_null is None or scale == 1.0:
            return self.single(branch, x, t, context, context_null, step)
        cond, uncond = self.pair(branch, x, t, context, context_null, step)
        return self.combine(cond, uncond, scale, step)

    def single(self, branch: Branch, x, t, context, context_null, step: Step) -> Tensor:
        return branch(x, t, context, ("cond",))

    def pair(self, branch: Branch, x, t, context, context_null, step: Step) -> tuple[Tensor, Tensor]:
        return self.passes.pair(branch, x, t, context, context_null)

    def combine(self, cond: Tensor, uncond: Tensor, scale: float, step: Step) -> Tensor:
        return cfg(cond, uncond, scale)


class CFGZeroStar(CFG):
    """CFG-Zero* (Fan et al. 2025, arXiv 2503.18886; diffusers `ClassifierFreeZeroStarGuidance`):
    the uncond prediction scaled by s* = <c, u> / ||u||^2 per sample, and a zero velocity on the
    first `zero_init_steps` steps (diffusers' default 1; no DiT pass runs there)."""

    name = "cfg-zero-star"

    def __init__(self, *, zero_init_steps: int = 1, **schedule):
        super().__init__(**schedule)
        self.zero_init_steps = zero_init_steps

    def __call__(self, branch, x, t, context, context_null, scale, step):
        if step.index < self.zero_init_steps:
            return torch.zeros_like(x, dtype=torch.float32)
        return super().__call__(branch, x, t, context, context_null, scale, step)

    def combine(self, cond, uncond, scale, step):
        c, u = cond.flatten(1).float(), uncond.flatten(1).float()
        s = ((c * u).sum(1) / ((u * u).sum(1) + 1e-8)).to(cond.dtype).view(-1, *(1,) * (cond.ndim - 1))
        return cfg(cond, uncond * s, scale)


class APG(CFG):
    """Adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416), with diffusers'
    `AdaptiveProjectedGuidance` parameters and defaults: the guidance difference c - u, summed
    with momentum (None: off), scaled down to norm_threshold (`adaptive_projected_guidance_rescale`,
    0: off), split along c into a parallel part (weighted eta) and an orthogonal part, norms
    over every dimension but the batch."""

    name = "apg"

    def __init__(self, *, eta: float = 1.0, norm_threshold: float = 15.0, momentum: float | None = None,
                 **schedule):
        super().__init__(**schedule)
        self.eta, self.norm_threshold, self.momentum = eta, norm_threshold, momentum
        self.average: Tensor | None = None  # the momentum's running sum, per request

    def start(self, steps):
        self.average = None

    def combine(self, cond, uncond, scale, step):
        diff = cond - uncond
        dims = list(range(1, diff.ndim))
        if self.momentum is not None:
            diff = diff if self.average is None else diff + self.momentum * self.average
            self.average = diff
        if self.norm_threshold > 0:
            diff = diff * torch.clamp(self.norm_threshold / diff.norm(p=2, dim=dims, keepdim=True), max=1.0)
        v0, v1 = diff.double(), F.normalize(cond.double(), dim=dims)
        parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
        update = (v0 - parallel).to(diff.dtype) + self.eta * parallel.to(diff.dtype)
        return uncond + scale * update


class SLG(CFG):
    """Skip-layer guidance as Wan's community runs it (WanVideoWrapper's WanVideoSLG, Wan2GP):
    on the steps from int(start * steps) to int(end * steps), the uncond pass skips DiT blocks
    `layers` (their input goes on unchanged). The skip goes through the DiT's block seam, for the
    uncond rows only; the step cache sees that branch as "uncond-skip" (its own residual)."""

    name = "slg"

    def __init__(self, layers: Sequence[int], *, start: float = 0.1, end: float = 0.9, **schedule):
        super().__init__(**schedule)
        self.layers = tuple(int(i) for i in layers)
        self.start_at, self.end_at = start, end

    def active(self, step: Step) -> bool:
        return int(self.start_at * step.total) <= step.index < int(self.end_at * step.total)

    def pair(self, branch, x, t, context, context_null, step):
        if not self.active(step):
            return super().pair(branch, x, t, context, context_null, step)
        skip = BlockSkip(step.dit, self.layers)

        def skipping(x, t, context, names):
            skip.rows = [i for i, name in enumerate(names) if name == "uncond"]
            return branch(x, t, context, tuple("uncond-skip" if name == "uncond" else name for name in names))

        with skip:
            return super().pair(skipping, x, t, context, context_null, step)


class BlockSkip:
    """A block wrapper (`WanDiT.block_wrappers`) that passes the residual stream through blocks
    `layers` unchanged for batch rows `rows`; the other rows run the block. It sits inside the
    streaming wrapper (the block's weights come and go as usual) and outside a compiled block."""

    def __init__(self, dit, layers: Sequence[int]):
        self.dit, self.rows = dit, []
        self.skipped = {id(dit.blocks[i]) for i in layers}

    def __enter__(self):
        wrappers = self.dit.block_wrappers
        from .speed.compile import CompiledBlocks

        last = len(wrappers) - (1 if wrappers and isinstance(wrappers[-1], CompiledBlocks) else 0)
        wrappers.insert(last, self)
        return self

    def __exit__(self, *exc):
        self.dit.block_wrappers[:] = [w for w in self.dit.block_wrappers if w is not self]

    def __call__(self, inner, block, x, *inputs):
        if id(block) not in self.skipped or not self.rows:
            return inner(block, x, *inputs)
        if len(self.rows) == x.shape[0]:
            return x
        out = inner(block, x, *inputs)
        out[self.rows] = x[self.rows]
        return out


class NAG(CFG):
    """Normalized attention guidance (Chen et al. 2025, arXiv 2505.21179): negative-prompt
    guidance for CFG-free (distilled) models, in every block's text cross-attention of the cond
    pass: with Z+ and Z- the attention outputs for the prompt and the negative prompt,
    Z~ = scale * Z+ - (scale - 1) * Z-, its L1 norm per token capped at tau times Z+'s, then
    alpha * Z~ + (1 - alpha) * Z+. Defaults tau 2.5, alpha 0.25 (the paper's Wan setting and
    WanVideoWrapper's WanVideoApplyNAG, whose scale default is 11). With guidance > 1 too, the
    uncond pass is plain and the cond pass guided (two passes)."""

    name = "nag"

    def __init__(self, scale: float, *, tau: float = 2.5, alpha: float = 0.25, **schedule):
        super().__init__(**schedule)
        self.scale, self.tau, self.alpha = scale, tau, alpha

    def single(self, branch, x, t, context, context_null, step):
        with NagAttention(step.dit, context_null, self):
            return branch(x, t, context, ("cond",))

    def pair(self, branch, x, t, context, context_null, step):
        uncond = branch(x, t, context_null, ("uncond",))
        return self.single(branch, x, t, context, context_null, step), uncond

    def transform(self, positive: Tensor, negative: Tensor) -> Tensor:
        """The NAG formula on attention outputs `[B, L, D]` (heads flattened)."""
        guided = positive * self.scale - negative * (self.scale - 1)
        norm_positive = positive.norm(p=1, dim=-1, keepdim=True)
        norm_guided = guided.norm(p=1, dim=-1, keepdim=True)
        ratio = torch.nan_to_num(norm_guided / norm_positive, nan=10.0)
        guided = torch.where(ratio > self.tau, guided / (norm_guided + 1e-7) * norm_positive * self.tau, guided)
        return guided * self.alpha + positive * (1 - self.alpha)


class NagAttention:
    """Sets every block's `CrossAttention.attention_fn` of `dit` (the cross-attention seam) to
    NAG's attention for the span of one pass: the negative prompt's context is embedded by the
    DiT's own text embedding once, and each block's own k/v projections read it."""

    def __init__(self, dit, context_null: Tensor, nag: NAG):
        self.dit, self.nag = dit, nag
        dtype = dit.text_embedding[0].weight.dtype
        padded = F.pad(context_null, (0, 0, 0, dit.config.text_len - context_null.shape[1]))
        self.negative = dit.text_embedding(padded.to(dtype))  # [1, text_len, D]

    def __enter__(self):
        for block in self.dit.blocks:
            block.cross_attn.attention_fn = functools.partial(self.attend, block.cross_attn)
        return self

    def __exit__(self, *exc):
        for block in self.dit.blocks:
            block.cross_attn.__dict__.pop("attention_fn", None)

    def attend(self, module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        from .attention import attention

        n = module.num_heads
        negative = self.negative.expand(q.shape[0], *self.negative.shape[1:])
        v_neg = module.v(negative).unflatten(-1, (n, -1))
        k_neg = module.norm_k(module.k(negative)).unflatten(-1, (n, -1)).to(v_neg.dtype)
        positive = attention(q, k, v)
        out = self.nag.transform(positive.flatten(2).float(), attention(q, k_neg, v_neg).flatten(2).float())
        return out.to(positive.dtype).unflatten(-1, positive.shape[-2:])


def describe(strategy: CFG) -> dict:
    """A strategy's settings, for a video's metadata."""
    settings = {k: v for k, v in vars(strategy).items() if k not in ("passes", "average") and v is not None}
    return {"name": strategy.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}
