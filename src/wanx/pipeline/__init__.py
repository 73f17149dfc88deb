"""The pipeline package: `WanPipeline` (pipeline.py), request planning from the task table
(plan.py), one conditioning per task (conditioning/), and Wan2.2's two experts as one model
function (experts.py), context windows over long videos (windows.py)."""

from .conditioning.i2v import image_conditioning
from .conditioning.ti2v import best_output_size, first_frame_timesteps, resize_and_crop
from .conditioning.v2v import strength_schedule
from .experts import Experts, high_noise_steps
from .pipeline import WanPipeline, check_vae
from .plan import GUIDANCE_RANGE, MAX_SEED, ModelFacts, Plan, RequestError, make_plan, plan_request
from .windows import ContextWindows, Windows

__all__ = ["ContextWindows", "Experts", "GUIDANCE_RANGE", "MAX_SEED", "ModelFacts", "Plan", "RequestError", "WanPipeline",
           "best_output_size", "check_vae", "first_frame_timesteps", "high_noise_steps", "image_conditioning",
           "make_plan", "plan_request", "resize_and_crop", "strength_schedule", "Windows"]
