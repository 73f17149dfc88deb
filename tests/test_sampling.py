"""Sampling loops against diffusers' schedulers configured with the official sigma grids."""

import numpy as np
import pytest
import torch

from tests.oracles import tiny_dit
from wanx.sampling import SAMPLERS, flow_schedule, guided, schedule, unipc_schedule


def test_official_unipc_timesteps():
    _, t50 = unipc_schedule(50, 5.0)
    assert t50[:5].tolist() == [999, 995, 991, 987, 982] and t50[-4:].tolist() == [302, 241, 172, 92]
    sigmas, t40 = unipc_schedule(40, 3.0)
    assert t40[:3].tolist() == [999, 991, 982] and t40[-2:].tolist() == [136, 71]
    assert sigmas[-1] == 0 and len(sigmas) == 41
    sigmas, t = flow_schedule(50, 5.0)
    assert t[0] == 1000 and sigmas[0] == 1.0  # DPM++ starts at sigma 1


@pytest.fixture(scope="module")
def setup():
    model = tiny_dit()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 2, 4, 6, generator=gen)
    cond, uncond = torch.randn(1, 5, 32, generator=gen), torch.randn(1, 5, 32, generator=gen)

    def fn(x, t, ctx):
        with torch.no_grad():
            return model(x, torch.as_tensor(t).reshape(1).float(), ctx)

    return fn, noise, cond, uncond


def diffusers_loop(scheduler, fn, x, cond, uncond, guidance):
    for t in scheduler.timesteps:
        c, u = fn(x, t, cond), fn(x, t, uncond)
        x = scheduler.step(u + guidance * (c - u), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("steps", [8, 50])  # diffusers changes its low-order rules at 15 steps
@pytest.mark.parametrize("sampler", ["unipc", "dpm++", "euler"])
def test_loops_match_diffusers(setup, sampler, steps):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    fn, noise, cond, uncond = setup
    shift, guidance = 5.0, 5.0
    sigmas, timesteps = schedule(sampler, steps, shift)
    ours = SAMPLERS[sampler](guided(lambda x, t: fn(x, t, cond), lambda x, t: fn(x, t, uncond), guidance),
                             noise.clone(), sigmas, timesteps)

    if sampler == "unipc":
        ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                      num_train_timesteps=1000, flow_shift=shift)
        ref.set_timesteps(sigmas=np.linspace(0.999, 0, steps + 1)[:-1].copy())  # diffusers shifts them
    elif sampler == "dpm++":
        ref = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                          algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
        ref.set_timesteps(steps)
        ref.sigmas, ref.timesteps = sigmas.clone(), timesteps.clone()  # the official grid, from sigma 1
    else:
        ref = FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(sigmas=np.linspace(1, 0, steps + 1)[:steps].copy())
    assert torch.allclose(ref.timesteps.float(), timesteps.float(), atol=1e-3)
    theirs = diffusers_loop(ref, fn, noise.clone(), cond, uncond, guidance)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_unknown_sampler_and_bad_steps():
    with pytest.raises(ValueError, match="unknown sampler"):
        schedule("ddim", 10, 5.0)
    with pytest.raises(ValueError, match="steps must be"):
        schedule("unipc", 0, 5.0)


@pytest.mark.parametrize("timesteps, shift", [([1000, 750, 500, 250], 5.0), ([999, 900, 620, 380, 120], 3.0)])
def test_lcm_matches_diffusers(setup, timesteps, shift):
    """Flow-matching LCM against diffusers' FlowMatchLCMScheduler on the same sigmas, each
    drawing its fresh noise from a generator seeded alike (so the same noise is injected)."""
    from diffusers import FlowMatchLCMScheduler

    fn, noise, cond, uncond = setup
    sigmas, ts = schedule("lcm", len(timesteps), shift, timesteps)
    ours = SAMPLERS["lcm"](lambda x, t: fn(x, t, cond), noise.clone(), sigmas, ts,
                           generator=torch.Generator().manual_seed(7))
    ref = FlowMatchLCMScheduler(shift=shift)
    ref.set_timesteps(sigmas=[t / 1000 for t in timesteps])  # diffusers shifts them
    assert torch.allclose(ref.sigmas, sigmas, atol=1e-6) and torch.allclose(ref.timesteps, ts, atol=1e-3)
    ref.sigmas, ref.timesteps = sigmas.clone(), ts.clone()  # bit for bit (diffusers shifts in float32)
    generator, x = torch.Generator().manual_seed(7), noise.clone()
    for t in ref.timesteps:
        x = ref.step(fn(x, t, cond), t, x, generator=generator, return_dict=False)[0]
    assert (ours - x).abs().max() <= 1e-5
    # the noise matters: another seed gives another result
    other = SAMPLERS["lcm"](lambda x, t: fn(x, t, cond), noise.clone(), sigmas, ts,
                            generator=torch.Generator().manual_seed(8))
    assert (other - ours).abs().max() > 1e-3


def test_explicit_timesteps_schedule():
    """sigma = t / 1000 shifted (lightx2v's denoising_step_list), final 0, the DiT fed sigma x 1000;
    1000,750,500,250 is the 4-step Euler/LCM grid."""
    sigmas, ts = schedule("unipc", 4, 5.0, [1000, 750, 500, 250])
    s = np.array([1000, 750, 500, 250]) / 1000
    expect = 5 * s / (1 + 4 * s)
    assert torch.allclose(sigmas, torch.tensor([*expect, 0.0], dtype=torch.float32))
    assert torch.allclose(ts, torch.tensor(expect * 1000, dtype=torch.float32)) and ts.dtype == torch.float32
    for sampler in ("euler", "lcm"):
        grid = schedule(sampler, 4, 5.0)
        assert torch.equal(grid[0], sigmas) and torch.equal(grid[1], ts)
    with pytest.raises(ValueError, match="must be the number of timesteps"):
        schedule("euler", 3, 5.0, [1000, 750, 500, 250])


@pytest.mark.parametrize("value, message", [
    ([], "is empty"), ([1000, 750, 750], "strictly decreasing"), ([250, 500], "strictly decreasing"),
    ([1001, 500], r"in \(0, 1000\]"), ([500, 0], r"in \(0, 1000\]"), (["a"], "numbers"), ([True], "numbers"),
    ("1000,750", "a list of numbers"), ([float("nan")], "numbers")])
def test_check_timesteps(value, message):
    from wanx.sampling import check_timesteps

    with pytest.raises(ValueError, match=message):
        check_timesteps(value)
    assert check_timesteps([1000, 750.5, 1]) == (1000.0, 750.5, 1.0)
    assert check_timesteps([np.int64(1000), np.float32(500)]) == check_timesteps(torch.tensor([1000, 500])) == (1000, 500)
