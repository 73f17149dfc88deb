"""Build the demo model from nothing, with wanx's own tools, and measure it:

1. the shapes dataset (`wanx.demo.shapes.write_dataset`): mp4 clips + metadata.csv;
2. a tokenizer built from every caption (English and Chinese) and a small umT5, random and frozen;
3. a small Wan VAE trained from scratch on crops of the clips (`wanx.training.vae`);
4. `wanx.training.prepare` (latents and text embeddings with that VAE and umT5), then
   `wanx.training.run` of a small DiT (every weight, from random ones: `wanx train --full`);
5. 40 prompts with seeds never used in training, half English and half Chinese, including every
   held-out combination: generated, checked with the detector, accuracy reported.

    python -m wanx.demo.build OUT              # the real build (budget: about 2 hours on 2 CPU cores)
    python -m wanx.demo.build OUT --quick      # the same stages at toy sizes: checks the plumbing in minutes

OUT/model is a model folder in the official layout (`wanx generate --model OUT/model`);
OUT/report.json holds the settings, the times of each stage and the accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class BuildSettings:
    size: int = 96
    frames: int = 17
    clips_per_combination: int = 4
    clips: int | None = None  # instead: this many clips in all (quick builds)
    vae_dim: int = 16
    # The VAE in three phases, each from the last: single frames (the spatial code, cheap:
    # batch 16), 9-frame crops (the temporal code), whole 17-frame clips (a causal decoder
    # trained on 9 frames fails past them: L1 0.02 on frames 1-9, ~0.4 after). Each:
    # (steps, crop, frames, batch, peak rate).
    vae_phases: tuple = ((400, 32, 1, 16, 1e-3), (400, 32, 9, 4, 3e-4), (300, 24, 17, 4, 1e-4))
    vae_gate: float = 0.9  # the round trip must keep colour and motion this often, or the build stops
    # `still_drift`'s weight in the temporal phases. Off: 0.3 from their start cut the drift of
    # a still black clip's latent frames (mean |z_t - z_0|, unit-variance latents; the report's
    # `still_drift`) from 0.6-1.7 to 0.26-0.52, but the round trip's L1 went 0.07 -> 0.16 and
    # the gate failed (42%).
    vae_still_weight: float = 0.0
    t5_dim: int = 64
    dit_dim: int = 256
    dit_layers: int = 4
    dit_heads: int = 4
    text_len: int = 32  # captions are under 32 tokens; 512 would double the cost of a training step
    # The DiT in phases, each from the last: (steps, peak rate, warmup, training shift). The
    # first, from Wan's from-scratch init, learns colour, shape and background (colour 95%)
    # but left the motion to the noise (35%, chance is 25%): the direction word only pays at
    # the noisiest timesteps, where the layout is decided (a wrong direction raised the loss by
    # 2% at sigma 0.97, a wrong colour by 28%), and shift 3 draws too few of them. Then the
    # same data at shift 8 (sigma > 0.9 on half the steps): measured after 1500 steps, the
    # direction's share of the loss at sigma 0.97 went 0.007 -> 0.033 and motion 35% -> 55%.
    dit_phases: tuple = ((5000, 1e-3, 200, 3.0), (1500, 3e-4, 50, 8.0), (2000, 3e-4, 50, 8.0))
    batch_size: int = 8
    shift: float = 3.0  # for sampling: 180 latent tokens, less shift than 480P's 5
    sample_steps: int = 20
    guidance: float = 4.0
    eval_prompts: int = 40
    seed: int = 0


DIT_FILE, VAE_FILE, T5_FILE = "diffusion_pytorch_model.safetensors", "Wan2.1_VAE.safetensors", "umt5-enc.safetensors"
PACKAGE_MODEL = Path(__file__).parent / "model"  # what `--model demo` loads

QUICK = BuildSettings(size=32, frames=5, clips_per_combination=1, clips=12, vae_dim=8,
                      vae_phases=((3, 16, 1, 2, 1e-3), (3, 16, 5, 2, 1e-3)), vae_gate=0.0,
                      dit_dim=64, dit_layers=2, dit_heads=2, dit_phases=((5, 1e-3, 1, 3.0), (3, 3e-4, 1, 8.0)),
                      batch_size=2, sample_steps=3, eval_prompts=4)


def build(out: Path, settings: BuildSettings, *, progress: bool = True, resume: bool = False) -> dict:
    """resume: keep what a stopped build in `out` finished (dataset, VAE phases, prepared
    items, training checkpoints) and do the rest."""
    from ..configs import DiTConfig, T5Config, VAEConfig, official_config_json
    from ..hub import DEFAULTS_FILE
    from ..models.t5 import UMT5Encoder
    from ..models.transformer import WanDiT
    from ..models.vae import WanVAE
    from safetensors.torch import load_file, save_file

    from ..tiny import portable_weights, write_tokenizer
    from ..training.vae import VAETrainConfig, train_vae
    from ..video import to_unit
    from . import shapes

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise ValueError(f"{out} is not empty: give a new folder (or resume)")
    s = settings
    times, report = {}, {"settings": asdict(s)}
    model = out / "model"
    model.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    if not (out / "data" / "metadata.csv").is_file():
        shapes.write_dataset(out / "data", clips_per_combination=s.clips_per_combination, count=s.clips, seed=s.seed,
                             size=s.size, frames=s.frames)
    times["dataset"] = time.perf_counter() - start

    start = time.perf_counter()
    write_tokenizer(model / "google" / "umt5-xxl", vocab=512, corpus=shapes.tokenizer_corpus())
    t5 = UMT5Encoder(T5Config(vocab=512, dim=s.t5_dim, dim_attn=s.t5_dim, dim_ffn=2 * s.t5_dim,
                              num_heads=4, num_layers=2))
    save_file(portable_weights(t5, f"{s.seed}/t5"), str(model / T5_FILE))
    times["text encoder"] = time.perf_counter() - start

    start = time.perf_counter()
    torch.manual_seed(s.seed)
    vae = WanVAE(VAEConfig(dim=s.vae_dim))
    phases = [VAETrainConfig(data=out / "data", output=out / f"vae-{k + 1}", steps=steps, batch_size=batch,
                             crop=min(crop, s.size), frames=min(frames, s.frames), lr=lr,
                             warmup_steps=min(50, steps // 4 + 1), from_scratch=k == 0, seed=s.seed + k,
                             still_weight=s.vae_still_weight if frames > 1 else 0.0)
              for k, (steps, crop, frames, batch, lr) in enumerate(s.vae_phases)]
    for config in phases:
        if resume and (config.output / "vae.safetensors").is_file():
            vae.load_state_dict(load_file(str(config.output / "vae.safetensors")))
        else:
            train_vae(vae, config, progress=progress)
    from ..training.vae import load_clips, standardize_latents

    every = load_clips(out / "data", s.frames, captions=True)
    clips = [(to_unit(c[: s.frames])[None], text) for c, text in every[:: max(1, len(every) // 24)][:24]]  # all colours
    standardize_latents(vae.eval(), [c for c, _ in clips])  # the DiT trains best on unit-variance latents
    # Shipped in bf16 like the DiT (the package budget is 20 MB; the fp32 VAE is 14 MB): measured
    # and saved as shipped, before `prepare`, so the DiT learns the latents of the shipped encoder.
    vae.to(torch.bfloat16).float()
    report["vae"] = round_trip(vae, clips[:12])
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    if report["vae"]["detector"]["agrees"] < s.vae_gate:
        raise RuntimeError(f"the trained VAE loses the shapes: the detector reads colour and motion from "
                           f"{report['vae']['detector']['agrees']:.0%} of round-tripped clips (needs {s.vae_gate:.0%}); "
                           f"see {out / 'report.json'} and the vae-*/vae-log.csv files")
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items()},
              str(model / VAE_FILE))
    times["vae"] = time.perf_counter() - start

    torch.manual_seed(s.seed)
    dit = WanDiT(DiTConfig(dim=s.dit_dim, ffn_dim=4 * s.dit_dim, num_heads=s.dit_heads, num_layers=s.dit_layers,
                           text_dim=s.t5_dim, text_len=s.text_len))
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(model / DIT_FILE))
    (model / "config.json").write_text(json.dumps(official_config_json(dit.config), indent=2), encoding="utf-8")
    (model / DEFAULTS_FILE).write_text(json.dumps(generation_defaults(s), indent=2), encoding="utf-8")

    start = time.perf_counter()
    prepare_data(out / "data", model, s, progress=progress)
    times["prepare"] = time.perf_counter() - start

    start = time.perf_counter()
    for k, (steps, lr, warmup, shift) in enumerate(s.dit_phases):
        run = out / ("run" if k == 0 else f"run-{k + 1}")
        if resume and (run / "model.safetensors").is_file():
            continue
        if k:  # the next phase starts from the last one's fp32 weights
            save_file(load_file(str(out / ("run" if k == 1 else f"run-{k}") / "model.safetensors")),
                      str(model / DIT_FILE))
        # a phase stopped before its first checkpoint is started again
        again = resume and any((run / "checkpoints").glob("step-*"))
        train_phase(out / "data", model, run, s, k, steps=steps, lr=lr, warmup=warmup, shift=shift, resume=again,
                    progress=progress)
    # Shipped in bf16 (as the official checkpoints are): half the bytes; measured as shipped below.
    trained = load_file(str(run / "model.safetensors"))
    save_file({name: v.to(torch.bfloat16) for name, v in trained.items()}, str(model / DIT_FILE))
    times["dit"] = time.perf_counter() - start

    start = time.perf_counter()
    report["accuracy"] = evaluate(model, s, progress=progress)
    times["evaluation"] = time.perf_counter() - start
    report["seconds"] = times
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


def prepare_data(data: Path, model: Path, s: BuildSettings, *, progress: bool = True) -> None:
    """`wanx prepare DATA --model MODEL --size SxS --frames F`: the clips' latents and captions'
    embeddings with the model's own VAE and umT5."""
    from ..hub import find_components
    from ..runtime import Runtime
    from ..training.data import FPS
    from ..training.prepare import prepare

    # fps as a float, as `wanx prepare` gives it: it is part of each item's recorded settings
    report = prepare(data, find_components(model), size=(s.size, s.size), frames=s.frames, fps=float(FPS),
                     runtime=Runtime.create(), progress=progress)
    empty = report.nothing_prepared()
    if empty:
        raise RuntimeError(f"prepare: {empty}")
    if progress:
        print(report.summary(), file=sys.stderr)


