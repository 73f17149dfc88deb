"""Training does what it is for, measured on a model wide enough to learn a clip: the tiny
DiT's width (32) is below the 64 latent values of a patch, so here the DiT is 128 wide
(random weights, the tiny VAE and umT5). Fine-tuning on one clip halves the loss, and a LoRA
trained on it moves what the model generates toward that clip."""

import csv
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.training.test_prepare import moving_square
from wanx.cli import main


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A model folder: the tiny set with a 128-wide DiT, and one clip prepared with it."""
    from wanx.configs import DiTConfig, official_config_json
    from wanx.models.transformer import WanDiT
    from wanx.tiny import _write_json, tiny_model_dir

    root = tmp_path_factory.mktemp("wide")
    model = root / "model"
    shutil.copytree(tiny_model_dir("tiny"), model)
    (model / "wanx-tiny.json").unlink()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dit = WanDiT(DiTConfig(dim=128, ffn_dim=256, num_heads=4, num_layers=2, text_dim=32))
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(model / "diffusion_pytorch_model.safetensors"))
    _write_json(model / "config.json", official_config_json(dit.config))
    data = root / "data"
    data.mkdir()
    moving_square(12).save(data / "clip.mp4")
    (data / "metadata.csv").write_text("file_name,text\nclip.mp4,a red square moves right\n", encoding="utf-8")
    assert main(["prepare", str(data), "--model", str(model), "--size", "64x48", "--frames", "9", "--quiet"]) == 0
    return model, data


def losses(output):
    with open(output / "log.csv", encoding="utf-8") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def test_fine_tuning_halves_the_loss_on_one_clip(wide, tmp_path):
    model, data = wide
    assert main(["train", "--data", str(data), "--model", str(model), "--output", str(tmp_path), "--full",
                 "--steps", "40", "--lr", "3e-3", "--quiet"]) == 0
    history = losses(tmp_path)
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.5 * first, (first, last)  # measured 1.26 -> 0.44


def test_a_trained_lora_moves_generation_toward_the_clip(wide, tmp_path):
    from wanx.pipeline import WanPipeline
    from wanx.training.batches import cached_items

    model, data = wide
    assert main(["train", "--data", str(data), "--model", str(model), "--output", str(tmp_path), "--steps", "60",
                 "--lr", "1e-2", "--lora-rank", "16", "--quiet"]) == 0
    clip = load_file(str(cached_items(data)[0]))["latents"]
    pipe = WanPipeline.from_pretrained(model)
    request = dict(prompt="a red square moves right", width=64, height=48, num_frames=9, num_inference_steps=10,
                   guidance_scale=1.0, output_type="latents")
    distances = []
    for lora in (None, tmp_path / f"{tmp_path.name}.safetensors"):
        if lora:
            pipe.load_lora(lora)
        runs = [pipe(seed=seed, **request).reshape(clip.shape) for seed in range(3)]
        distances.append(sum(float((run - clip).pow(2).mean()) for run in runs) / len(runs))
    without, with_lora = distances
    assert with_lora < 0.8 * without, distances  # measured 1.54 -> 1.04 (mean squared distance)
