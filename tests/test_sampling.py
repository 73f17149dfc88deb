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
