"""Flow-matching samplers and the official Wan2.1 schedules.

Convention (linear noise path): x_t = (1 - sigma) * x0 + sigma * noise, and the model
predicts the velocity v = noise - x0, so x0 = x_t - sigma * v.

Every sampler has one call shape:

    sample(model_fn, x, sigmas, timesteps, callback=None, generator=None) -> x0

`model_fn(x, t)` returns v for latents x at model timestep t (0..1000 scale); `sigmas` has
len(timesteps) + 1 entries, the last one 0. `generator` is the source of the fresh noise a
stochastic sampler (LCM) draws: the pipeline passes the one its initial noise came from, so a
seed fixes the whole run; the deterministic samplers take it and draw nothing. Schedules are
separate functions; guidance wraps `model_fn` (`guided`), so every sampler gets it.
"""

from __future__ import annotations

import numbers
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .guidance import cfg

ModelFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, int, Tensor], None]  # (step, total, x)

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The Wan/SD3 time shift: s * sigma / (1 + (s - 1) * sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def unipc_schedule(steps: int, shift: float) -> tuple[Tensor, Tensor]:
    """Official UniPC grid: linspace(0.999, 0) shifted, int64-truncated timesteps, final sigma 0.

    50 steps at shift 5 gives timesteps 999, 995, 991, ..., 241, 172, 92."""
    sigmas = shift_sigmas(np.linspace(1 - 1 / NUM_TRAIN_TIMESTEPS, 0, steps + 1)[:-1], shift)
    timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    return torch.from_numpy(np.append(sigmas, 0.0)).to(torch.float32), timesteps


def flow_schedule(steps: int, shift: float, *, integer_timesteps: bool = True) -> tuple[Tensor, Tensor]:
    """Official DPM++ grid: linspace(1, 0) shifted, starting at sigma 1 (t = 1000), final sigma 0.
    Euler uses the same grid with float timesteps."""
    sigmas = shift_sigmas(np.linspace(1, 0, steps + 1)[:steps], shift)
    timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS)
    timesteps = timesteps.to(torch.int64) if integer_timesteps else timesteps.to(torch.float32)
    return torch.from_numpy(np.append(sigmas, 0.0)).to(torch.float32), timesteps


def guided(cond_fn: ModelFn, uncond_fn: ModelFn | None, guidance: float) -> ModelFn:
    """Classifier-free guidance, u + g * (c - u), from two model functions."""
    if uncond_fn is None or guidance == 1.0:
        return cond_fn

    def fn(x: Tensor, t: Tensor) -> Tensor:
        uncond = uncond_fn(x, t)
        return cfg(cond_fn(x, t), uncond, guidance)

    return fn


def _lambda(sigma: Tensor) -> Tensor:
    """log-SNR of the flow path: log(alpha) - log(sigma), alpha = 1 - sigma (+-inf at the ends)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def sample_euler(model_fn: ModelFn, x: Tensor, sigmas: Tensor, timesteps: Tensor, callback: Callback | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Flow-matching Euler: x += (sigma_next - sigma) * v."""
    for i, t in enumerate(timesteps):
        v = model_fn(x, t)
        x = x + (sigmas[i + 1] - sigmas[i]).to(x.dtype) * v.to(x.dtype)
        if callback:
            callback(i, len(timesteps), x)
    return x


