"""Video-to-video (a T2V model): the input video, VAE-encoded and noised to the sigma where
the run begins; only the last `strength` share of the steps runs (diffusers' definition)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from ...configs import frames_at_most
from ...sampling import noise_to
from .base import Conditioning, Run, read_input, size_for_image, video_frames


class VideoToVideo(Conditioning):
    task = "v2v"

    @classmethod
    def read(cls, plan, given, *, area, frames_given, shift_given, name) -> None:
        from ..plan import RequestError

        if not 0 < plan.strength <= 1:
            raise RequestError("strength", f"{name('strength')} must be in (0, 1], got {plan.strength}")
        fps = plan.spec.fps
        frames = read_input("video", lambda video: video_frames(video, fps), given["video"])  # [3, F, H, W]
        count = frames.shape[1]
        longest = frames_at_most(count)
        if not frames_given:  # the folder's frame count (the demo model's 17) is the most, as the official 81
            plan.num_frames = min(plan.num_frames, longest)
        elif count < plan.num_frames:
            raise RequestError("num_frames", f"the input video has {count} frames at {fps} fps; {name('num_frames')} "
                                             f"is {plan.num_frames}: lower it to {longest} or give a longer video")
        plan.height, plan.width = size_for_image(frames[:, 0], area)
        frames = frames[:, :plan.num_frames].transpose(0, 1)  # [F, 3, H, W]
        frames = F.interpolate(frames, size=(plan.height, plan.width), mode="bicubic", align_corners=False)
        plan.video = frames.clamp(-1, 1).transpose(0, 1)

    def schedule(self, sigmas: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        return strength_schedule(sigmas, timesteps, self.plan.strength)

    def start(self, run: Run, noise: Tensor, sigmas: Tensor) -> Tensor:
        plan = self.plan
        with run.stage("video encoding", "vae"):
            encoded = run.pipe.vae.encode(plan.video[None].to(run.device))
        run.say(f"video-to-video: strength {plan.strength:g} runs the last {len(sigmas) - 1} of {plan.steps} "
                f"steps, from the input noised to sigma {float(sigmas[0]):.2f}")
        return noise_to(encoded, noise, float(sigmas[0]))

    def metadata(self) -> dict:
        return {"strength": self.plan.strength}


def strength_schedule(sigmas: Tensor, timesteps: Tensor, strength: float) -> tuple[Tensor, Tensor]:
    """Video-to-video: the last int(steps x strength) steps of the schedule (at least one), as
    diffusers' WanVideoToVideoPipeline.get_timesteps; the input is noised to the first sigma
    kept. Wan's shifted schedules spend most steps at high noise, so that sigma is high: with
    shift 5 and 50 steps, strength 0.3 starts at sigma 0.68, 0.6 at 0.88, 0.8 at 0.95."""
    steps = len(timesteps)
    run = max(1, min(steps, math.floor(steps * strength + 1e-9)))  # 50 x 0.58 is 28.999...: 29 steps, not 28
    return sigmas[steps - run:], timesteps[steps - run:]