def train_phase(data: Path, model: Path, run: Path, s: BuildSettings, k: int, *, steps: int, lr: float, warmup: int,
                shift: float, resume: bool = False, progress: bool = True) -> Path:
    """DiT phase k (from 0): `wanx train --full` of the model folder's DiT, the first phase from
    Wan's random initialisation; the cosine schedule, a checkpoint half-way, caption dropout
    for guidance. `resume` continues a stopped phase; otherwise a previous one is replaced."""
    from .. import training
    from ..runtime import Runtime
    from ..training.recipe import TrainConfig

    config = TrainConfig(data=data, output=run, full=True, from_scratch=k == 0, steps=steps, batch_size=s.batch_size,
                         lr=lr, seed=s.seed + k, shift=shift, caption_dropout=0.1, lr_scheduler="cosine",
                         warmup_steps=warmup, save_every=max(1, steps // 2), resume=resume, overwrite=not resume)
    return training.run(config, Runtime.create(offload="none"), model=model, progress=progress)


@torch.no_grad()
def round_trip(vae, clips: list[tuple[torch.Tensor, str]]) -> dict:
    """Whole clips (`[1, 3, F, H, W]` in [-1, 1], caption) through the trained VAE: mean L1 and
    how often the detector still reads every attribute of the caption from the decoded clip."""
    from ..video import to_pixels
    from . import shapes

    l1, decoded = [], []
    for clip, text in clips:
        video = vae.decode(vae.encode(clip))
        l1.append(float((video - clip).abs().mean()))
        decoded.append((to_pixels(video[0]), text))
    # How far apart the latent frames of still plain clips are (in the latents' own std): the
    # DiT draws a latent that depends on the frame index itself badly (see `vae_still_weight`).
    drift = {}
    for name, level in (("black", -1.0), ("gray", 0.0)):
        z = vae.encode(torch.full_like(clips[0][0], level))[0]  # [C, T, H, W]
        drift[name] = [round(float((z[:, t] - z[:, 0]).abs().mean()), 3) for t in range(1, z.shape[1])]
    return {"l1": sum(l1) / len(l1), "detector": shapes.accuracy(decoded), "still_drift": drift}


def generation_defaults(s: BuildSettings) -> dict:
    """What `wanx generate --model demo` uses when not told otherwise: the size, length and
    sampling the model was made and measured with; the negative prompt is the empty text that
    caption dropout trained (the official Chinese one is outside its vocabulary)."""
    return {"width": s.size, "height": s.size, "num_frames": s.frames, "num_inference_steps": s.sample_steps,
            "guidance_scale": s.guidance, "shift": s.shift, "negative_prompt": ""}


def evaluation_prompts(count: int, seed: int) -> list[tuple[str, int]]:
    """Every held-out combination in both languages, then training combinations alternating
    English and Chinese; sampling seeds far from the training seeds."""
    from . import shapes

    prompts = [shapes.caption(c, lang) for c in shapes.HELD_OUT for lang in shapes.LANGUAGES]
    others = shapes.training_combinations()
    g = torch.Generator().manual_seed(seed + 1)
    for k, i in enumerate(torch.randperm(len(others), generator=g).tolist()):
        if len(prompts) >= count:
            break
        prompts.append(shapes.caption(others[i], shapes.LANGUAGES[k % 2]))
    return [(p, 10_000 + k) for k, p in enumerate(prompts[:count])]


def evaluate(model: Path, s: BuildSettings, *, progress: bool = True) -> dict:
    from ..pipeline import WanPipeline
    from . import shapes

    pipe = WanPipeline.from_pretrained(model, device="cpu")
    held = {shapes.caption(c, lang) for c in shapes.HELD_OUT for lang in shapes.LANGUAGES}
    results, held_results = [], []
    for prompt, seed in evaluation_prompts(s.eval_prompts, s.seed):
        video = pipe(prompt, seed=seed, progress=False)  # everything else: the folder's wanx-defaults.json
        (held_results if prompt in held else results).append((video.frames, prompt))
    every = shapes.accuracy(results + held_results)
    return {"all": every, "held_out": shapes.accuracy(held_results) if held_results else None,
            "prompts": len(results) + len(held_results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wanx.demo.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="a new folder for the dataset, the runs and the model")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks every stage in minutes")
    parser.add_argument("--ship", action="store_true",
                        help=f"then copy OUT/model over the package's demo model ({PACKAGE_MODEL})")
    parser.add_argument("--resume", action="store_true", help="finish a stopped build in OUT, keeping its stages")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.ship and args.quick:
        parser.error("--ship takes a real build, not --quick")
    report = build(Path(args.out), QUICK if args.quick else BuildSettings(), progress=not args.quiet,
                   resume=args.resume)
    print(json.dumps({"accuracy": report["accuracy"], "seconds": report["seconds"]}, indent=2, ensure_ascii=False))
    if args.ship:
        ship(Path(args.out))
        print(f"shipped to {PACKAGE_MODEL}")
    return 0


def ship(out: Path) -> None:
    """Replace the package's demo model with OUT/model and its report."""
    shutil.rmtree(PACKAGE_MODEL, ignore_errors=True)
    shutil.copytree(out / "model", PACKAGE_MODEL)
    shutil.copy(out / "report.json", PACKAGE_MODEL / "report.json")


if __name__ == "__main__":
    sys.exit(main())
