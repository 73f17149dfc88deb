"""One pipeline for every Wan2.1 task: text-to-video, image-to-video, first-last-frame-to-video
and video-to-video. The task follows from the DiT's type and the inputs given; conditioning
(text, CLIP image tokens, first/last-frame latents with their mask, a noised input video) is
assembled here and the sampling loop is the same for all.

Wan2.2's TI2V-5B (model type "ti2v", a 48-channel DiT on the Wan2.2 VAE) runs text-to-video
and image-to-video in the same loop: its image is latent frame 0 itself, put in place before the
first step and after every step, with its tokens at timestep 0 (`ti2v_conditioning`).

Wan2.2's A14B models run in the same loop with two DiTs: `dit` (the high-noise expert) and
`dit_low`. Each step goes to one of them by its timestep, t >= boundary * 1000 to `dit`, with
that expert's guidance scale; the sampler is one solver throughout, so its multistep history
carries across the switch, as in the official code.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .lora import LoraReport, apply_lora, loaded_loras, remove_lora, set_lora_strength
from .memory.estimate import available_memory, check_fits, decode_tiles, estimate, weight_bytes
from .memory.placement import Placement, auto_budget, load_devices, resolve_offload
from .models.transformer import input_dtype
from .runtime import Runtime
from .sampling import NUM_TRAIN_TIMESTEPS, SAMPLERS, guided, noise_to, schedule
from .video import Video, read_image, read_video, to_pixels, to_unit

# Official negative prompts (wan/configs): shared, I2V adds 镜头晃动 (camera shake), FLF2V also 镜头切换 (cut).
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，"
    "背景人很多，倒着走"
)
NEGATIVE_PROMPTS = {"t2v": NEGATIVE_PROMPT, "v2v": NEGATIVE_PROMPT, "i2v": "镜头晃动，" + NEGATIVE_PROMPT,
                    "flf2v": "镜头切换，镜头晃动，" + NEGATIVE_PROMPT}
# Official sampling defaults per task (generate.py and the generate() signatures).
DEFAULTS = {"t2v": dict(steps=50, shift=5.0, guidance=5.0), "v2v": dict(steps=50, shift=5.0, guidance=5.0),
            "i2v": dict(steps=40, shift=5.0, guidance=5.0), "flf2v": dict(steps=50, shift=16.0, guidance=5.5)}
# Wan2.2 A14B (wan/configs/wan_{t2v,i2v}_A14B.py): guidance per expert, high noise first here
# (the official tuple is (low, high)); boundary as a share of the 1000 training timesteps.
# Its negative prompt is the shared one, also for I2V; there is no 480P shift for I2V.
DEFAULTS_A14B = {"t2v": dict(steps=40, shift=12.0, guidance=4.0, guidance_low=3.0, boundary=0.875),
                 "i2v": dict(steps=40, shift=5.0, guidance=3.5, guidance_low=3.5, boundary=0.900)}
DEFAULTS_A14B["v2v"] = DEFAULTS_A14B["t2v"]
# Wan2.2 TI2V-5B (wan/configs/wan_ti2v_5B.py, generate.py): one model for text and image,
# 1280x704 (the area in I2V), 121 frames at 24 fps; sizes in multiples of 32 (16x VAE, 2x2 patch).
DEFAULTS["ti2v"] = dict(steps=50, shift=5.0, guidance=5.0, height=704, width=1280, num_frames=121)
TI2V_FPS = 24
TI2V_MULTIPLE = 32
AREA_480P = 832 * 480
FPS = 16


@dataclass
class _Plan:
    """A validated request: everything decided before any heavy work."""

    task: str
    height: int
    width: int
    num_frames: int
    steps: int
    shift: float
    guidance: float
    seed: int
    negative_prompt: str | None
    sampler: str = "unipc"
    # Wan2.2 A14B: the low-noise expert's guidance, and where it takes over (share of 1000)
    guidance_low: float | None = None
    boundary: float | None = None
    image: Tensor | None = None  # [3, H, W] in [-1, 1]
    last_image: Tensor | None = None
    video: Tensor | None = None  # [3, F, H, W] in [-1, 1]
    # latent geometry of the model's VAE: channels, temporal and spatial stride
    latent: tuple[int, int, int] = (16, 4, 8)

    def latent_shape(self) -> tuple[int, int, int, int]:
        """`(C, F', H', W')` of this request's latents."""
        channels, st, ss = self.latent
        return channels, (self.num_frames - 1) // st + 1, self.height // ss, self.width // ss

    @property
    def fps(self) -> int:
        return TI2V_FPS if self.task == "ti2v" else FPS


