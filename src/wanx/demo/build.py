"""Build the demo model from nothing, with wanx's own tools, and measure it:

1. the shapes dataset (`wanx.demo.shapes.write_dataset`): mp4 clips + metadata.csv;
2. a tokenizer built from every caption (English and Chinese) and a small umT5, random and frozen;
3. a small Wan VAE trained from scratch on crops of the clips (`wanx.training.vae`);
4. `wanx prepare` (latents and text embeddings with that VAE and umT5), then
   `wanx train --full` of a small DiT from random weights;
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
    clips_per_combination: int = 2
    clips: int | None = None  # instead: this many clips in all (quick builds)
    vae_dim: int = 16
    vae_steps: int = 1200
    t5_dim: int = 64
    dit_dim: int = 256
    dit_layers: int = 4
    dit_heads: int = 4
    text_len: int = 32  # captions are under 32 tokens; 512 would double the cost of a training step
    dit_steps: int = 4000
    batch_size: int = 8
    lr: float = 3e-4
    shift: float = 3.0  # 180 latent tokens: less shift than 480P's 5, the same in training and sampling
    sample_steps: int = 20
    guidance: float = 4.0
    eval_prompts: int = 40
    seed: int = 0


QUICK = BuildSettings(size=32, frames=5, clips_per_combination=1, clips=12, vae_dim=8, vae_steps=5, dit_dim=64, dit_layers=2,
                      dit_heads=2, dit_steps=5, batch_size=2, sample_steps=3, eval_prompts=4)


def build(out: Path, settings: BuildSettings, *, progress: bool = True) -> dict:
    from ..cli import main as wanx
    from ..configs import DiTConfig, T5Config, VAEConfig, official_config_json
    from ..models.t5 import UMT5Encoder
    from ..models.transformer import WanDiT
    from ..models.vae import WanVAE
    from ..tiny import portable_weights, save_pth, write_tokenizer
    from ..training.vae import VAETrainConfig, train_vae
    from . import shapes

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: give a new folder")
    s = settings
    times, report = {}, {"settings": asdict(s)}
    model = out / "model"
    model.mkdir(parents=True)

    start = time.perf_counter()
    shapes.write_dataset(out / "data", clips_per_combination=s.clips_per_combination, count=s.clips, seed=s.seed,
                         size=s.size, frames=s.frames)
    times["dataset"] = time.perf_counter() - start

    start = time.perf_counter()
    corpus = [shapes.caption(a, lang) for a in shapes.all_combinations() for lang in shapes.LANGUAGES]
    write_tokenizer(model / "google" / "umt5-xxl", vocab=512, corpus=corpus)  # every piece of every caption
    t5 = UMT5Encoder(T5Config(vocab=512, dim=s.t5_dim, dim_attn=s.t5_dim, dim_ffn=2 * s.t5_dim,
                              num_heads=4, num_layers=2))
    save_pth(portable_weights(t5, f"{s.seed}/t5"), model / "models_t5_umt5-xxl-enc-bf16.pth")
    times["text encoder"] = time.perf_counter() - start

    start = time.perf_counter()
    torch.manual_seed(s.seed)
    vae = WanVAE(VAEConfig(dim=s.vae_dim))
    train_vae(vae, VAETrainConfig(data=out / "data", output=out / "vae", steps=s.vae_steps, batch_size=4,
                                  crop=min(32, s.size), frames=5, seed=s.seed), progress=progress)
    from ..training.vae import load_clips, standardize_latents

    clips = load_clips(out / "data", s.frames)[:24]  # the DiT trains best on unit-variance latents
    standardize_latents(vae.eval(), [torch.from_numpy(c[: s.frames]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
                                     for c in clips])
    save_pth({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, model / "Wan2.1_VAE.pth")
    times["vae"] = time.perf_counter() - start

    torch.manual_seed(s.seed)
    dit = WanDiT(DiTConfig(dim=s.dit_dim, ffn_dim=4 * s.dit_dim, num_heads=s.dit_heads, num_layers=s.dit_layers,
                           text_dim=s.t5_dim, text_len=s.text_len))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(model / "diffusion_pytorch_model.safetensors"))
    (model / "config.json").write_text(json.dumps(official_config_json(dit.config), indent=2), encoding="utf-8")

    quiet = [] if progress else ["--quiet"]
    start = time.perf_counter()
    if wanx(["prepare", str(out / "data"), "--model", str(model), "--size", f"{s.size}x{s.size}", "--frames",
             str(s.frames), *quiet]) != 0:
        raise RuntimeError("wanx prepare failed")
    times["prepare"] = time.perf_counter() - start

    start = time.perf_counter()
    if wanx(["train", "--data", str(out / "data"), "--model", str(model), "--output", str(out / "run"), "--full",
             "--steps", str(s.dit_steps), "--batch-size", str(s.batch_size), "--lr", str(s.lr), "--seed", str(s.seed),
             "--shift", str(s.shift),
             "--caption-dropout", "0.1", "--lr-scheduler", "cosine", "--warmup-steps", str(min(200, s.dit_steps // 10)), "--save-every",
             str(max(1, s.dit_steps // 4)), *quiet]) != 0:
        raise RuntimeError("wanx train failed")
    shutil.copy(out / "run" / "model.safetensors", model / "diffusion_pytorch_model.safetensors")
    times["dit"] = time.perf_counter() - start

    start = time.perf_counter()
    report["accuracy"] = evaluate(model, s, progress=progress)
    times["evaluation"] = time.perf_counter() - start
    report["seconds"] = times
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


def evaluation_prompts(count: int, seed: int) -> list[tuple[str, int]]:
    """Every held-out combination, then training combinations, alternating English and
    Chinese; sampling seeds far from the training seeds."""
    from . import shapes

    combos = list(shapes.HELD_OUT)
    others = shapes.training_combinations()
    g = torch.Generator().manual_seed(seed + 1)
    for i in torch.randperm(len(others), generator=g).tolist():
        if len(combos) >= count:
            break
        combos.append(others[i])
    return [(shapes.caption(c, shapes.LANGUAGES[k % 2]), 10_000 + k) for k, c in enumerate(combos[:count])]


def evaluate(model: Path, s: BuildSettings, *, progress: bool = True) -> dict:
    from ..pipeline import WanPipeline
    from . import shapes

    pipe = WanPipeline.from_pretrained(model, device="cpu")
    null = torch.zeros(1, 1, pipe.dit.config.text_dim)  # the empty text the DiT was trained with (caption dropout)
    held = {shapes.caption(c, lang) for c in shapes.HELD_OUT for lang in shapes.LANGUAGES}
    results, held_results = [], []
    for prompt, seed in evaluation_prompts(s.eval_prompts, s.seed):
        video = pipe(prompt, negative_prompt_embeds=null, width=s.size, height=s.size, num_frames=s.frames,
                     num_inference_steps=s.sample_steps, guidance_scale=s.guidance, shift=s.shift, seed=seed, progress=False)
        (held_results if prompt in held else results).append((video.frames, prompt))
    every = shapes.accuracy(results + held_results)
    return {"all": every, "held_out": shapes.accuracy(held_results) if held_results else None,
            "prompts": len(results) + len(held_results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wanx.demo.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="a new folder for the dataset, the runs and the model")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks every stage in minutes")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    report = build(Path(args.out), QUICK if args.quick else BuildSettings(), progress=not args.quiet)
    print(json.dumps({"accuracy": report["accuracy"], "seconds": report["seconds"]}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
