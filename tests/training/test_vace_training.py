"""LoRA training on a VACE model (`tiny-vace`): `wanx prepare` caches each item's VACE context
(control video, mask, reference images; the metadata.csv columns control_video, mask,
reference_images) beside its latents, `wanx train` feeds it to the DiT with the reference
latent frames in front of the clip's and the loss on the clip's frames alone, and bad VACE
columns stop `prepare` in one line before anything is encoded."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tests.training.test_prepare import moving_square
from wanx.cli import main
from wanx.lora import read_lora

PREPARE = ["--size", "64x48", "--frames", "9", "--quiet"]


def mask_image(path, size=(64, 48), box=(16, 12, 48, 36)):
    """White (generate) inside `box`, black elsewhere."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[box[1]:box[3], box[0]:box[2]] = 255
    Image.fromarray(pixels).save(path)


def write_dataset(folder, rows):
    folder.mkdir(exist_ok=True)
    moving_square(20).save(folder / "red.mp4")
    moving_square(20, color=(32, 200, 64), seed=1).save(folder / "green.mp4")
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two items: an inpainting one (control video and mask image at twice the clip's resolution)
    and a reference one (control video, two reference images of other sizes)."""
    folder = tmp_path_factory.mktemp("vace")
    folder.mkdir(exist_ok=True)
    moving_square(20, height=96, width=128, seed=3).save(folder / "red-control.mp4")
    moving_square(20, color=(90, 90, 90), seed=4).save(folder / "green-control.mp4")
    mask_image(folder / "red-mask.png", size=(128, 96), box=(32, 24, 96, 72))  # resized as the clip: stays sharp
    Image.fromarray(np.full((40, 30, 3), 200, dtype=np.uint8)).save(folder / "ref1.png")
    Image.fromarray(np.full((20, 50, 3), 60, dtype=np.uint8)).save(folder / "ref2.png")
    write_dataset(folder, [["file_name", "text", "control_video", "mask", "reference_images"],
                           ["red.mp4", "a red square", "red-control.mp4", "red-mask.png", ""],
                           ["green.mp4", "a green square", "green-control.mp4", "", "ref1.png|ref2.png"]])
    assert main(["prepare", str(folder), "--model", "tiny-vace", *PREPARE]) == 0
    return folder


def cached(folder, stem):
    path = next(p for p in (folder / ".wanx-cache").glob(f"{stem}-*.safetensors"))
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


def test_prepare_caches_the_vace_context(dataset):
    """[96, R + F', h, w] beside the latents: 9 frames are 3 latent frames of 6x8; the reference
    item has its 2 reference frames in front, their reactive half and mask channels zero; the
    mask channels of the inpainting item are its mask folded 8x8 (the box covers latent rows
    1.5..4.5, columns 2..6)."""
    red, _ = cached(dataset, "red")
    green, meta = cached(dataset, "green")
    assert tuple(red["latents"].shape) == tuple(green["latents"].shape) == (16, 3, 6, 8)
    assert tuple(red["vace_context"].shape) == (96, 3, 6, 8)
    assert tuple(green["vace_context"].shape) == (96, 5, 6, 8)
    assert torch.isfinite(green["vace_context"]).all()
    refs = green["vace_context"][:, :2]
    assert refs[16:].abs().max() == 0 and refs[:16].abs().max() > 0
    assert (green["vace_context"][32:, 2:] == 1).all()  # no mask: every pixel to make
    folded = red["vace_context"][32:]
    expected = torch.zeros(48, 64)
    expected[12:36, 16:48] = 1
    expected = expected.view(6, 8, 8, 8).permute(1, 3, 0, 2).reshape(64, 6, 8)
    assert torch.equal(folded, expected[:, None].expand(64, 3, 6, 8))
    assert '"conditioning": "vace"' in meta["settings"]


def test_the_reference_latents_match_the_generation_and_the_loss_skips_them(dataset):
    """The VACE context of an item equals what the VACE task builds for the same inputs at
    generation (its own `encode_frames`/`encode_masks`); in the loss the reference frames are in
    front, and a prediction changed there does not change the loss."""
    from wanx.pipeline import WanPipeline
    from wanx.pipeline.conditioning.base import image_tensor
    from wanx.pipeline.conditioning.vace import encode_frames, encode_masks, reference_canvas
    from wanx.training.batches import CachedDataset, cached_items
    from wanx.training.loss import flow_matching_loss
    from wanx.training.recipe import TrainConfig
    from wanx.video import read_video, to_unit

    green, _ = cached(dataset, "green")
    vae = WanPipeline.from_pretrained("tiny-vace", device="cpu").vae
    frames = to_unit(read_video(dataset / "green-control.mp4").frames[:9])
    mask = torch.ones(1, 9, 48, 64)
    refs = [reference_canvas(image_tensor(dataset / n), 48, 64) for n in ("ref1.png", "ref2.png")]
    with torch.no_grad():
        context = torch.cat([encode_frames(vae, frames, mask, refs), encode_masks(mask, 2, 4, 8)])
    torch.testing.assert_close(green["vace_context"], context, rtol=1e-5, atol=1e-5)

    data = CachedDataset(cached_items(dataset))
    index = next(i for i, f in enumerate(data.files) if f.name.startswith("green"))
    batch = data.load([index], torch.device("cpu"))
    assert tuple(batch["vace_context"].shape) == (1, 96, 5, 6, 8) and tuple(batch["x0"].shape) == (1, 16, 3, 6, 8)

    from wanx.hub import find_components, resolve_model
    from wanx.loading import load_model

    dit = load_model(find_components(resolve_model("tiny-vace")).dit, dtype=torch.float32, device="cpu")
    seen = {}

    class Spoiled(torch.nn.Module):  # the real DiT, its prediction on the reference frames replaced
        def forward(self, x, t, context, **extra):
            seen["x"], seen["extra"] = x, extra
            out = dit(x, t, context, **extra).clone()
            out[:, :, :2] = 1e6
            return out

    config = TrainConfig(data=dataset, output=dataset / "unused")
    plain = flow_matching_loss(dit, batch, config, torch.Generator().manual_seed(0))
    spoiled = flow_matching_loss(Spoiled(), batch, config, torch.Generator().manual_seed(0))
    assert torch.isfinite(plain) and torch.equal(plain, spoiled)
    assert tuple(seen["x"].shape) == (1, 16, 5, 6, 8) and seen["extra"]["vace_context"] is not None


def train(data, output, *extra):
    assert main(["train", "--data", str(data), "--model", "tiny-vace", "--output", str(output), "--lora-rank", "4",
                 "--steps", "2", "--quiet", *extra]) == 0
    with open(output / "log.csv", encoding="utf-8") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def test_train_feeds_the_vace_context_and_adapts_the_blocks_asked(dataset, tmp_path, capsys):
    """2 steps (one item each): finite losses; the LoRA on the main blocks by default, on the
    VACE blocks too with --lora-blocks both (tiny-vace: 2 blocks, 2 VACE blocks, 10 layers each: q, k, v, o of both attentions, ffn.0, ffn.2)."""
    losses = train(dataset, tmp_path / "main")
    assert len(losses) == 2 and all(np.isfinite(losses))
    lora = read_lora(tmp_path / "main" / "main.safetensors")
    assert len(lora.modules) == 2 * 10 and all(m.startswith("blocks.") for m in lora.modules)

    train(dataset, tmp_path / "both", "--lora-blocks", "both")
    state = load_file(str(tmp_path / "both" / "both.safetensors"))
    names = {k.rsplit(".lora_", 1)[0] for k in state if ".lora_A." in k}
    assert len(names) == 4 * 10 and "diffusion_model.vace_blocks.1.ffn.2" in names
    from wanx.pipeline import WanPipeline

    report = WanPipeline.from_pretrained("tiny-vace").load_lora(tmp_path / "both" / "both.safetensors")
    assert report.matched == 40

    assert main(["train", "--data", str(dataset), "--model", "tiny-vace", "--output", str(tmp_path / "both"),
                 "--lora-blocks", "vace", "--steps", "3", "--lora-rank", "4", "--resume", "--quiet"]) == 2
    assert "trained with --lora-blocks both" in capsys.readouterr().err


def test_a_vace_cache_needs_a_vace_model(dataset, tmp_path, capsys):
    assert main(["train", "--data", str(dataset), "--model", "tiny", "--output", str(tmp_path / "run"),
                 "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "run `wanx prepare` again with this --model" in err and len(err.splitlines()) == 1
    assert main(["train", "--data", str(dataset), "--model", "tiny", "--output", str(tmp_path / "run"),
                 "--lora-blocks", "vace", "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()  # the cache's mismatch is said first: both are wrong here
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("row, model, message", [
    (["red.mp4", "a", "missing.mp4", "", ""], "tiny-vace", "metadata.csv line 2 (red.mp4): control_video: no such file missing.mp4"),
    (["red.mp4", "a", "short.mp4", "", ""], "tiny-vace", "control_video short.mp4 has 5 frames at 16 fps; the clip is "
                                                         "trained on 9"),
    (["red.mp4", "a", "green.mp4", "wide.png", ""], "tiny-vace", "mask wide.png is 64x32, the clip 64x48"),
    (["red.mp4", "a", "green.mp4", "", "ref.png|"], "tiny-vace", "reference_images: an empty name"),
    (["red.mp4", "a", "", "wide.png", ""], "tiny-vace", "mask marks what to generate in control_video"),
    (["red.mp4", "a", "green.mp4", "", ""], "tiny", "need a VACE model"),
    (["red.mp4", "a", "", "", ""], "tiny-vace", "a VACE model trains on control videos or reference images"),
])
def test_bad_vace_columns_stop_prepare_in_one_line(tmp_path, capsys, row, model, message):
    folder = write_dataset(tmp_path / "data", [["file_name", "text", "control_video", "mask", "reference_images"], row])
    moving_square(5).save(folder / "short.mp4")
    mask_image(folder / "wide.png", size=(64, 32), box=(0, 0, 8, 8))
    Image.fromarray(np.full((8, 8, 3), 9, dtype=np.uint8)).save(folder / "ref.png")
    assert main(["prepare", str(folder), "--model", model, *PREPARE]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (folder / ".wanx-cache").exists()  # stopped before anything was written


def test_a_vace_model_needs_every_item_conditioned(tmp_path, capsys):
    folder = write_dataset(tmp_path / "data", [["file_name", "text", "control_video"], ["red.mp4", "a", "green.mp4"],
                                               ["green.mp4", "b", ""]])
    assert main(["prepare", str(folder), "--model", "tiny-vace", *PREPARE]) == 2
    err = capsys.readouterr().err.strip()
    assert "line 3 (green.mp4): no control_video or reference_images" in err and len(err.splitlines()) == 1


def test_vace_blocks_need_a_vace_model(tmp_path, capsys):
    folder = write_dataset(tmp_path / "data", [["file_name", "text"], ["red.mp4", "a red square"]])
    assert main(["prepare", str(folder), "--model", "tiny", *PREPARE]) == 0
    assert main(["train", "--data", str(folder), "--model", "tiny", "--output", str(tmp_path / "run"),
                 "--lora-blocks", "vace", "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--lora-blocks vace|both trains a VACE model's VACE blocks; this model has none" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_vace_block_lora_in_diffusers_keys_loads_back(dataset, tmp_path):
    """VACE blocks' layers in diffusers/PEFT keys (`transformer.vace_blocks.N.proj_out` for the
    official after_proj) are read back onto the same layers."""
    train(dataset, tmp_path / "d", "--lora-blocks", "vace", "--targets", "q,after_proj", "--lora-format", "diffusers")
    keys = load_file(str(tmp_path / "d" / "d.safetensors")).keys()
    assert "transformer.vace_blocks.1.proj_out.lora_A.weight" in keys and not any(".blocks." in k for k in keys)
    from wanx.pipeline import WanPipeline

    report = WanPipeline.from_pretrained("tiny-vace").load_lora(tmp_path / "d" / "d.safetensors")
    assert report.matched == 2 * 3  # 2 VACE blocks: self_attn.q, cross_attn.q, after_proj