def sample_lcm(model_fn: ModelFn, x: Tensor, sigmas: Tensor, timesteps: Tensor, callback: Callback | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """Flow-matching LCM (diffusers' FlowMatchLCMScheduler): predict x0 = x - sigma * v, then
    noise it afresh to the next sigma, (1 - sigma_next) * x0 + sigma_next * noise; the last step
    (sigma 0) returns x0. This is the update of the step-distilled Wan2.1 releases (lightx2v's
    WanStepDistillScheduler) and, in flow terms, of rCM's consistency sampler. The noise is
    float32 standard normal from `generator` (torch's global one when None)."""
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        v = model_fn(x, t)
        x0 = x.float() - sigmas[i].float() * v.float()
        if i < n - 1 and float(sigmas[i + 1]) > 0:  # no draw for a step that ends at sigma 0
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
            x0 = noise_to(x0, noise, sigmas[i + 1].float())
        x = x0.to(x.dtype)
        if callback:
            callback(i, n, x)
    return x


def sample_dpmpp_2m(model_fn: ModelFn, x: Tensor, sigmas: Tensor, timesteps: Tensor,
                    callback: Callback | None = None, generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver++(2M), midpoint form (Lu et al. 2022), data prediction; first order on the
    first step and on the last one (final sigma 0), as the official flow DPM++ solver."""
    sig = sigmas.double()
    previous = None  # x0 prediction of the previous step
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        v = model_fn(x, t)
        x0 = x - sigmas[i].to(x.dtype) * v.to(x.dtype)
        s, s_next = sig[i], sig[i + 1]
        h = _lambda(s_next) - _lambda(s)
        alpha_next = 1 - s_next
        coef_x, coef_d = float(s_next / s), float(alpha_next * torch.expm1(-h))
        if previous is None or i == n - 1:
            x = coef_x * x - coef_d * x0
        else:
            r = float((_lambda(s) - _lambda(sig[i - 1])) / h)
            d1 = (x0 - previous) / r
            x = coef_x * x - coef_d * x0 - 0.5 * coef_d * d1
        previous = x0
        if callback:
            callback(i, n, x)
    return x


def sample_unipc(model_fn: ModelFn, x: Tensor, sigmas: Tensor, timesteps: Tensor, callback: Callback | None = None,
                 generator: torch.Generator | None = None, order: int = 2) -> Tensor:
    """UniPC multistep, B(h) = expm1(h) ('bh2'), data prediction (Zhao et al. 2023): a UniC
    corrector with each new model output, then a UniP predictor; order `order` (2 in the
    official code), lowered on the first steps and the final ones."""
    sig = sigmas.double()
    lam = _lambda(sig)
    n = len(timesteps)
    history: list[Tensor] = []  # x0 predictions, newest last
    last_x = None
    last_order = 1
    for i, t in enumerate(timesteps):
        v = model_fn(x, t)
        x0 = x - sigmas[i].to(x.dtype) * v.to(x.dtype)
        if last_x is not None:  # correct x with the model output it just produced
            x = _unipc_update(last_x, history, x0, lam, sig, i - 1, last_order)
        history = (history + [x0])[-order:]
        step_order = min(order, n - i, len(history))
        last_x, last_order = x, step_order
        x = _unipc_update(x, history, None, lam, sig, i, step_order)
        if callback:
            callback(i, n, x)
    return x


def _unipc_update(x: Tensor, history: list[Tensor], x0_new: Tensor | None, lam: Tensor, sig: Tensor, i: int,
                  order: int) -> Tensor:
    """From sigma_i to sigma_{i+1}. Predictor (x0_new None): history ends with x0 at sigma_i.
    Corrector: x0_new is the prediction at sigma_{i+1} and history ends with x0 at sigma_i."""
    m0 = history[-1]
    h = lam[i + 1] - lam[i]
    hh = -h  # data prediction
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)  # bh2

    rks, d1s = [], []
    for k in range(1, order):
        rk = (lam[i - k] - lam[i]) / h
        rks.append(rk)
        d1s.append((history[-(k + 1)] - m0) / float(rk))
    rks.append(torch.ones((), dtype=torch.float64))
    rks_t = torch.stack(rks)

    rows, b = [], []
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    for k in range(1, order + 1):
        rows.append(rks_t ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b_t = torch.stack(rows), torch.stack(b)

    sigma_next, alpha_next = sig[i + 1], 1 - sig[i + 1]
    base = float(sigma_next / sig[i]) * x - float(alpha_next * h_phi_1) * m0
    if x0_new is None:  # predictor
        if not d1s:
            return base
        rhos = torch.tensor([0.5], dtype=torch.float64) if order == 2 else torch.linalg.solve(R[:-1, :-1], b_t[:-1])
        residual = sum(float(r) * d for r, d in zip(rhos, d1s))
        return base - float(alpha_next * b_h) * residual
    rhos = torch.tensor([0.5], dtype=torch.float64) if order == 1 else torch.linalg.solve(R, b_t)
    residual = sum(float(r) * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0
    return base - float(alpha_next * b_h) * (residual + float(rhos[-1]) * (x0_new - m0))


SAMPLERS = {"unipc": sample_unipc, "dpm++": sample_dpmpp_2m, "euler": sample_euler, "lcm": sample_lcm}


def schedule(sampler: str, steps: int, shift: float, timesteps=None) -> tuple[Tensor, Tensor]:
    """The official grid for a sampler: UniPC from sigma 0.999, DPM++, Euler and LCM from 1
    (LCM at 4 steps is lightx2v's [1000, 750, 500, 250]). timesteps: an explicit denoising step
    list instead (`explicit_schedule`), for any sampler; then steps must be its length."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if timesteps is not None:
        if len(timesteps) != steps:
            raise ValueError(f"steps ({steps}) must be the number of timesteps ({len(timesteps)})")
        return explicit_schedule(timesteps, shift)
    if sampler == "unipc":
        return unipc_schedule(steps, shift)
    return flow_schedule(steps, shift, integer_timesteps=sampler == "dpm++")


def explicit_schedule(timesteps, shift: float) -> tuple[Tensor, Tensor]:
    """A given denoising step list on the 0..1000 scale, as the step-distilled releases read
    their `denoising_step_list` (lightx2v's WanStepDistillScheduler): sigma = t / 1000, shifted,
    final sigma 0; the DiT gets the shifted sigma x 1000, a float. [1000, 750, 500, 250] at
    shift 5 runs sigmas 1, 0.9375, 0.8333, 0.625."""
    sigmas = shift_sigmas(np.asarray(timesteps, dtype=np.float64) / NUM_TRAIN_TIMESTEPS, shift)
    return (torch.from_numpy(np.append(sigmas, 0.0)).to(torch.float32),
            torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS).to(torch.float32))


def check_timesteps(value) -> tuple[float, ...]:
    """An explicit step list, checked: numbers in (0, 1000], strictly decreasing, at least one.
    ValueError says what is wrong (the caller names its argument)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"must be a list of numbers such as [1000, 750, 500, 250], got {value!r}")
    values = list(value.tolist() if hasattr(value, "tolist") else value)
    if not values:
        raise ValueError("is empty: give at least one timestep, such as [1000, 750, 500, 250]")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v):
            raise ValueError(f"must hold numbers such as 1000, 750, 500, 250; got {v!r}")
    bad = [v for v in values if not 0 < v <= NUM_TRAIN_TIMESTEPS]
    if bad:
        raise ValueError(f"values must be in (0, 1000] (the training timesteps before the shift), got {bad[0]:g}")
    for a, b in zip(values, values[1:]):
        if not b < a:
            raise ValueError(f"must be strictly decreasing (from high noise to low, e.g. 1000, 750, 500, 250); "
                             f"{b:g} follows {a:g}")
    return tuple(float(v) for v in values)


def noise_to(x0: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """A point on the flow path: (1 - sigma) * x0 + sigma * noise."""
    return (1 - sigma) * x0 + sigma * noise


