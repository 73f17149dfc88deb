"""Runtime choices, kept apart from architecture: where and in what precision the networks
run, and how they are made to fit the device's memory.

One frozen object, built once from CLI flags or API keywords (and, later, a server request or
a training config), checked before anything is loaded. The speed options (step caching,
compile) join it so that no signature has to grow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

OFFLOAD = ("auto", "none", "model", "blocks")
QUANTIZE = (None, "fp8", "fp8_fast", "int8")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # DiT and encoders; time embedding, modulation, norms and head stay fp32
    vae_dtype: torch.dtype = torch.float32
    # "none": every network resident; "model": each network on the device only for its phase;
    # "blocks": DiT blocks streamed under vram_budget (encoders streamed block by block);
    # "auto": "none" when everything fits the device, else "blocks" with an automatic budget.
    offload: str = "auto"
    vram_budget: int | str = "auto"  # bytes of DiT weights kept resident with "blocks", or "auto"
    quantize: str | None = None  # "fp8" / "fp8_fast": DiT block Linear weights in float8_e4m3fn; "int8": in int8
    t5_device: torch.device | None = None  # where umT5 runs (the official --t5_cpu: cpu); default: device
    # speed: step caching ("teacache"/"magcache"; threshold None = the published one for the
    # model; a calibration file from `wanx calibrate-cache`), regional compile, attention kernel
    cache: str | None = None
    cache_threshold: float | None = None
    cache_calibration: str | None = None
    compile: bool = False
    attention: str = "auto"

    @classmethod
    def create(cls, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
               vae_dtype: torch.dtype | str = torch.float32, *, offload: str = "auto",
               vram_budget: int | float | str | None = None, num_persistent_param_in_dit: int | None = None,
               quantize: str | None = None, t5_device: str | torch.device | None = None, cache: str | None = None,
               cache_threshold: float | None = None, cache_calibration: str | None = None, compile: bool = False,
               attention: str = "auto") -> "Runtime":
        """Resolve the defaults (CUDA when present; bf16 on a GPU, fp32 on a CPU) and check
        every choice, before anything is loaded. `num_persistent_param_in_dit` (DiffSynth's
        name) is a budget in parameters rather than bytes."""
        from .memory.streaming import parse_bytes

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if offload not in OFFLOAD:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD)}, got {offload!r}")
        quantize = None if quantize in ("none", "") else quantize
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be 'fp8', 'fp8_fast' or 'int8', got {quantize!r}")
        if num_persistent_param_in_dit is not None:
            if vram_budget is not None:
                raise ValueError("give vram_budget or num_persistent_param_in_dit, not both")
            vram_budget = int(num_persistent_param_in_dit) * (1 if quantize else torch.empty((), dtype=dt).element_size())
        budget: int | str = "auto" if vram_budget in (None, "auto") else parse_bytes(vram_budget)
        _refuse_conflicts(_Choices(offload=offload, vram_budget=vram_budget, quantize=quantize), None)
        if vram_budget is not None and offload == "auto":
            offload = "blocks"  # a budget asks for streaming
        t5 = resolve_device(t5_device) if t5_device is not None else None
        from .attention import BACKENDS
        from .speed.cache import KINDS

        cache = None if cache in ("none", "") else cache
        if cache is not None and cache not in KINDS:
            raise ValueError(f"cache must be one of {', '.join(KINDS)} (or none), got {cache!r}")
        if cache_threshold is not None and (cache is None or cache_threshold < 0):
            raise ValueError("a cache threshold needs cache='teacache' or 'magcache' and must be >= 0")
        if cache_calibration is not None:
            from .speed.cache import load_calibration

            load_calibration(cache_calibration)  # a bad file is said now, not after loading
        if attention not in BACKENDS:
            raise ValueError(f"attention must be one of {', '.join(BACKENDS)}, got {attention!r}")
        return cls(dev, dt, resolve_dtype(vae_dtype, dev), offload, budget, quantize, t5, cache, cache_threshold,
                   None if cache_calibration is None else str(cache_calibration), bool(compile), attention)

    @classmethod
    def from_flags(cls, args: Any) -> "Runtime":
        """The runtime a command's flags ask for (`wanx generate`, `serve`, `calibrate-cache`;
        `train` and `prepare` too): --device, --dtype, --offload, --vram-budget, --fp8/--int8,
        --t5-device, --teacache/--magcache [THRESHOLD], --cache-calibration, --compile,
        --attention. A flag the command does not have takes its default."""
        def flag(name: str, default=None):
            return getattr(args, name, default)

        teacache, magcache = flag("teacache"), flag("magcache")
        if teacache is not None and magcache is not None:  # one `cache` field: the pair cannot reach check()
            raise ValueError("choose one step cache: --teacache or --magcache")
        cache = "teacache" if teacache is not None else "magcache" if magcache is not None else None
        if flag("fp8", False) and flag("int8", False):  # one `quantize` field, as the cache above
            raise ValueError("choose one weight format: --fp8 or --int8")
        quantize = "fp8" if flag("fp8", False) else "int8" if flag("int8", False) else None
        threshold = teacache if teacache is not None else magcache
        return cls.create(flag("device"), flag("dtype"), offload=flag("offload", "auto"),
                          vram_budget=flag("vram_budget"), quantize=quantize,
                          t5_device=flag("t5_device"), cache=cache,
                          cache_threshold=None if threshold == "auto" else threshold,  # auto: the published one
                          cache_calibration=flag("cache_calibration"), compile=flag("compile", False),
                          attention=flag("attention", "auto"))

    def check(self, *, experts: int = 1, world: int = 1, fsdp: bool = False, sp: str = "auto",
              cfg_parallel: bool = False, names: Mapping[str, str] | None = None) -> None:
        """Refuse, in one line, a pair of choices that cannot go together (the table CONFLICTS):
        this runtime on a model with `experts` DiTs (2: Wan2.2 A14B), run on `world` ranks with
        the parallel plan `fsdp`, `sp`, `cfg_parallel` (`wanx.distributed.parallelize`'s words).
        Call it once the model is known, before any weight is loaded. names: how the caller
        spells each parameter (the CLI: its flags); default PARAMETERS."""
        given = None if self.vram_budget == "auto" and self.offload != "blocks" else self.vram_budget
        _refuse_conflicts(_Choices(self.offload, given, self.quantize, self.cache, experts, world, fsdp, sp,
                                   cfg_parallel), names)

    @property
    def text_device(self) -> torch.device:
        return self.t5_device or self.device


@dataclass(frozen=True)
class _Choices:
    """What CONFLICTS reads: the runtime's choices as given (vram_budget None: not asked for)
    and what is known of the model and the parallel plan."""
    offload: str = "auto"
    vram_budget: Any = None
    quantize: str | None = None
    cache: str | None = None
    experts: int = 1
    world: int = 1
    fsdp: bool = False
    sp: str = "auto"
    cfg_parallel: bool = False


# How the library names each choice in a refusal; a face passes its own words (the CLI, its
# flags: wanx.cli.RUNTIME_FLAGS, which `wanx serve` is given). "ranks" is how to get several ranks.
PARAMETERS = {"offload": "offload", "vram_budget": "vram_budget", "quantize": "quantize",
              "cache": "cache='teacache'/'magcache'", "fsdp": "fsdp", "sp": "sp", "cfg_parallel": "cfg_parallel",
              "ranks": "run in a torch.distributed process group of several ranks"}

# Every pair of choices that cannot go together, in one place: (when they clash, what to say).
# Read by Runtime.create (the runtime alone), Runtime.check (with the model and the parallel
# plan), and so by the CLI, the server, WanPipeline.from_pretrained and training. `n` spells
# a parameter as the caller knows it.
CONFLICTS = (
    (lambda c: c.world == 1 and (c.sp != "auto" or c.cfg_parallel or c.fsdp),
     lambda c, n: f"{n('sp')}, {n('cfg_parallel')} and {n('fsdp')} need several ranks: {n('ranks')}"),
    (lambda c: c.fsdp and (c.offload in ("model", "blocks") or c.vram_budget is not None),
     lambda c, n: f"{n('fsdp')} shards the weights across GPUs; it does not combine with "
                  f"{n('offload')}/{n('vram_budget')}"),
    (lambda c: c.vram_budget is not None and c.offload in ("none", "model"),  # a budget is for streamed blocks
     lambda c, n: f"a VRAM budget streams DiT blocks: it cannot go with offload {c.offload!r}"),
    (lambda c: c.fsdp and c.quantize is not None,
     lambda c, n: f"{n('fsdp')} shards bf16/fp32 weights; {'INT8' if c.quantize == 'int8' else 'FP8'} layers cannot be "
                  f"sharded yet: drop {n('quantize')} or {n('fsdp')}"),
    (lambda c: c.experts > 1 and c.cache is not None,
     lambda c, n: f"step caching ({n('cache')}) does not support two experts (Wan2.2 A14B) yet"),
)


def _refuse_conflicts(choices: _Choices, names: Mapping[str, str] | None) -> None:
    def spell(parameter: str) -> str:
        return (names or {}).get(parameter, PARAMETERS[parameter])

    for clash, message in CONFLICTS:
        if clash(choices):
            raise ValueError(message(choices, spell))


# The one order in which `apply` transforms a pipeline's networks. Quantization happens as the
# weights are read (`load_model(quantize=...)`: FP8 layers are filled directly, no bf16 copy
# first). Placement comes next, so that a live LoRA's adapters are made where the blocks
# compute and stay resident beside streamed weights (a fused LoRA is refused on streamed
# weights either way); the parallel plan then wraps the block loop (innermost) and shards what
# stays resident; the step cache wraps the loop outermost, seeing whole tensors; compile goes
# last, as the innermost block wrapper (`dit.block_wrappers`), the others around its graph.
ORDER = ("quantize", "placement", "lora", "parallel", "cache", "compile")


@dataclass
class Applied:
    """What `apply` did to a pipeline's networks: the handle the pipeline (and a trainer) reads
    instead of asking the transforms themselves."""

    runtime: Runtime
    placement: Any  # memory.placement.Placement: where each network's weights are, per phase
    loras: list = field(default_factory=list)  # (LoraReport, expert) in load order
    parallel: Any = None  # distributed.ParallelPlan on several ranks
    cache: Any = None  # speed.cache.StepCache around the DiT's block loop
    compiled: list = field(default_factory=list)  # speed.compile.CompiledBlocks, one per expert

    @property
    def streamed(self) -> bool:
        return bool(self.placement.streamers.get("dit"))


def apply(runtime: Runtime, networks: Mapping[str, Any], *, offload: str, budget: int, folder=None,
          loras: Sequence = (), parallel: Mapping | None = None, say=None) -> Applied:
    """Transform a pipeline's loaded networks ({"dit", "dit_low", "vae", "t5", "clip"}, the
    absent ones None) as `runtime` asks, in ORDER. offload: "none", "model" or "blocks" (auto
    resolved); budget: the DiT bytes resident with "blocks". folder: the model folder (its own
    cache calibration). loras: (LoRA file or path, strength, expert, name[, partial]) each; parallel: the
    keywords of `distributed.plan_parallel` (sp, cfg_parallel, fsdp) when several ranks share the
    work. say: where one-line notes go (the attention kernel chosen)."""
    from .attention import backend_for, set_attention_backend
    from .memory.placement import Placement

    dit = networks["dit"]
    experts = {name: networks[name] for name in ("dit", "dit_low") if networks.get(name) is not None}
    set_attention_backend(runtime.attention)
    if runtime.device.type == "cuda" and say is not None:  # which kernel runs, in one line (CPU: always SDPA)
        say(f"attention: {backend_for(runtime.device, runtime.dtype, dit.config.head_dim)} ({runtime.attention})")
    placement = Placement(offload, runtime.device, dict(networks), budget=budget, text_device=runtime.text_device)
    applied = Applied(runtime, placement)
    if loras:
        from .lora.apply import apply_to_experts

        streamed = applied.streamed
        for lora, strength, expert, name, *partial in loras:  # partial (optional): apply what fits, name the rest
            report = apply_to_experts(experts, lora, strength, expert=expert, name=name, streamed=streamed,
                                      partial=bool(partial and partial[0]))
            applied.loras.append((report, expert))
    if parallel is not None:
        from .distributed import plan_parallel

        text = networks.get("t5") if runtime.text_device == runtime.device else None
        applied.parallel = plan_parallel(list(experts.values()), runtime.device, text_model=text, **parallel)
    if runtime.cache:
        from .speed.cache import StepCache, find_calibration

        calibration = runtime.cache_calibration
        if calibration is None and folder is not None:
            calibration = find_calibration(folder)
        applied.cache = StepCache(runtime.cache, runtime.cache_threshold, calibration=calibration).add_to(dit)
    if runtime.compile:
        from .speed.compile import compile_blocks

        applied.compiled = [compile_blocks(model) for model in experts.values()]
    return applied


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None/'auto': bf16 on an accelerator, fp32 on a CPU (where bf16 matmuls are slow and
    inexact); 'bf16', 'fp16', 'fp32' or a torch dtype as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable torch.device, or a one-line ValueError saying why not and what to use."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r}: CUDA is not available ({why}, torch {torch.__version__}); "
                             "use --device cpu, or install a CUDA build of PyTorch")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type not in ("cpu", "mps") or (dev.type == "mps" and not torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} is not available here; use cpu or cuda")
    return dev
