"""WanPipeline: one sampling loop for every task. A request is planned from the task table
(`plan.py`, `wanx.tasks`), the text encoded, the task's conditioning prepared
(`conditioning/`), the loop run over the model's expert(s) (`experts.py`) with guidance
(`wanx.guidance`), and the latents decoded. Nothing here branches on the task: what a task
adds lives in its conditioning file and its row of the table.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..guidance import CFG, Guidance, ParallelHalves, Step, TwoPass, describe
from ..lora import LoraReport, apply_to_experts, loaded_loras, lora_steps, remove_lora, set_lora_strength
from ..memory.estimate import available_memory, check_fits, decode_tiles, estimate, weight_bytes
from ..memory.placement import Placement, auto_budget, load_devices, resolve_offload
from ..models.transformer import input_dtype
from ..runtime import Applied, Runtime
from ..runtime import apply as runtime_apply
from ..sampling import SAMPLERS, schedule
from ..tasks import default_task
from ..video import SavedVideo, Video, VideoWriter, to_pixels
from .conditioning import Conditioning, Run, conditioning_for
from .experts import Experts
from .plan import Plan, plan_request
from .windows import ContextWindows, match_colors


class WanPipeline:
    """`WanPipeline(dit=..., vae=..., text_encoder=..., image_encoder=...)`, or `from_pretrained`.
    Wan2.2 A14B: `dit` is the high-noise expert and `dit_low` the low-noise one."""

    def __init__(self, dit, vae, text_encoder=None, image_encoder=None, *, dit_low=None, name: str = "custom",
                 runtime: Runtime | None = None, placement: Placement | None = None, applied: Applied | None = None,
                 audio_encoder=None):
        self.dit, self.vae, self.text_encoder, self.image_encoder = dit, vae, text_encoder, image_encoder
        # Wan2.2 S2V's wav2vec2: a `wanx.audio.AudioEncoder`, or its folder, loaded at first use
        self._audio_encoder = audio_encoder
        self.dit_low = dit_low
        if dit_low is not None and dit_low.config != dit.config:
            raise ValueError("the two experts must be alike in architecture (Wan2.2 A14B's are)")
        check_vae(dit.config, vae.config)
        self.defaults: dict = {}  # the model folder's generation settings (wanx-defaults.json)
        self.name = name
        self.runtime = runtime
        # what runtime.apply did (placement, LoRAs, parallel plan, step cache, compiled blocks);
        # a pipeline built by hand has its networks where they are
        self.applied = applied or Applied(runtime, placement or Placement("none", self.device, {}))
        self.batch_cfg = True  # cond and uncond as one batch of 2; False: two passes (less memory)
        self.last_timings: dict = {}  # seconds of the first and later denoising steps of the last call
        self.last_experts: dict = {}  # two experts: the last call's boundary and steps on each
        self.last_partial: Path | None = None  # output_path: the .partial file a stopped call kept

    @property
    def audio_encoder(self):
        """S2V's wav2vec2 (`wanx.audio.AudioEncoder`), read from its folder when a request first
        needs it: float32 on the CPU, where the official `AudioEncoder` runs (once a request, on
        the audio alone), so it holds no device memory beside the DiT."""
        if isinstance(self._audio_encoder, (str, Path)):
            from ..audio import load_audio_encoder

            self._audio_encoder = load_audio_encoder(self._audio_encoder, device="cpu")
        return self._audio_encoder

    @audio_encoder.setter
    def audio_encoder(self, encoder) -> None:
        self._audio_encoder = encoder

    @property
    def placement(self) -> Placement:
        return self.applied.placement

    @property
    def parallel(self):
        """distributed.ParallelPlan when several ranks share the work."""
        return self.applied.parallel

    @parallel.setter
    def parallel(self, plan) -> None:  # distributed.parallelize on a built pipeline
        self.applied.parallel = plan

    @property
    def compiled(self):
        """speed.compile.CompiledBlocks of the (high-noise) DiT when its block is compiled."""
        return self.applied.compiled[0] if self.applied.compiled else None

    @property
    def device(self) -> torch.device:
        return self.runtime.device if self.runtime else next(self.dit.parameters()).device

    @property
    def model_type(self) -> str:
        return self.dit.config.model_type

    @property
    def experts(self) -> dict:
        """The DiTs by placement name: {"dit": ...}, plus "dit_low" for Wan2.2 A14B."""
        return {"dit": self.dit, **({"dit_low": self.dit_low} if self.dit_low is not None else {})}

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, vae_dtype: torch.dtype | str = torch.float32,
                        offload: str = "auto", vram_budget: int | float | str | None = None,
                        num_persistent_param_in_dit: int | None = None, quantize: str | None = None,
                        t5_device: str | torch.device | None = None, cache: str | None = None,
                        cache_threshold: float | None = None, cache_calibration: str | None = None,
                        compile: bool = False, attention: str = "auto", source: str = "huggingface",
                        progress: bool = False) -> "WanPipeline":
        """An official or diffusers-layout model folder (Wan2.2 A14B: both experts), a DiT file
        whose folder holds the other components, a tiny model name, or a model id
        (`Wan-AI/Wan2.1-T2V-1.3B`, `Wan-AI/Wan2.2-T2V-A14B`, downloaded into the standard cache).

        device: default CUDA when present, else CPU. dtype: of the DiT and encoders, default
        bf16 on a GPU and fp32 on a CPU (the same rule as `wanx generate --dtype auto`).
        offload: "auto" (default: everything resident when it fits, else DiT blocks streamed),
        "none", "model" (each network on the device only for its phase) or "blocks".
        vram_budget: DiT bytes kept resident with offload="blocks" ("6GB", 6e9, 0, "auto");
        num_persistent_param_in_dit: the same in parameters. quantize: "fp8", "fp8_fast" or "int8".
        t5_device: "cpu" runs umT5 on the CPU (the official --t5_cpu).
        cache: "teacache" or "magcache" step caching (cache_threshold None: the published
        setting for the model; cache_calibration: a `wanx calibrate-cache` file). compile: the
        DiT block compiled once with torch.compile. attention: "auto", "sdpa", "flash2",
        "flash3" or "sage". See `wanx.runtime.Runtime`."""
        from ..hub import find_model

        # Every choice is checked before any download or weight read.
        runtime = Runtime.create(device, dtype, vae_dtype, offload=offload, vram_budget=vram_budget,
                                 num_persistent_param_in_dit=num_persistent_param_in_dit, quantize=quantize,
                                 t5_device=t5_device, cache=cache, cache_threshold=cache_threshold,
                                 cache_calibration=cache_calibration, compile=compile, attention=attention)
        files = find_model(path_or_id, source=source)
        pipe = cls.from_files(files, runtime=runtime, progress=progress)
        pipe.name = str(path_or_id)
        return pipe

    @classmethod
    def from_files(cls, files, *, runtime: Runtime | None = None, progress: bool = False, host_load: bool = False,
                   loras: Sequence = (), parallel: Mapping | None = None) -> "WanPipeline":
        """Load the components `wanx.hub.find_components` found and transform them as `runtime`
        says (`wanx.runtime.apply`, in its one order). host_load: the DiT and umT5 stay
        (memory-mapped) in host memory, for a transform that places them itself (FSDP moves only
        each rank's shard to its GPU). loras: (LoRA file or path, strength, expert, name) each;
        parallel: `distributed.plan_parallel`'s keywords (sp, cfg_parallel, fsdp) on several ranks."""
        from ..loading import load_model
        from ..text import TextEncoder, Tokenizer

        runtime = runtime or Runtime.create()
        runtime.check(experts=2 if files.moe else 1)  # before any weight is read
        device, dtype = runtime.device, runtime.dtype
        check_vae(files.dit_config, files.infos["vae"].config, files.dit, files.vae)  # before any weight is read
        tokenizer = Tokenizer(files.tokenizer)
        weights = sum(weight_bytes(files.parameter_counts(), dtype, runtime.vae_dtype, fp8=bool(runtime.quantize),
                                   stored=files.stored_kinds()).values())
        usual = default_task(files.model_type, 2 if files.moe else 1)  # the model's usual request
        work = estimate(files.dit_config, usual.height, usual.width, usual.num_frames, dtype=dtype,
                        vae_dtype=runtime.vae_dtype).work
        offload = resolve_offload(runtime.offload, device, weights, work, available_memory(device))
        where = load_devices(offload, device, runtime.text_device)
        if host_load:
            where = {**where, "dit": torch.device("cpu"), "dit_low": torch.device("cpu"), "t5": torch.device("cpu")}
        networks = {"dit": load_model(files.dit, dtype=dtype, device=where["dit"], quantize=runtime.quantize,
                                      progress=progress), "dit_low": None, "clip": None}
        if files.dit_low is not None:  # fp32-stored experts are cast to dtype as they are read, like any DiT
            networks["dit_low"] = load_model(files.dit_low, dtype=dtype, device=where["dit_low"],
                                             quantize=runtime.quantize, progress=progress)
        networks["vae"] = load_model(files.vae, dtype=runtime.vae_dtype, device=where["vae"], progress=progress)
        networks["t5"] = load_model(files.text_encoder, dtype=dtype, device=where["t5"], progress=progress)
        if files.dit_config.has_image_input:
            networks["clip"] = load_model(files.image_encoder, dtype=dtype, device=where["clip"], progress=progress)
        budget = runtime.vram_budget
        if budget == "auto":
            budget = auto_budget(available_memory(device), work)
        applied = runtime_apply(runtime, networks, offload=offload, budget=budget, folder=files.folder, loras=loras,
                                parallel=parallel, say=lambda line: print(line, file=sys.stderr))
        pipe = cls(networks["dit"], networks["vae"], TextEncoder(networks["t5"], tokenizer, device=runtime.text_device),
                   networks["clip"], dit_low=networks["dit_low"], name=str(files.folder), runtime=runtime,
                   applied=applied, audio_encoder=files.audio_encoder)
        pipe.defaults = dict(files.defaults)
        return pipe

    # -------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        *,
        image=None,
        last_image=None,
        video=None,
        mask=None,
        reference_images=None,
        conditioning_scale: float | Sequence[float] | None = None,
        control_video=None,
        outpaint=None,
        animate_inputs=None,
        pose_video=None,
        face_video=None,
        background_video=None,
        mask_video=None,
        replace: bool | None = None,
        refert_num: int | None = None,
        audio=None,
        num_clips: int | None = None,
        start_from_ref: bool | None = None,
        strength: float = 0.8,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | Sequence[float] | None = None,
        guidance_scale_low: float | None = None,
        boundary: float | None = None,
        shift: float | None = None,
        sampler: str | None = None,
        timesteps: Sequence[float] | None = None,
        seed: int | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        latents: Tensor | None = None,
        output_type: str = "video",
        progress: bool = True,
        callback: Callable[[int, int, Tensor], None] | None = None,
        decode_callback: Callable[[int, int], None] | None = None,
        steps: int | None = None,
        guidance: float | CFG | None = None,
        context_windows: ContextWindows | None = None,
        extend=None,
        extend_frames: int | None = None,
        output_path: str | Path | None = None,
        quality: int = 18,
    ) -> Video | SavedVideo | Tensor:
        """Generate one video. The task follows from the model and the inputs; every unset
        option takes the model folder's own setting (`wanx-defaults.json`), else the official
        default of the task (its row of `wanx.tasks.TASKS`). Inputs are checked before any work.

        Args:
            prompt, negative_prompt: what the video shows and what to avoid (default the
                task's official negative prompt; unused when guidance_scale is 1). With context
                windows, prompt may be a list: prompts over time, each window reading the one
                for the stretch of the video its middle falls in.
            image, last_image: first and last frame (I2V, FLF2V; TI2V-5B: image makes it
                image-to-video): a path, PIL image, uint8 `[H, W, 3]` or `[3, H, W]` in [-1, 1].
                The output keeps the image's aspect ratio within height x width.
            video: video-to-video input (T2V models): a path, `Video`, uint8 `[F, H, W, 3]` or
                `[3, F, H, W]` in [-1, 1]. strength, in (0, 1]: the share of the steps run, the
                last ones, from the input noised to where they begin (`strength_schedule`).
                VACE models: the control video (pose/depth/edges, or a video to inpaint),
                diffusers' `video`; control_video is its alias. mask: a video or one image,
                white = generate (needs video). reference_images: one or a list (official
                placement: latent frames in front, removed from the output). conditioning_scale:
                the hints' scale (one, or one per VACE layer). outpaint: (left, right, top,
                bottom), pixels or fractions below 1, of video or image; image/last_image: the
                official first/last-frame tasks.
            animate_inputs: Wan2.2 Animate models: the folder the official preprocessing writes
                (src_pose.mp4, src_face.mp4, src_ref.png; src_bg.mp4 and src_mask.mp4 for
                replacement), or its files one by one: pose_video, face_video, image (the
                reference), background_video and mask_video (`wanx.pipeline.conditioning.animate`).
                replace: the character replaces the person in the background video (default:
                when background_video and mask_video are given). refert_num: 1 or 5 frames each
                clip carries from the last (default 1). The output takes the pose video's size
                and length; num_frames is a clip's (77).
            audio: Wan2.2 S2V models: the speech or song the reference `image` follows (a file
                any format PyAV decodes, or (samples, rate)); the video is made clip after clip
                of num_frames (80, a multiple of 4) over the audio's length, or num_clips at
                most; pose_video: a pose video driving the body (optional); start_from_ref: the
                reference image is the first frame. The output mp4 carries the audio
                (`wanx.pipeline.conditioning.s2v`).
            height, width: pixels, multiples of the task's size multiple (16; TI2V-5B 32).
            num_frames: 4k+1. Video-to-video: default the input's count, rounded down to 4k+1.
            num_inference_steps (alias steps), shift, sampler ("unipc", "dpm++", "euler", "lcm").
            timesteps: the denoising step list itself, 0..1000 before the shift, e.g. [1000,
                750, 500, 250] (lightx2v's 4-step releases); it sets the step count.
            guidance_scale: in [1, 30], 1 turns guidance off; a list: one per step. Wan2.2
                A14B: the high-noise expert's (the low one's too unless guidance_scale_low).
            guidance: guidance_scale's alias, or a strategy of `wanx.guidance` (CFG(cfg_steps=2),
                CFGZeroStar, APG, SLG, NAG), its scale from guidance_scale.
            boundary: Wan2.2 A14B: steps with t >= 1000 x boundary run the high-noise expert.
            context_windows: `ContextWindows(frames=81, overlap=16, schedule, blend)`: the DiT
                denoises a longer video in overlapping windows of `frames`, blended
                (`wanx.pipeline.windows`); one window over the whole video is the plain run.
            seed: in [0, 2**64), the official code's noise; default random, kept in the metadata.
            prompt_embeds, negative_prompt_embeds: umT5 embeddings `[1, L, 4096]` instead of text.
            latents: initial noise `[1, C, F', H/s, W/s]` instead of the seed's (VACE: F' counts one
                latent frame in front per reference image).
            output_type: "video" (uint8 frames) or "latents" (denoised, not decoded).
            progress: progress bars and stage timings on stderr.
            callback: `callback(step, total, latents)` after each step (step from 1); an
                exception it raises stops the call, nothing written (a server cancels this way).
            decode_callback: `decode_callback(done, total)` after each decoded VAE chunk.
            extend: a video file, or a `Video` this pipeline returned (its `.latents` are used),
                to continue (`wanx.pipeline.extend`): the output is that video
                followed by the new frames, at its size and frame rate; num_frames then counts
                the new frames (a multiple of 4). Its last frames are known latents at the
                start, from the side file wanx writes next to its mp4s when there is one.
            extend_frames: the overlap in video frames, 4k+1 (default 9: 3 latent frames).
            output_path: write the video there (.mp4, .gif, or a new folder for PNG frames)
                chunk by chunk as it is decoded, never holding all its frames (memory flat in
                length); quality: the mp4's H.264 CRF. Stopped part-way (an exception, Ctrl-C),
                the frames written so far stay as `<stem>.partial<suffix>` (`last_partial`).

        Returns:
            A `Video` (`.save(path)`, `.frames` uint8 `[F, H, W, 3]`), with output_path a
            `SavedVideo` (`.path`, `len()`, `.size`; frames in the file), or a latent tensor;
            a video's `.latents` are the denoised latents `[C, F', H', W']` on the CPU.
        """
        strategy = None
        if guidance is not None and not isinstance(guidance, (int, float, list, tuple)):  # a strategy object
            strategy, guidance = guidance, None
        plan = self.plan(prompt, negative_prompt, image=image, last_image=last_image, video=video, strength=strength,
                         height=height, width=width, num_frames=num_frames,
                         num_inference_steps=_alias("num_inference_steps", num_inference_steps, "steps", steps),
                         guidance_scale=_alias("guidance_scale", guidance_scale, "guidance", guidance),
                         guidance_scale_low=guidance_scale_low, boundary=boundary, shift=shift, sampler=sampler,
                         timesteps=timesteps, seed=seed, prompt_embeds=prompt_embeds,
                         negative_prompt_embeds=negative_prompt_embeds, latents=latents, output_type=output_type,
                         guidance=strategy, context_windows=context_windows, extend=extend,
                         extend_frames=extend_frames, mask=mask, reference_images=reference_images,
                         conditioning_scale=conditioning_scale, control_video=control_video, outpaint=outpaint,
                         animate_inputs=animate_inputs, pose_video=pose_video, face_video=face_video,
                         background_video=background_video, mask_video=mask_video, replace=replace,
                         refert_num=refert_num, audio=audio, num_clips=num_clips, start_from_ref=start_from_ref)
        if prompt is None and prompt_embeds is None:
            prompt = plan.prompt  # the task's official prompt (Animate's)
        self.last_partial = None
        if output_path is not None and output_type == "latents":
            raise ValueError("output_path writes decoded frames: it does not go with output_type='latents'")
        # the output's type is checked before any work; the file is made at the first frame
        # S2V's audio goes into an mp4 (PNG frames have no sound track)
        sound = plan.soundtrack if output_path is not None and Path(output_path).suffix.lower() == ".mp4" else None
        writer = None if output_path is None else VideoWriter(output_path, plan.fps, quality=quality, audio=sound)
        need, batched = self._fit(plan, stream=writer is not None)
        # per-step LoRA strengths for this step count (another count is refused here, before any work)
        lora_step = lora_steps(self.experts.values(), plan.steps)
        run = Run(self, progress)
        conditioning = conditioning_for(plan.spec, extend=plan.extend is not None)(plan)
        if conditioning.by_clips and output_type == "latents":
            raise ValueError(f"{plan.spec.short} makes its video clip after clip, each decoded for the next: "
                             "output_type='latents' is not available for it")
        with torch.no_grad():
            with run.stage("text encoding", "t5"):
                context, context_null = self._text(plan, prompt, prompt_embeds, negative_prompt_embeds)
            noise, generator = self._noise(plan, latents)
            if conditioning.by_clips:
                return self._clips(run, plan, conditioning, (context, context_null), noise, generator, batched,
                                   callback, lora_step, writer, lambda: self._metadata(plan, conditioning, prompt))
            inputs = conditioning.inputs(run)
            sigmas, timesteps = conditioning.schedule(*schedule(plan.sampler, plan.steps, plan.shift, plan.timesteps))
            x = conditioning.start(run, noise, sigmas)
            x = self._denoise(run, plan, conditioning, inputs, (context, context_null), x, sigmas, timesteps,
                              batched, callback, generator, lora_step)
            if plan.windows is not None and plan.windows.color_match:
                x = match_colors(x, plan.windows.size)
            x = x[:, :, plan.lead_frames:]  # VACE's reference frames are not the video's (official decode_latent)
            if output_type == "latents":
                return x
            metadata = self._metadata(plan, conditioning, prompt)
            around = conditioning.output_frames()  # continuation: the old video first, the overlap skipped
            if writer is not None:
                video = self._decode_to(writer, metadata, run, plan, x, need, decode_callback, around)
            else:
                chunks = _Chunks()
                self._decode(run, plan, x, need, decode_callback, chunks, around)
                video = Video(np.concatenate(chunks), fps=plan.fps, metadata=metadata)
        video.latents = x[0].cpu()  # for the side file continuation reads (`extend.write_side_file`)
        return video

    def _fit(self, plan: Plan, stream: bool = False):
        """The memory this request needs beside the resident weights, and whether guidance
        runs as one batch of two (when that fits) or as two passes (half the activations).
        stream: the frames go to a file as they are decoded (one chunk of them held)."""
        window = None if plan.windows is None else plan.windows.size
        fit = functools.partial(check_fits, self.dit.config, plan.height, plan.width, plan.num_frames,
                                device=self.device, dtype=input_dtype(self.dit.blocks[0].self_attn.q),
                                vae_dtype=next(self.vae.parameters()).dtype, stream=stream,
                                window_frames=None if window is None else (window - 1) * plan.latent[1] + 1)
        batched = self.batch_cfg and any(g != 1.0 for g in (plan.guidance, plan.guidance_low) if g is not None)
        try:
            need = fit(batch=2 if batched else 1)
        except ValueError:
            if not batched:
                raise
            need, batched = fit(batch=1), False
        if self.runtime is not None and self.runtime.vram_budget == "auto":
            self.placement.set_dit_budget(auto_budget(self.placement.free_for_dit(), need.work))
        return need, batched

    def _noise(self, plan: Plan, latents: Tensor | None) -> tuple[Tensor, torch.Generator]:
        """The official noise: a generator on the sampling device, float32, unbatched shape; and
        that generator, which then gives a stochastic sampler its fresh noise (as lightx2v's
        step-distill scheduler draws both from one generator), so the seed fixes the run."""
        shape = plan.latent_shape()
        generator = torch.Generator(self.device).manual_seed(plan.seed)
        if latents is not None:
            return latents.to(self.device, torch.float32).reshape(1, *shape), generator
        return torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)[None], generator

    def _denoise(self, run: Run, plan: Plan, conditioning: Conditioning, inputs: dict[str, Tensor], texts,
                 x: Tensor, sigmas: Tensor, timesteps: Tensor, batched: bool, callback,
                 generator: torch.Generator | None = None, lora_step=None) -> Tensor:
        """The sampling loop: each step picks its expert by timestep, guides it, and lets the
        conditioning hold its frames; a step cache (when on) decides inside the DiT."""
        experts = Experts(self.dit, self.dit_low, plan.boundary, plan.guidance, plan.guidance_low, self.placement)
        self.last_experts = experts.split(timesteps)
        if self.last_experts:
            run.say(experts.describe(timesteps))
        passes = ParallelHalves(self.parallel.cfg) if self.parallel is not None and self.parallel.cfg else \
            Guidance() if batched and conditioning.batch_branches else TwoPass()  # how cond and uncond are computed
        guide = (plan.guider or CFG()).bind(passes)  # plain CFG, or the request's variant or schedule
        guide.start(len(timesteps))
        cache, step = self.step_cache, [0]  # the sampler calls the model function once per step
        if cache is not None:
            cache.start(len(timesteps), self.dit.config, plan.height, plan.width)

        windows = plan.windows
        if windows is not None:
            run.say(windows.describe(plan.latent[1]))

        def branch(dit, frames, x: Tensor, t: Tensor, context: Tensor, names: tuple[str, ...]) -> Tensor:
            """One DiT pass; frames: the latent frames of the context window x holds (None: all)."""
            given = conditioning.batch(inputs if frames is None else conditioning.window(inputs, frames), names)
            if frames is not None:  # a step cache keeps each window's state apart, by where it starts
                names = tuple(f"{name}@{frames[0]}" for name in names)
            if cache is not None:
                cache.at(step[0], names)
            # one timestep for the batch: the DiT embeds it once for every branch
            t = conditioning.timesteps(t.to(x.device).float().reshape(1), x.shape, dit.config.patch_size, frames)
            return dit(x, t, context, **given)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            dit, scale = experts.pick(t)
            at = Step(step[0], len(timesteps), dit)
            try:
                if windows is None:
                    return guide(functools.partial(branch, dit, None), x, t, *texts, scale, at)
                return windows.run(step[0], x, lambda part, frames: guide(functools.partial(branch, dit, frames),
                                                                          part, t, *windows.texts(texts, frames), scale, at),
                                   bar.update)
            finally:
                step[0] += 1

        # one bar over steps, or over windows x steps
        bar = _progress(len(timesteps) if windows is None else windows.count(len(timesteps)), "denoising",
                        run.progress, unit="step" if windows is None else "window")
        marks = [time.perf_counter()]
        # per-step LoRA strengths: step i of the plan's steps (video-to-video runs the last ones)
        first = plan.steps - len(timesteps)
        if lora_step is not None:
            lora_step(first)

        def advance(i: int, total: int, latents: Tensor) -> None:
            if lora_step is not None and i + 1 < total:
                lora_step(first + i + 1)
            conditioning.fix(latents)
            marks.append(time.perf_counter())
            if cache is not None:
                bar.set_postfix(skipped=cache.stats.total_skipped, refresh=False)
            if windows is None:
                bar.update(1)
            if callback is not None:
                callback(i + 1, total, latents)

        try:
            experts.pick(timesteps[0])  # the expert of the first step comes in
            with self.placement.phase("dit"):
                x = SAMPLERS[plan.sampler](velocity, x, sigmas, timesteps, callback=advance, generator=generator)
        finally:
            bar.close()
        times = [b - a for a, b in zip(marks, marks[1:])]
        self.last_timings = {"first_step": times[0], "later_steps": times[1:]}
        if self.compiled is not None and len(times) > 1:  # compile time apart from step time
            run.say(f"compile: first step {times[0]:.1f} s (warm-up), then "
                    f"{sorted(times[1:])[len(times[1:]) // 2]:.2f} s/step")
        return x

    def _clips(self, run: Run, plan: Plan, conditioning: Conditioning, texts, noise: Tensor, generator, batched: bool,
               callback, lora_step, writer: VideoWriter | None, describe: Callable[[], dict]) -> Video | SavedVideo:
        """Clip after clip (Animate, S2V): each clip is sampled, decoded whole and its new frames
        written before the next clip, which carries its last frames (`Conditioning.finish_clip`).
        Memory is one clip's, however many clips the video has. describe: the metadata, made
        once the first clip is sampled (a step cache's threshold and counts, the experts' split
        are known then: the first clip's) and before its frames open the file."""
        out = _Chunks() if writer is None else writer
        metadata: dict = {}

        def clips() -> None:
            for index in range(conditioning.clips):
                run.say(f"clip {index + 1} of {conditioning.clips}")
                inputs = conditioning.inputs(run)
                sigmas, timesteps = conditioning.schedule(*schedule(plan.sampler, plan.steps, plan.shift,
                                                                    plan.timesteps))
                x = conditioning.start(run, conditioning.clip_noise(index, noise, generator), sigmas)
                x = self._denoise(run, plan, conditioning, inputs, texts, x, sigmas, timesteps, batched, callback,
                                  generator, lora_step)
                if index == 0:
                    metadata.update(describe())
                    if writer is not None:
                        writer.metadata = metadata
                out.write(to_pixels(conditioning.finish_clip(run, index, x)))

        if writer is None:
            clips()
            video = Video(np.concatenate(out), fps=plan.fps, metadata=metadata)
            video.soundtrack = plan.soundtrack  # S2V: `video.save(path, audio=video.soundtrack)` keeps the sound
            return video
        try:
            with writer:
                clips()
        finally:
            self.last_partial = writer.kept
        return SavedVideo(writer.path, writer.frames_written, writer.size, fps=plan.fps, metadata=metadata)

    def _decode(self, run: Run, plan: Plan, x: Tensor, need, decode_callback, writer, around: tuple = (None, 0)
                ) -> None:
        """Decode chunk by chunk, each chunk going to `writer.write` as uint8 frames `[n, H, W, 3]`
        as soon as it is decoded (a VideoWriter, or `_Chunks` to keep them). around: frames the
        writer gets first and decoded frames it skips (continuation: the old video, the overlap)."""
        bar = _progress(None, "decoding", run.progress, unit="chunk")

        def done(chunk: int, total: int) -> None:
            bar.total = total
            bar.update(1)
            if decode_callback is not None:
                decode_callback(chunk, total)

        try:
            with self.placement.phase("vae"):
                # Tiles only when whole frames would not fit what is free now (never by default on a big GPU).
                tiles = decode_tiles(plan.height, plan.width, next(self.vae.parameters()).dtype,
                                     available_memory(self.device) - need.video)
                tiling = dict(tile_size=tiles and tiles[0], tile_stride=tiles and tiles[1], callback=done)
                head, skip = around
                if head is not None:
                    writer.write(head)
                for chunk in self.vae.decode_chunks(x, **tiling):  # [1, 3, n, H, W]
                    pixels = to_pixels(chunk[0])
                    cut = min(skip, len(pixels))
                    skip -= cut
                    if cut < len(pixels):
                        writer.write(pixels[cut:])
        finally:
            bar.close()

    def _decode_to(self, writer: VideoWriter, metadata: dict, run: Run, plan: Plan, x: Tensor, need,
                   decode_callback, around: tuple = (None, 0)) -> SavedVideo:
        """Decode into the file chunk by chunk; stopped part-way, what was written is kept."""
        writer.metadata = metadata
        try:
            with writer:
                self._decode(run, plan, x, need, decode_callback, writer, around)
        finally:
            self.last_partial = writer.kept
        return SavedVideo(writer.path, writer.frames_written, writer.size, fps=plan.fps, metadata=metadata)

    def _metadata(self, plan: Plan, conditioning: Conditioning, prompt) -> dict:
        metadata = dict(prompt=prompt or "", negative_prompt=plan.negative_prompt or "", seed=plan.seed,
                        model=self.name, task=plan.task, size=f"{plan.width}x{plan.height}",
                        frames=plan.num_frames, steps=plan.steps, guidance=plan.guidance, shift=plan.shift,
                        sampler=plan.sampler, generator="wanx", **conditioning.metadata())
        if plan.timesteps is not None:
            metadata["timesteps"] = list(plan.timesteps)
        if plan.windows is not None:
            w, temporal = plan.windows, plan.latent[1]
            metadata["context_windows"] = {"frames": (w.size - 1) * temporal + 1, "overlap": w.overlap * temporal,
                                           "schedule": w.schedule, "blend": w.blend,
                                           **({"color_match": True} if w.color_match else {})}

        if plan.guider is not None:
            metadata["guidance_variant"] = describe(plan.guider)
        if self.last_experts:
            metadata["guidance_low"] = plan.guidance_low
            metadata["experts"] = self.last_experts
        if self.step_cache is not None:
            cache = self.step_cache
            metadata["cache"] = {"kind": cache.kind, "threshold": cache.active_threshold,
                                 "computed": cache.stats.total_computed, "skipped": cache.stats.total_skipped}
        loras = {}  # name -> (entry, the experts that hold it)
        for expert, dit in (("high", self.dit), ("low", self.dit_low)):
            for name, entry in (loaded_loras(dit) if dit is not None else {}).items():
                loras.setdefault(name, (entry, []))[1].append(expert)
        if loras:
            metadata["loras"] = [{"name": name, "sha256": entry.lora.sha256,
                                  "strength": entry.strength if entry.schedule is None else
                                  entry.schedule.values(plan.steps) if hasattr(entry.schedule, "values") else
                                  list(entry.schedule),
                                  "file": entry.lora.path.name if entry.lora.path else None,
                                  **({"experts": experts} if self.dit_low is not None else {})}
                                 for name, (entry, experts) in loras.items()]
        return metadata


    # -------------------------------------------------------------------------------------
    def load_lora(self, path: str | Path, strength=1.0, *, name: str | None = None,
                  fuse: bool | None = None, expert: str | None = None, partial: bool = False) -> LoraReport:
        """Apply a LoRA file (any format `wanx.lora` reads) to the DiT; call again to stack.
        strength: a number, a list with one per denoising step, or `wanx.lora.Ramp(start, end)`
        (a per-step strength loads live and changes between steps without re-fusing).
        fuse: default merged into the weights on a resident bf16/fp32 model, live (added at
        run time) on an FP8 or streamed one. A LoRA that does not fit this model is an error
        and changes nothing; partial=True applies the modules the model has and names the rest
        in the report. expert: Wan2.2 A14B, "high" or "low" for one expert (e.g. a LoRA
        trained with `wanx train --expert`); default both."""
        report = apply_to_experts(self.experts, path, strength, expert=expert, name=name, fuse=fuse, partial=partial)
        self.applied.loras.append((report, expert))
        return report

    def set_lora_strength(self, name: str, strength: float) -> None:
        for dit in self._holding(name):
            set_lora_strength(dit, name, strength)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (or all): fused weights come back bit for bit."""
        for dit in self.experts.values() if name is None else self._holding(name):
            remove_lora(dit, name)

    def _holding(self, name: str) -> list:
        """The experts that hold LoRA `name` (the DiT when none does: it names the error)."""
        return [dit for dit in self.experts.values() if name in loaded_loras(dit)] or [self.dit]

    def plan(self, prompt=None, negative_prompt=None, **request) -> Plan:
        """Check every input and resolve the defaults; raises ValueError with one clear line."""
        return plan_request(self.model_type, prompt, negative_prompt, has_text_encoder=self.text_encoder is not None,
                            has_image_encoder=self.image_encoder is not None or not self.dit.config.has_image_input,
                            model_defaults=self.defaults, experts=len(self.experts), clip=self.dit.config.clip,
                            vae_config=self.vae.config, layers=self.dit.config.num_layers, **request)


    # -------------------------------------------------------------------------------------
    def _text(self, plan: Plan, prompt, prompt_embeds, negative_prompt_embeds) -> tuple[Tensor, Tensor | None]:
        """(context `[n, text_len, 4096]`, one row per prompt, the negative's `[1, ...]` or None)."""
        device = self.device
        prompts = [] if prompt_embeds is not None else list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
        count = len(prompts) or 1  # prompts over time: one context each (context windows pick theirs)
        if negative_prompt_embeds is None and plan.negative_prompt is not None:
            prompts.append(plan.negative_prompt)
        encoded = None
        if prompts:  # zeros after each prompt's tokens: keep the longest, the DiT pads to text_len
            encoded, lengths = self.text_encoder.encode(prompts)
            if int(lengths.max()) > self.dit.config.text_len:
                raise ValueError(f"the prompt has {int(lengths.max())} tokens; this model reads at most "
                                 f"{self.dit.config.text_len}: shorten it")
            encoded = encoded[:, : int(lengths.max())]
        context = prompt_embeds if prompt_embeds is not None else encoded[:count]
        if negative_prompt_embeds is not None:
            context_null = negative_prompt_embeds
        elif plan.negative_prompt is not None:
            context_null = encoded[-1:]
        else:
            context_null = None
        context = _pad_text(context.to(device), self.dit.config.text_len)
        if context_null is not None:
            context_null = _pad_text(context_null.to(device), self.dit.config.text_len)
        return context, context_null


    @property
    def step_cache(self):
        """speed.cache.StepCache around the DiT's block loop, or None."""
        return self.applied.cache

    @step_cache.setter
    def step_cache(self, cache) -> None:
        if self.applied.cache is not None:
            self.applied.cache.remove()
        self.applied.cache = cache.add_to(self.dit) if cache is not None else None

    def enable_cache(self, kind: str = "teacache", threshold: float | None = None, **options):
        """Step caching ("teacache" or "magcache"; threshold None: the published setting for
        the model). options: magcache_k, retention, calibration (a file from
        `wanx calibrate-cache`). Returns the StepCache; its `stats` tell what was skipped."""
        from ..speed.cache import StepCache

        self.step_cache = StepCache(kind, threshold, **options)
        return self.step_cache

    def disable_cache(self) -> None:
        self.step_cache = None



class _Chunks(list):
    """The decoded frames kept in memory, chunk by chunk: what `_decode` writes when the
    video is returned rather than written to a file."""

    def write(self, frames) -> None:
        self.append(frames)


def check_vae(dit_config, vae_config, dit_file=None, vae_file=None) -> None:
    """The DiT's latent channels must be the VAE's: 16 (Wan2.1 VAE) or 48 (Wan2.2 VAE, TI2V-5B)."""
    if dit_config.out_dim == vae_config.z_dim:
        return
    def name(file, what):
        return f"{file} ({what})" if file is not None else what

    dit = name(dit_file, f"a {dit_config.model_type} DiT on {dit_config.out_dim} latent channels")
    vae = name(vae_file, f"a Wan{vae_config.generation} VAE with {vae_config.z_dim}")
    want = "Wan2.2_VAE.pth" if dit_config.out_dim == 48 else "Wan2.1_VAE.pth"
    raise ValueError(f"the VAE does not fit the DiT: {dit} needs {want}; {vae} was found")




def _alias(name: str, value, alias: str, alias_value):
    """One canonical keyword, the other accepted as its alias; both at once is an error."""
    if alias_value is not None and value is not None:
        raise ValueError(f"give {name} or its alias {alias}, not both")
    return value if value is not None else alias_value




def _pad_text(context: Tensor, text_len: int) -> Tensor:
    if context.ndim == 2:
        context = context[None]
    if context.shape[1] > text_len:
        raise ValueError(f"text embeddings hold {context.shape[1]} tokens; at most {text_len}")
    return F.pad(context.float(), (0, 0, 0, text_len - context.shape[1]))




def _progress(total: int | None, desc: str, enabled: bool, unit: str = "step"):
    """A tqdm bar on stderr: rate, elapsed time and ETA."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