class WanPipeline:
    """`WanPipeline(dit=..., vae=..., text_encoder=..., image_encoder=...)`, or `from_pretrained`.
    Wan2.2 A14B: `dit` is the high-noise expert and `dit_low` the low-noise one."""

    def __init__(self, dit, vae, text_encoder=None, image_encoder=None, *, dit_low=None, name: str = "custom",
                 runtime: Runtime | None = None, placement: Placement | None = None):
        self.dit, self.vae, self.text_encoder, self.image_encoder = dit, vae, text_encoder, image_encoder
        self.dit_low = dit_low
        if dit_low is not None and dit_low.config != dit.config:
            raise ValueError("the two experts must be alike in architecture (Wan2.2 A14B's are)")
        check_vae(dit.config, vae.config)
        self.defaults: dict = {}  # the model folder's generation settings (wanx-defaults.json)
        self.name = name
        self.runtime = runtime
        self.placement = placement or Placement("none", self.device, {})
        self.batch_cfg = True  # cond and uncond as one batch of 2; False: two passes (less memory)
        self.compiled = None  # speed.compile.CompiledBlocks when the DiT block is compiled
        self.parallel = None  # distributed.ParallelPlan when several ranks share the work
        self.last_timings: dict = {}  # seconds of the first and later denoising steps of the last call
        self.last_experts: dict = {}  # two experts: the last call's boundary and steps on each

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
        num_persistent_param_in_dit: the same in parameters. quantize: "fp8" or "fp8_fast".
        t5_device: "cpu" runs umT5 on the CPU (the official --t5_cpu).
        cache: "teacache" or "magcache" step caching (cache_threshold None: the published
        setting for the model; cache_calibration: a `wanx calibrate-cache` file). compile: the
        DiT block compiled once with torch.compile. attention: "auto", "sdpa", "flash2",
        "flash3" or "sage". See `wanx.runtime.Runtime`."""
        from .hub import find_model

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
    def from_files(cls, files, *, runtime: Runtime | None = None, progress: bool = False,
                   host_load: bool = False) -> "WanPipeline":
        """Load the components `wanx.hub.find_components` found, placed as `runtime` says.
        host_load: the DiT and umT5 stay (memory-mapped) in host memory, for a transform
        that places them itself (FSDP moves only each rank's shard to its GPU)."""
        from .loading import load_model
        from .text import TextEncoder, Tokenizer

        runtime = runtime or Runtime.create()
        device, dtype = runtime.device, runtime.dtype
        check_vae(files.dit_config, files.infos["vae"].config, files.dit, files.vae)  # before any weight is read
        tokenizer = Tokenizer(files.tokenizer)
        weights = sum(weight_bytes(files.parameter_counts(), dtype, runtime.vae_dtype, fp8=bool(runtime.quantize)).values())
        typical = (704, 1280, 121) if files.model_type == "ti2v" else (480, 832, 81)  # the model's usual request
        work = estimate(files.dit_config, *typical, dtype=dtype, vae_dtype=runtime.vae_dtype).work
        offload = resolve_offload(runtime.offload, device, weights, work, available_memory(device))
        where = load_devices(offload, device, runtime.text_device)
        if host_load:
            where = {**where, "dit": torch.device("cpu"), "dit_low": torch.device("cpu"), "t5": torch.device("cpu")}
        dit = load_model(files.dit, dtype=dtype, device=where["dit"], quantize=runtime.quantize, progress=progress)
        dit_low = None
        if files.dit_low is not None:  # fp32-stored experts are cast to dtype as they are read, like any DiT
            dit_low = load_model(files.dit_low, dtype=dtype, device=where["dit_low"], quantize=runtime.quantize,
                                 progress=progress)
        vae = load_model(files.vae, dtype=runtime.vae_dtype, device=where["vae"], progress=progress)
        text_encoder = TextEncoder(load_model(files.text_encoder, dtype=dtype, device=where["t5"], progress=progress),
                                   tokenizer, device=runtime.text_device)
        image_encoder = None
        if dit.config.has_image_input:
            image_encoder = load_model(files.image_encoder, dtype=dtype, device=where["clip"], progress=progress)
        budget = runtime.vram_budget
        if budget == "auto":
            budget = auto_budget(available_memory(device), work)
        placement = Placement(offload, device, {"dit": dit, "dit_low": dit_low, "vae": vae, "t5": text_encoder.model,
                                                "clip": image_encoder}, budget=budget, text_device=runtime.text_device)
        pipe = cls(dit, vae, text_encoder, image_encoder, dit_low=dit_low, name=str(files.folder), runtime=runtime,
                   placement=placement)
        pipe.defaults = dict(files.defaults)
        pipe.apply_speed(runtime, files.folder)
        return pipe

    def apply_speed(self, runtime: Runtime, folder: Path | None = None) -> None:
        """The runtime's speed options: attention kernel, step cache (with the model's own
        calibration when `wanx calibrate-cache` made one: `speed.cache.find_calibration`),
        regional compile."""
        from .attention import backend_for, set_attention_backend

        set_attention_backend(runtime.attention)
        if runtime.device.type == "cuda":  # which kernel runs, in one line (CPU: always SDPA)
            cfg = self.dit.config
            print(f"attention: {backend_for(runtime.device, runtime.dtype, cfg.head_dim)} ({runtime.attention})",
                  file=sys.stderr)
        if runtime.cache:
            if self.dit_low is not None:
                raise ValueError("step caching (--teacache/--magcache) does not support two experts (Wan2.2 A14B) yet")
            calibration = runtime.cache_calibration
            if calibration is None and folder is not None:
                from .speed.cache import find_calibration

                calibration = find_calibration(folder)
            self.enable_cache(runtime.cache, runtime.cache_threshold, calibration=calibration)
        if runtime.compile:
            from .speed.compile import compile_blocks

            self.compiled = compile_blocks(self.dit)
            if self.dit_low is not None:
                compile_blocks(self.dit_low)

    # -------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        *,
        image=None,
        last_image=None,
        video=None,
        strength: float = 0.8,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_scale_low: float | None = None,
        boundary: float | None = None,
        shift: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        latents: Tensor | None = None,
        output_type: str = "video",
        progress: bool = True,
        callback: Callable[[int, int, Tensor], None] | None = None,
        decode_callback: Callable[[int, int], None] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> Video | Tensor:
        """Generate one video. The task follows from the model and the inputs; every unset
        option takes the official default of that task. Inputs are checked before any work.

        Args:
            prompt: what the video shows.
            negative_prompt: what to avoid; default the official (Chinese) negative prompt of
                the task. Unused when guidance_scale is 1.
            image: first frame for I2V/FLF2V (and TI2V-5B, whose image-to-video it makes): a
                path, PIL image, uint8 `[H, W, 3]` array or `[3, H, W]` tensor in [-1, 1].
            last_image: last frame for FLF2V, same forms as `image`.
            video: input for video-to-video (T2V models): a path, `Video`, uint8
                `[F, H, W, 3]` array or `[3, F, H, W]` tensor in [-1, 1].
            strength: video-to-video, in (0, 1]: the share of the sampling steps that is run,
                the last ones, from the input noised to the sigma where they begin (diffusers'
                definition; `strength_schedule`). The shifted schedule makes that sigma high: at
                shift 5, 0.3 starts at sigma 0.68 and 0.6 at 0.88, where little of the input's
                detail is left. 1 ignores the input.
            height, width: output size in pixels, multiples of 16; default 480x832. I2V,
                FLF2V and video-to-video keep the input's aspect ratio within the area
                height x width. TI2V-5B: multiples of 32, default 704x1280; with an image, the
                official `best_output_size` within that area (the image's aspect ratio in
                multiples of 32), the image LANCZOS-resized and centre-cropped to it.
            num_frames: 4k+1 frames at 16 fps; default 81, or for video-to-video the input's
                frame count rounded down to 4k+1 (at most 81, or the model folder's own
                default). TI2V-5B: 121 at 24 fps.
            num_inference_steps: sampling steps; default 50 (40 for I2V). Alias: `steps`.
            guidance_scale: classifier-free guidance scale in [1, 30]; 1 turns guidance off.
                Default 5.0 (5.5 for FLF2V). Alias: `guidance`. Wan2.2 A14B: the high-noise
                expert's (default 4.0 T2V, 3.5 I2V), and the low-noise one's too unless
                guidance_scale_low is given.
            guidance_scale_low: Wan2.2 A14B: the low-noise expert's guidance scale (default
                3.0 T2V, 3.5 I2V; guidance_scale when only that is given).
            boundary: Wan2.2 A14B: where the low-noise expert takes over, as a share of the 1000
                training timesteps (steps with t >= 1000 * boundary run the high-noise expert);
                default the model's (0.875 T2V, 0.9 I2V). Steps and shift move the split.
            shift: schedule shift; default 5.0 (3.0 for I2V at 480P or below, 16 for FLF2V;
                Wan2.2 A14B: 12.0 T2V, 5.0 I2V).
            sampler: "unipc" (official default), "dpm++" or "euler".
            Options left unset take the model folder's own settings first when it has them
            (`wanx-defaults.json`, e.g. the demo model's 96x96 and 17 frames).
            seed: noise seed in [0, 2**64); the same seed gives the official code's noise.
                Default: a random seed, kept in the video's metadata.
            prompt_embeds, negative_prompt_embeds: umT5 embeddings `[1, L, 4096]` instead of
                the prompts (the text encoder is then not run).
            latents: initial noise `[1, C, F', H/s, W/s]` instead of the seed's (the VAE's
                channels and stride: C 16, s 8 for the Wan2.1 VAE; C 48, s 16 for the Wan2.2
                VAE of TI2V-5B).
            output_type: "video" (a `Video` of uint8 frames) or "latents" (the denoised
                latents, not decoded).
            progress: progress bars and stage timings on stderr.
            callback: called after each denoising step as `callback(step, total, latents)`
                (step counts from 1; latents `[1, C, F', H/s, W/s]`, the sampler's current
                state; TI2V image-to-video: with frame 0 already the image again). An
                exception it raises stops the call there, with nothing written: a server
                cancels a job this way.
            decode_callback: called after each decoded chunk of the VAE as
                `decode_callback(done, total)`; an exception it raises stops the decode there.

        Returns:
            A `Video` (`.save(path)`, `.frames` uint8 `[F, H, W, 3]`) or a latent tensor.
        """
        num_inference_steps = _alias("num_inference_steps", num_inference_steps, "steps", steps)
        guidance_scale = _alias("guidance_scale", guidance_scale, "guidance", guidance)
        plan = self.plan(prompt, negative_prompt, image=image, last_image=last_image, video=video, strength=strength,
                         height=height, width=width, num_frames=num_frames, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, guidance_scale_low=guidance_scale_low, boundary=boundary,
                         shift=shift, sampler=sampler, seed=seed,
                         prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, latents=latents,
                         output_type=output_type)
        # The resident weights are loaded already: what is left must hold this request's work.
        # Guidance runs as one batch of two when that fits, else as two passes (half the activations).
        fit = functools.partial(check_fits, self.dit.config, plan.height, plan.width, plan.num_frames,
                                device=self.device, dtype=input_dtype(self.dit.blocks[0].self_attn.q),
                                vae_dtype=next(self.vae.parameters()).dtype)
        batched = self.batch_cfg and any(g != 1.0 for g in (plan.guidance, plan.guidance_low) if g is not None)
        try:
            need = fit(batch=2 if batched else 1)
        except ValueError:
            if not batched:
                raise
            need, batched = fit(batch=1), False
        if self.runtime is not None and self.runtime.vram_budget == "auto":
            self.placement.set_dit_budget(auto_budget(self.placement.free_for_dit(), need.work))
        device = self.device

        with torch.no_grad():
            with _stage("text encoding", progress), self.placement.phase("t5"):
                context, context_null = self._text(plan, prompt, prompt_embeds, negative_prompt_embeds)

            lat_shape = plan.latent_shape()
            if latents is None:
                # The official noise: a generator on the sampling device, float32, unbatched shape.
                gen = torch.Generator(device).manual_seed(plan.seed)
                noise = torch.randn(lat_shape, generator=gen, device=device, dtype=torch.float32)[None]
            else:
                noise = latents.to(device, torch.float32).reshape(1, *lat_shape)

            extra: dict[str, Tensor] = {}
            if plan.task in ("i2v", "flf2v"):
                with _stage("image conditioning", progress), self.placement.phase("clip"), self.placement.phase("vae"):
                    extra = self._image_conditioning(plan)
            first = None  # TI2V image-to-video: the image's latent frame [1, C, 1, H', W']
            if plan.task == "ti2v" and plan.image is not None:
                with _stage("image conditioning", progress), self.placement.phase("vae"):
                    first = ti2v_conditioning(self.vae, plan.image, device)
                noise = noise.clone()
                noise[:, :, :1] = first  # official: latent = (1 - mask) * z + mask * noise

            sigmas, timesteps = schedule(plan.sampler, plan.steps, plan.shift)
            x = noise
            if plan.task == "v2v":
                with _stage("video encoding", progress), self.placement.phase("vae"):
                    x0 = self.vae.encode(plan.video[None].to(device))
                sigmas, timesteps = strength_schedule(sigmas, timesteps, strength)
                x = noise_to(x0, noise, float(sigmas[0]))
                if progress:
                    print(f"video-to-video: strength {strength:g} runs the last {len(timesteps)} of {plan.steps} "
                          f"steps, from the input noised to sigma {float(sigmas[0]):.2f}", file=sys.stderr)

            model_fn = self._velocity(context, context_null, plan, extra, batched, known_first=first is not None)
            high = self._report_experts(plan, timesteps, progress)
            cache = self.step_cache
            if cache is not None:
                cache.start(len(timesteps), self.dit.config, plan.height, plan.width)
            bar = _progress(len(timesteps), "denoising", progress)
            marks = [time.perf_counter()]

            def advance(i, n, latents):
                if first is not None:
                    # TI2V: frame 0 is the image again after every step. In place, in the tensor
                    # the sampler goes on from (the official `latent = (1 - mask2) z + mask2 latent`
                    # after scheduler.step); UniPC's corrector keeps its own pre-step copy, as the
                    # official scheduler's last_sample.
                    latents[:, :, :1] = first
                marks.append(time.perf_counter())
                if cache is not None:
                    bar.set_postfix(skipped=cache.stats.total_skipped, refresh=False)
                bar.update(1)
                if callback is not None:
                    callback(i + 1, n, latents)

            try:
                self.placement.activate("dit" if high else "dit_low")  # the expert of the first step comes in
                with self.placement.phase("dit"):
                    x = SAMPLERS[plan.sampler](model_fn, x, sigmas, timesteps, callback=advance)
            finally:
                bar.close()
            steps = [b - a for a, b in zip(marks, marks[1:])]
            self.last_timings = {"first_step": steps[0], "later_steps": steps[1:]}
            if self.compiled is not None and progress and len(steps) > 1:  # compile time apart from step time
                later = sorted(steps[1:])[len(steps[1:]) // 2]
                print(f"compile: first step {steps[0]:.1f} s (warm-up), then {later:.2f} s/step", file=sys.stderr)
            if output_type == "latents":
                return x

            bar = _progress(None, "decoding", progress, unit="chunk")
            with self.placement.phase("vae"):
                # Tiles only when whole frames would not fit what is free now (never by default on a big GPU).
                tiles = decode_tiles(plan.height, plan.width, next(self.vae.parameters()).dtype,
                                     available_memory(device) - need.video)
                frames = self.vae.decode(x, tile_size=tiles and tiles[0], tile_stride=tiles and tiles[1],
                                         callback=lambda done, total: (setattr(bar, "total", total), bar.update(1),
                                                                       decode_callback and decode_callback(done, total)))
            bar.close()  # frames: [1, 3, F, H, W] in [-1, 1]
        metadata = dict(prompt=prompt or "", negative_prompt=plan.negative_prompt or "", seed=plan.seed,
                        model=self.name, task=plan.task, size=f"{plan.width}x{plan.height}",
                        frames=plan.num_frames, steps=plan.steps, guidance=plan.guidance, shift=plan.shift,
                        sampler=plan.sampler, generator="wanx")
        if plan.task == "v2v":
            metadata["strength"] = strength
        if plan.task == "ti2v":
            metadata["mode"] = "i2v" if plan.image is not None else "t2v"
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
            metadata["loras"] = [{"name": name, "strength": entry.strength, "sha256": entry.lora.sha256,
                                  "file": entry.lora.path.name if entry.lora.path else None,
                                  **({"experts": experts} if self.dit_low is not None else {})}
                                 for name, (entry, experts) in loras.items()]
        return Video(to_pixels(frames[0]), fps=plan.fps, metadata=metadata)

    # -------------------------------------------------------------------------------------
    def load_lora(self, path: str | Path, strength: float = 1.0, *, name: str | None = None,
                  fuse: bool | None = None, expert: str | None = None) -> LoraReport:
        """Apply a LoRA file (any format `wanx.lora` reads) to the DiT; call again to stack.
        fuse: default merged into the weights on a resident bf16/fp32 model, live (added at
        run time) on an FP8 or streamed one. A LoRA that does not fit this model is an error
        and changes nothing. expert: Wan2.2 A14B, "high" or "low" for one expert (e.g. a LoRA
        trained with `wanx train --expert`); default both."""
        if expert not in (None, "high", "low"):
            raise ValueError(f"expert must be 'high', 'low' or None (both), got {expert!r}")
        if expert is not None and self.dit_low is None:
            raise ValueError(f"a LoRA for the {expert}-noise expert needs a model with two experts (Wan2.2 A14B)")
        experts = {None: list(self.experts.values()), "high": [self.dit], "low": [self.dit_low]}[expert]
        report = apply_lora(experts[0], path, strength, fuse=fuse, name=name)
        try:
            for dit in experts[1:]:  # under the first expert's name, which may have been made unique there
                apply_lora(dit, path, strength, fuse=fuse, name=report.name)
        except Exception:
            remove_lora(experts[0], report.name)  # nothing changes when a check fails
            raise
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

    def plan(self, prompt=None, negative_prompt=None, **kwargs) -> _Plan:
        """Check every input and resolve the defaults; raises ValueError with one clear line."""
        needs_clip = self.dit.config.has_image_input
        return plan_request(self.model_type, prompt, negative_prompt, has_text_encoder=self.text_encoder is not None,
                            has_image_encoder=self.image_encoder is not None or not needs_clip,
                            model_defaults=self.defaults, experts=len(self.experts), clip=self.dit.config.clip,
                            vae_config=self.vae.config, **kwargs)

    # -------------------------------------------------------------------------------------
    def _text(self, plan: _Plan, prompt, prompt_embeds, negative_prompt_embeds) -> tuple[Tensor, Tensor | None]:
        device = self.device
        prompts = [] if prompt_embeds is not None else [prompt]
        if negative_prompt_embeds is None and plan.negative_prompt is not None:
            prompts.append(plan.negative_prompt)
        encoded = None
        if prompts:  # zeros after each prompt's tokens: keep the longest, the DiT pads to text_len
            encoded, lengths = self.text_encoder.encode(prompts)
            if int(lengths.max()) > self.dit.config.text_len:
                raise ValueError(f"the prompt has {int(lengths.max())} tokens; this model reads at most "
                                 f"{self.dit.config.text_len}: shorten it")
            encoded = encoded[:, : int(lengths.max())]
        context = prompt_embeds if prompt_embeds is not None else encoded[:1]
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

    def _image_conditioning(self, plan: _Plan) -> dict[str, Tensor]:
        return image_conditioning(self.image_encoder, self.vae, plan.image, plan.last_image, plan.height, plan.width,
                                  plan.num_frames, self.device)

    def _velocity(self, context: Tensor, context_null: Tensor | None, plan: _Plan, extra: dict[str, Tensor],
                  batched: bool = True, known_first: bool = False):
        """The guided velocity function the sampler calls, once per step. With two experts it
        routes each step by its timestep: the expert, its guidance scale, and (offloading) the
        weights on the device follow t, never the step index. known_first (TI2V image-to-video):
        the tokens of latent frame 0 (the image) at timestep 0, the others at t, for both branches."""
        cache = self.step_cache
        step = [0]  # the sampler calls the model function once per step
        boundary = None if self.dit_low is None else plan.boundary * NUM_TRAIN_TIMESTEPS

        def run(dit, x: Tensor, t: Tensor, ctx: Tensor, branches: tuple[str, ...]) -> Tensor:
            cond = {k: v.expand(len(branches), *v.shape[1:]) for k, v in extra.items()}
            if cache is not None:
                cache.at(step[0], branches)
            # one timestep for the batch: the DiT embeds it once for both branches
            t = t.to(x.device).float().reshape(1)
            if known_first:
                t = first_frame_timesteps(x.shape, dit.config.patch_size, t)  # [1, L]
            return dit(x, t, ctx, **cond)

        cfg_parallel = self.parallel.cfg if self.parallel is not None else None

        def fn(x: Tensor, t: Tensor) -> Tensor:
            if boundary is None or float(t) >= boundary:
                name, guidance = "dit", plan.guidance
            else:
                name, guidance = "dit_low", plan.guidance_low
            self.placement.activate(name)  # the other expert leaves the device (offloading)
            dit = self.experts[name]
            if context_null is None or guidance == 1.0:
                return run(dit, x, t, context, ("cond",))
            if cfg_parallel is not None:  # this rank's half computes one branch; the pair swaps results
                mine = cfg_parallel.branch
                cond, uncond = cfg_parallel.combine(run(dit, x, t, context if mine == "cond" else context_null, (mine,)))
                return uncond + guidance * (cond - uncond)
            if not batched:  # the negative pass keeps the image conditioning, as official
                return guided(lambda x, t: run(dit, x, t, context, ("cond",)),
                              lambda x, t: run(dit, x, t, context_null, ("uncond",)), guidance)(x, t)
            cond, uncond = run(dit, torch.cat([x, x]), t, torch.cat([context, context_null]),
                               ("cond", "uncond")).chunk(2)
            return uncond + guidance * (cond - uncond)

        def counted(x: Tensor, t: Tensor) -> Tensor:
            try:
                return fn(x, t)
            finally:
                step[0] += 1

        return counted

    def _report_experts(self, plan: _Plan, timesteps: Tensor, progress: bool) -> int:
        """Steps on the high-noise expert (all of them with one DiT); with two, the split is kept
        in `last_experts` (and the video's metadata) and said in one line."""
        if self.dit_low is None:
            self.last_experts = {}
            return len(timesteps)
        high = high_noise_steps(timesteps, plan.boundary)
        ts = [int(t) for t in timesteps]
        self.last_experts = {"boundary": plan.boundary, "high_noise_steps": high, "low_noise_steps": len(ts) - high}
        if progress:
            def part(name, steps, guidance):
                span = f" (t {steps[0]}..{steps[-1]})" if steps else ""
                return f"{name} {len(steps)} step{'s' * (len(steps) != 1)}{span}, guidance {guidance:g}"

            print(f"experts: {part('high noise', ts[:high], plan.guidance)}; "
                  f"{part('low noise', ts[high:], plan.guidance_low)}; boundary t = {plan.boundary * NUM_TRAIN_TIMESTEPS:g}",
                  file=sys.stderr)
        return high

    # -- step caching ------------------------------------------------------------------------
    @property
    def step_cache(self):
        return getattr(self, "_step_cache", None)

    @step_cache.setter
    def step_cache(self, cache) -> None:
        self._step_cache = cache
        self.dit.loop_wrapper = cache

    def enable_cache(self, kind: str = "teacache", threshold: float | None = None, **options):
        """Step caching ("teacache" or "magcache"; threshold None: the published setting for
        the model). options: magcache_k, retention, calibration (a file from
        `wanx calibrate-cache`). Returns the StepCache; its `stats` tell what was skipped."""
        from .speed.cache import StepCache

        self.step_cache = StepCache(kind, threshold, **options)
        return self.step_cache

    def disable_cache(self) -> None:
        self.step_cache = None


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
GUIDANCE_RANGE = (1.0, 30.0)


class RequestError(ValueError):
    """A request the pipeline refuses, with the argument to change (a pipeline keyword such
    as "num_frames"), so that each face can point at its own field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def high_noise_steps(timesteps: Tensor, boundary: float) -> int:
    """How many steps of a schedule run Wan2.2's high-noise expert: those with t >= boundary *
    1000 (official `_prepare_model_for_timestep`). Timesteps fall, so these come first."""
    return int((timesteps.double() >= boundary * NUM_TRAIN_TIMESTEPS).sum())


def strength_schedule(sigmas: Tensor, timesteps: Tensor, strength: float) -> tuple[Tensor, Tensor]:
    """Video-to-video: the last int(steps x strength) steps of the schedule (at least one), as
    diffusers' WanVideoToVideoPipeline.get_timesteps; the input is noised to the first sigma
    kept. Wan's shifted schedules spend most steps at high noise, so that sigma is high: with
    shift 5 and 50 steps, strength 0.3 starts at sigma 0.68, 0.6 at 0.88, 0.8 at 0.95."""
    steps = len(timesteps)
    run = max(1, min(steps, math.floor(steps * strength + 1e-9)))  # 50 x 0.58 is 28.999...: 29 steps, not 28
    return sigmas[steps - run:], timesteps[steps - run:]


def plan_request(model_type: str, prompt=None, negative_prompt=None, *, has_text_encoder: bool = True,
                 has_image_encoder: bool = True, image=None, last_image=None, video=None, strength=0.8, height=None,
                 width=None, num_frames=None, num_inference_steps=None, guidance_scale=None, guidance_scale_low=None,
                 boundary=None, shift=None, sampler=None, seed=None, prompt_embeds=None, negative_prompt_embeds=None,
                 latents=None, output_type="video", names: Mapping[str, str] | None = None,
                 model_defaults: Mapping | None = None, experts: int = 1, clip: bool = True, vae_config=None) -> _Plan:
    """Validate a request for a `model_type` DiT (reading its image/video inputs) and resolve
    the defaults, before any weight is loaded or any heavy work starts.

    experts: 2 for Wan2.2 A14B (its own defaults, a guidance scale per expert and a boundary).
    clip: False for a Wan2.2 I2V DiT (no CLIP; the shared negative prompt, no 480P shift).
    vae_config: the model's VAE config (latent channels and strides); default the one the
    model type is released with (the Wan2.2 VAE for ti2v, else the Wan2.1 VAE).

    names: how the caller's interface spells each argument in error messages (the CLI says
    `--frames` where Python says `num_frames`); default the Python keyword names.
    model_defaults: the model folder's own settings (`wanx-defaults.json`), taken for every
    option left unset before the official defaults of the task."""
    def n(arg: str) -> str:
        return (names or {}).get(arg, arg)

    own = model_defaults or {}
    if negative_prompt is None:
        negative_prompt = own.get("negative_prompt")
    if width is None and height is None:
        width, height = own.get("width"), own.get("height")
    frames_given = num_frames is not None  # video-to-video: else the input's count, up to the default
    num_frames = num_frames if frames_given else own.get("num_frames")
    num_inference_steps = num_inference_steps if num_inference_steps is not None else own.get("num_inference_steps")
    guidance_scale = guidance_scale if guidance_scale is not None else own.get("guidance_scale")
    guidance_scale_low = guidance_scale_low if guidance_scale_low is not None else own.get("guidance_scale_low")
    boundary = boundary if boundary is not None else own.get("boundary")
    shift = shift if shift is not None else own.get("shift")
    sampler = sampler if sampler is not None else own.get("sampler", "unipc")

    if prompt is None and prompt_embeds is None:
        raise RequestError("prompt", f"give {n('prompt')}" + ("" if names else " (or prompt_embeds)"))
    if prompt is not None and prompt_embeds is None and not has_text_encoder:
        raise ValueError("this pipeline has no text encoder: pass prompt_embeds")
    if sampler not in SAMPLERS:
        raise RequestError("sampler", f"unknown {n('sampler')} {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if output_type not in ("video", "latents"):
        raise ValueError(f"output_type must be 'video' or 'latents', got {output_type!r}")
    ti2v = model_type == "ti2v"
    m = TI2V_MULTIPLE if ti2v else 16  # the VAE's spatial stride times the 2x2 patch
    trained = "Wan2.2 TI2V-5B is trained at 1280x704" if ti2v else "Wan2.1 is trained at 832x480 and 1280x720"
    for arg, value in (("width", width), ("height", height)):
        if value is None:
            continue
        if value <= 0:
            raise RequestError(arg, f"{n(arg)} {value} must be positive (a multiple of {m}, e.g. "
                                    f"{'1280x704' if ti2v else '832x480'})")
        if value % m:
            nearest = f"{m}" if value < m else f"{value // m * m} or {(value // m + 1) * m}"
            raise RequestError(arg, f"{n(arg)} {value} is not a multiple of {m}; nearest valid: {nearest} ({trained})")
    if num_frames is not None and (num_frames < 1 or (num_frames - 1) % 4):
        low = max(1, (num_frames - 1) // 4 * 4 + 1)
        raise RequestError("num_frames", f"{n('num_frames')} {num_frames} must be 4k+1 (e.g. {low} or {low + 4})")
    if num_inference_steps is not None and num_inference_steps < 1:
        raise RequestError("num_inference_steps", f"{n('num_inference_steps')} must be >= 1, got {num_inference_steps}")
    for arg, value in (("guidance_scale", guidance_scale), ("guidance_scale_low", guidance_scale_low)):
        if value is not None and not GUIDANCE_RANGE[0] <= value <= GUIDANCE_RANGE[1]:
            raise RequestError(arg, f"{n(arg)} must be in [{GUIDANCE_RANGE[0]:g}, {GUIDANCE_RANGE[1]:g}] "
                                    f"(1 turns guidance off; the official default is 5), got {value:g}")
    moe = experts == 2
    if not moe and (guidance_scale_low is not None or boundary is not None):
        arg = "guidance_scale_low" if guidance_scale_low is not None else "boundary"
        raise RequestError(arg, f"{n(arg)} is for a model with two experts (Wan2.2 A14B, e.g. Wan-AI/Wan2.2-T2V-A14B); "
                                "this one has one DiT")
    if boundary is not None and not 0 <= boundary <= 1:
        raise RequestError("boundary", f"{n('boundary')} is a share of the 1000 training timesteps, in [0, 1] "
                                       f"(0.875 for T2V-A14B, 0.9 for I2V-A14B), got {boundary:g}")
    if shift is not None and shift <= 0:
        raise RequestError("shift", f"{n('shift')} must be positive, got {shift:g}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise RequestError("seed", f"{n('seed')} must be between 0 and {MAX_SEED} (2**64 - 1), got {seed}")

    if video is not None:
        task = "v2v"
        if model_type != "t2v":
            raise RequestError("video", f"video-to-video needs a T2V model; this one is {model_type}")
        if image is not None or last_image is not None:
            raise RequestError("video", f"give either {n('video')} (video-to-video) or {n('image')}/{n('last_image')}, not both")
        if not 0 < strength <= 1:
            raise RequestError("strength", f"{n('strength')} must be in (0, 1], got {strength}")
    elif ti2v:  # one model for both: an image makes it image-to-video
        task = "ti2v"
        if last_image is not None:
            raise RequestError("last_image", f"{n('last_image')} needs an FLF2V model (Wan-AI/Wan2.1-FLF2V-14B-720P); "
                                             "this one is TI2V (text, or text and a first frame)")
    elif model_type == "t2v":
        task = "t2v"
        if image is not None or last_image is not None:
            raise RequestError("image", "this is a T2V model: image conditioning needs an I2V or FLF2V model "
                             "(e.g. Wan-AI/Wan2.1-I2V-14B-480P)")
    elif model_type == "i2v":
        task = "i2v"
        if image is None:
            raise RequestError("image", f"this is an I2V model: give {n('image')} (the first frame)")
        if last_image is not None:
            raise RequestError("last_image", f"{n('last_image')} needs an FLF2V model (Wan-AI/Wan2.1-FLF2V-14B-720P); this one is I2V")
    else:
        task = "flf2v"
        if image is None or last_image is None:
            raise RequestError("image" if image is None else "last_image", f"this is an FLF2V model: give {n('image')} (first frame) and {n('last_image')} (last frame)")
    if task in ("i2v", "flf2v") and not has_image_encoder:
        raise ValueError(f"{task} needs an image encoder (CLIP) in the pipeline")

    defaults = DEFAULTS_A14B[task] if moe else DEFAULTS[task]
    size_given = height is not None and width is not None
    height, width = (height, width) if size_given else \
        (height or defaults.get("height", 480), width or defaults.get("width", 832))
    plan = _Plan(task=task, height=height, width=width, num_frames=num_frames or defaults.get("num_frames", 81),
                 steps=int(num_inference_steps if num_inference_steps is not None else defaults["steps"]),
                 shift=float(shift if shift is not None else defaults["shift"]),
                 guidance=float(guidance_scale if guidance_scale is not None else defaults["guidance"]),
                 seed=int(seed) if seed is not None else random.randint(0, 2**31 - 1),
                 negative_prompt=None, sampler=sampler)
    if moe:  # one guidance given applies to both experts, as the official --sample_guide_scale
        low = guidance_scale_low if guidance_scale_low is not None else \
            guidance_scale if guidance_scale is not None else defaults["guidance_low"]
        plan.guidance_low = float(low)
        plan.boundary = float(boundary if boundary is not None else defaults["boundary"])
    if negative_prompt_embeds is None and (plan.guidance != 1.0 or plan.guidance_low not in (None, 1.0)):
        # "" is a prompt too: the empty text. Wan2.2 uses the shared negative prompt for every task.
        wan22 = moe or not clip or ti2v
        plan.negative_prompt = negative_prompt if negative_prompt is not None else \
            NEGATIVE_PROMPT if wan22 else NEGATIVE_PROMPTS[task]

    if vae_config is not None:
        plan.latent = (vae_config.z_dim, vae_config.temporal_stride, vae_config.spatial_stride)
    elif ti2v:
        plan.latent = (48, 4, 16)
    if ti2v and image is not None:
        # Official: the output size nearest the image's aspect ratio within the area (the
        # requested height x width, default 1280x704), then LANCZOS resize and centre crop.
        picture = _read_input("image", _image_tensor, image)
        plan.width, plan.height = best_output_size(picture.shape[2], picture.shape[1], TI2V_MULTIPLE, TI2V_MULTIPLE,
                                                   height * width)
        plan.image = resize_and_crop(picture, plan.height, plan.width)
    if task in ("i2v", "flf2v"):
        plan.image = _read_input("image", _image_tensor, image)
        plan.height, plan.width = _size_for_image(plan.image, height * width)
        if shift is None and task == "i2v" and height * width <= AREA_480P and clip and not moe:
            plan.shift = 3.0  # the official 480P I2V shift
        if last_image is not None:
            plan.last_image = _read_input("last_image", _image_tensor, last_image)
    if task == "v2v":
        frames = _read_input("video", _video_frames, video)  # [3, F, H, W]
        count = frames.shape[1]
        if not frames_given:  # the folder's frame count (the demo model's 17) is the most, as the official 81
            plan.num_frames = min(num_frames or 81, (count - 1) // 4 * 4 + 1)
        elif count < num_frames:
            raise RequestError("num_frames", f"the input video has {count} frames at {FPS} fps; {n('num_frames')} is {num_frames}: "
                             f"lower it to {(count - 1) // 4 * 4 + 1} or give a longer video")
        plan.height, plan.width = _size_for_image(frames[:, 0], height * width)
        frames = frames[:, :plan.num_frames].transpose(0, 1)  # [F, 3, H, W]
        frames = F.interpolate(frames, size=(plan.height, plan.width), mode="bicubic", align_corners=False)
        plan.video = frames.clamp(-1, 1).transpose(0, 1)
    if min(plan.height, plan.width) < 16:
        raise RequestError("height", f"the input's aspect ratio leaves a side under 16 pixels at {width}x{height}; "
                         f"give a larger {n('height')}")
    if latents is not None:
        want = plan.latent_shape()
        if latents.numel() != math.prod(want):
            raise ValueError(f"latents must have shape [1, {', '.join(map(str, want))}], got {tuple(latents.shape)}")
    return plan


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


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: int) -> tuple[int, int]:
    """Official Wan2.2 `best_output_size`: the (width, height) in multiples of (dw, dh) within
    expected_area whose aspect ratio is nearest w/h, trying width first and height first.
    A side is at least one multiple (the official code divides by zero there instead)."""
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    ow1 = max(dw, int(ow // dw * dw))
    oh1 = max(dh, int(expected_area / ow1 // dh * dh))
    ratio1 = ow1 / oh1
    oh2 = max(dh, int(oh // dh * dh))
    ow2 = max(dw, int(expected_area / oh2 // dw * dw))
    ratio2 = ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    return ow2, oh2


def resize_and_crop(image: Tensor, height: int, width: int) -> Tensor:
    """Official TI2V image preparation: PIL LANCZOS resize by max(ow/iw, oh/ih), centre crop to
    (width, height). `[3, H, W]` in [-1, 1] -> `[3, height, width]` in [-1, 1]."""
    from PIL import Image

    ih, iw = image.shape[1:]
    scale = max(width / iw, height / ih)
    picture = Image.fromarray(to_pixels(image[:, None])[0])
    picture = picture.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    left, top = (picture.width - width) // 2, (picture.height - height) // 2
    picture = picture.crop((left, top, left + width, top + height))
    return to_unit(np.asarray(picture))


def ti2v_conditioning(vae, image: Tensor, device) -> Tensor:
    """TI2V image-to-video: the image `[3, H, W]` in [-1, 1] (at the output size) encoded as one
    latent frame `[1, C, 1, H/s, W/s]`, which replaces latent frame 0 (official `textimage2video.i2v`)."""
    return vae.encode(image[:, None][None].to(device)).float()


def first_frame_timesteps(shape, patch_size, t: Tensor) -> Tensor:
    """Per-token timesteps `[1, L]` for latents of `shape` [B, C, F, H, W]: 0 for the tokens of
    latent frame 0 (the known image), t elsewhere; official: channel 0 of the mask, subsampled
    by the patch (frames are patched one by one, pt = 1)."""
    _, _, f, h, w = shape
    pt, ph, pw = patch_size
    mask = torch.ones(f // pt, h // ph, w // pw, device=t.device)
    mask[0] = 0
    return (mask * t.reshape(())).flatten()[None]


def _read_input(field: str, read, value):
    """An input file read for the plan; a file that is there but unusable names its field."""
    try:
        return read(value)
    except RequestError:
        raise
    except ValueError as err:
        raise RequestError(field, str(err)) from None


def _alias(name: str, value, alias: str, alias_value):
    """One canonical keyword, the other accepted as its alias; both at once is an error."""
    if alias_value is not None and value is not None:
        raise ValueError(f"give {name} or its alias {alias}, not both")
    return value if value is not None else alias_value


# -----------------------------------------------------------------------------------------


def _pad_text(context: Tensor, text_len: int) -> Tensor:
    if context.ndim == 2:
        context = context[None]
    if context.shape[1] > text_len:
        raise ValueError(f"text embeddings hold {context.shape[1]} tokens; at most {text_len}")
    return F.pad(context.float(), (0, 0, 0, text_len - context.shape[1]))


def _image_tensor(image) -> Tensor:
    """A path, PIL image, uint8 `[H, W, 3]` array or `[3, H, W]` tensor in [-1, 1] -> tensor in [-1, 1]."""
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be [3, H, W] in [-1, 1], got {tuple(image.shape)}")
        return image.float().cpu()
    if isinstance(image, (str, Path)):
        image = read_image(image)
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be RGB [H, W, 3], got shape {array.shape}")
    return to_unit(array)


def _video_frames(video) -> Tensor:
    """A path, `Video`, uint8 `[F, H, W, 3]` array or `[3, F, H, W]` tensor -> `[3, F, H, W]` in [-1, 1]
    (files are read at 16 fps)."""
    if isinstance(video, (str, Path)):
        video = read_video(video, fps=FPS)
    if isinstance(video, Video):
        video = video.frames
    if isinstance(video, Tensor):
        if video.ndim != 4 or video.shape[0] != 3:
            raise ValueError(f"video tensor must be [3, F, H, W] in [-1, 1], got {tuple(video.shape)}")
        return video.float().cpu()
    array = np.asarray(video)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"video frames must be [F, H, W, 3] uint8, got shape {array.shape}")
    return to_unit(array)


def _size_for_image(image: Tensor, max_area: int) -> tuple[int, int]:
    """The official I2V size: the image's aspect ratio within max_area, multiples of 16."""
    h, w = image.shape[1:]
    lat_h = round(math.sqrt(max_area * h / w) // 8 // 2 * 2)
    lat_w = round(math.sqrt(max_area * w / h) // 8 // 2 * 2)
    return lat_h * 8, lat_w * 8


def _crop_to_aspect(image: Tensor, aspect: float) -> Tensor:
    """Center-crop `[3, H, W]` to height/width = aspect (the last frame of FLF2V to the first's)."""
    h, w = image.shape[1:]
    if h / w > aspect:
        new_h = round(w * aspect)
        top = (h - new_h) // 2
        return image[:, top: top + new_h]
    new_w = round(h / aspect)
    left = (w - new_w) // 2
    return image[:, :, left: left + new_w]


def _progress(total: int | None, desc: str, enabled: bool, unit: str = "step"):
    """A tqdm bar on stderr: rate, elapsed time and ETA."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


@contextlib.contextmanager
def _stage(name: str, enabled: bool):
    """Time a long stage; one line on stderr when progress is on."""
    start = time.perf_counter()
    yield
    if enabled:
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)


def image_conditioning(image_encoder, vae, image: Tensor, last_image: Tensor | None, h: int, w: int, n: int,
                       device) -> dict[str, Tensor]:
    """I2V/FLF2V inputs of the DiT: CLIP tokens of the given frame(s) `[1, 257|514, d]` (not for
    Wan2.2 I2V: image_encoder None), and y = [mask (4) | VAE latents of the frame(s) + zeros
    (16)] `[1, 20, F', h/8, w/8]`. image, last_image: `[3, H, W]` in [-1, 1] at any size (CLIP
    sees them as given). Also used by `wanx prepare` to cache the conditioning of I2V training clips."""
    images = [image] + ([last_image] if last_image is not None else [])
    clip = None
    if image_encoder is not None:
        clip = torch.cat([image_encoder(img[None].to(device)) for img in images], dim=1)

    first = F.interpolate(image[None], size=(h, w), mode="bicubic", align_corners=False)[0]
    frames = torch.zeros(3, n, h, w)
    frames[:, 0] = first
    if last_image is not None:
        frames[:, -1] = F.interpolate(_crop_to_aspect(last_image, h / w)[None], size=(h, w),
                                      mode="bicubic", align_corners=False)[0]
    y = vae.encode(frames[None].to(device))  # [1, 16, F', h/8, w/8]

    # Mask: pixel frame 0 (and the last, for FLF2V) known; frame 0 repeated 4x (the temporal
    # stride) so that the F pixel frames fold into [4, F'] like the latents.
    s, st = vae.config.spatial_stride, vae.config.temporal_stride
    mask = torch.zeros(1, n, h // s, w // s, device=device)
    mask[:, 0] = 1
    if last_image is not None:
        mask[:, -1] = 1
    mask = torch.cat([mask[:, :1].repeat_interleave(st, dim=1), mask[:, 1:]], dim=1)
    mask = mask.view(1, mask.shape[1] // st, st, h // s, w // s).transpose(1, 2)  # [1, 4, F', h/8, w/8]
    y = torch.cat([mask, y], dim=1)
    return {"y": y} if clip is None else {"clip_features": clip, "y": y}
