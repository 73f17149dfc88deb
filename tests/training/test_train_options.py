"""The options of `wanx train` beyond the basics, on the tiny model: TOML config, LR warmup and
cosine, batches per bucket with epochs and repeats, full fine-tuning, gaussian loss weight,
activation offload, block-streamed base, validation videos, I2V conditioning and caches made
with other encoders. Each test compares against an independent computation or a plain run."""

import csv
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.training.test_prepare import moving_square
from wanx.cli import main
from wanx.training import loss, trainable
from wanx.training.batches import CachedDataset, cached_items

SQUARES = [((255, 64, 32), "a red square"), ((32, 200, 64), "a green square"), ((40, 80, 250), "a blue square"),
           ((240, 240, 40), "a yellow square")]


def make_dataset(folder, clips=len(SQUARES)):
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["file_name,text"]
    for k, (color, caption) in enumerate(SQUARES[:clips]):
        moving_square(12, color=color, seed=k).save(folder / f"clip{k}.mp4")
        rows.append(f"clip{k}.mp4,{caption}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Four clips of one size: one bucket."""
    folder = make_dataset(tmp_path_factory.mktemp("data") / "t2v")
    assert main(["prepare", str(folder), "--model", "tiny", "--size", "64x48", "--frames", "9", "--quiet"]) == 0
    return folder


@pytest.fixture(scope="module")
def prepared_i2v(tmp_path_factory):
    folder = make_dataset(tmp_path_factory.mktemp("data") / "i2v", clips=2)
    assert main(["prepare", str(folder), "--model", "tiny-i2v", "--size", "64x48", "--frames", "9", "--quiet"]) == 0
    return folder


def train(data, output, *extra, model="tiny"):
    assert main(["train", "--data", str(data), "--model", model, "--output", str(output), "--lora-rank", "8",
                 "--quiet", *extra]) == 0


def log(output, column="loss"):
    with open(output / "log.csv", encoding="utf-8") as fh:
        return [float(row[column]) for row in csv.DictReader(fh)]


def assert_same_file(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def error_of(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("wanx: error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


# -- 1. --config ----------------------------------------------------------------------------


def test_toml_config_equals_flags_and_flags_win(prepared, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f'data = "{prepared.as_posix()}"\nmodel = "tiny"\noutput = "{(tmp_path / "toml").as_posix()}"\n'
                    'lora-rank = 4\nsteps = 3\ntargets = ["q", "ffn.0"]\nlr = 1e-2\nquiet = true\n', encoding="utf-8")
    assert main(["train", "--config", str(toml)]) == 0
    assert main(["train", "--data", str(prepared), "--model", "tiny", "--output", str(tmp_path / "flags"),
                 "--lora-rank", "4", "--steps", "3", "--targets", "q,ffn.0", "--lr", "1e-2", "--quiet"]) == 0
    assert_same_file(tmp_path / "toml" / "toml.safetensors", tmp_path / "flags" / "flags.safetensors")
    state = load_file(str(tmp_path / "toml" / "toml.safetensors"))
    modules = {re.sub(r"^diffusion_model\.blocks\.\d+\.|\.(lora_A\.weight|lora_B\.weight|alpha)$", "", k) for k in state}
    assert modules == {"self_attn.q", "cross_attn.q", "ffn.0"}
    assert state["diffusion_model.blocks.0.ffn.0.lora_A.weight"].shape[0] == 4

    assert main(["train", "--config", str(toml), "--steps", "2", "--output", str(tmp_path / "override")]) == 0
    assert len(log(tmp_path / "toml")) == 3 and len(log(tmp_path / "override")) == 2


def test_toml_config_errors(prepared, tmp_path, capsys):
    def config(line):
        settings = {"data": f'"{prepared.as_posix()}"', "model": '"tiny"', "output": f'"{tmp_path.as_posix()}/o"',
                    "steps": "1"}  # a wrongly accepted file trains for one step only
        key, value = line.split("=", 1)
        settings[key.strip()] = value.strip()
        path = tmp_path / "bad.toml"
        path.write_text("".join(f"{k} = {v}\n" if v else f"{k} =\n" for k, v in settings.items()), encoding="utf-8")
        return ["train", "--config", str(path)]

    assert "'lora-rnak'" in error_of(capsys, config("lora-rnak = 4"))
    assert "steps" in error_of(capsys, config('steps = "many"'))
    assert "full" in error_of(capsys, config("full = 3"))
    # values argparse itself would refuse on the command line are refused in the file too
    assert "lora-rank" in error_of(capsys, config("lora-rank = 2.5"))
    assert "model" in error_of(capsys, config("model = true"))
    assert "steps" in error_of(capsys, config("steps = true"))
    assert "lr-scheduler" in error_of(capsys, config('lr-scheduler = "linear"'))
    assert "not valid TOML" in error_of(capsys, config("steps = "))
    assert not (tmp_path / "o").exists()


# -- 2. LR schedule -------------------------------------------------------------------------


def test_warmup_then_cosine_and_resume_keeps_it(prepared, tmp_path):
    lr, warmup, steps = 1e-3, 2, 6
    schedule = ["--lr", str(lr), "--warmup-steps", str(warmup), "--lr-scheduler", "cosine", "--steps", str(steps),
                "--save-every", "3"]
    train(prepared, tmp_path / "straight", *schedule)
    # step s (from 0) runs at lr * (s+1)/(warmup+1) during warmup, then half a cosine over the rest
    expected = [lr * (s + 1) / (warmup + 1) if s < warmup
                else lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))) for s in range(steps)]
    assert log(tmp_path / "straight", "lr") == pytest.approx(expected, rel=1e-5)
    assert expected[warmup] == lr and expected[-1] < 0.2 * lr

    # a run stopped after its step-3 checkpoint: the same run without its last checkpoint and file
    shutil.copytree(tmp_path / "straight", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step-6")
    (tmp_path / "split" / "straight.safetensors").unlink()  # the copy's LoRA, named after its first folder
    train(prepared, tmp_path / "split", *schedule, "--resume")
    assert_same_file(tmp_path / "straight" / "straight.safetensors", tmp_path / "split" / "split.safetensors")
    assert log(tmp_path / "split", "lr") == log(tmp_path / "straight", "lr")
    assert log(tmp_path / "split") == log(tmp_path / "straight")


# -- 3. batches, epochs, repeats ------------------------------------------------------------


def test_batches_keep_one_shape_and_every_item(tmp_path):
    shapes = [(16, 3, 6, 8)] * 4 + [(16, 2, 4, 4)] * 2
    files = []
    for k, shape in enumerate(shapes):
        path = tmp_path / f"item{k}.safetensors"
        save_file({"latents": torch.full(shape, float(k)), "context": torch.ones(3 + k, 32)}, str(path))
        files.append(path)
    for repeats, per_epoch in ((1, 2 + 1), (2, 4 + 2)):
        dataset = CachedDataset(files, batch_size=2, repeats=repeats, seed=7)
        assert dataset.batches_per_epoch == per_epoch
        orders = []
        for epoch in range(3):
            batches = [dataset.batch(epoch * per_epoch + i) for i in range(per_epoch)]
            assert all(len({shapes[i] for i in b}) == 1 for b in batches), batches
            assert sorted(i for b in batches for i in b) == sorted(list(range(len(files))) * repeats)
            orders.append(batches)
        assert orders[0] != orders[1] or orders[1] != orders[2]  # a fresh order each epoch
    batch = dataset.load([1, 3], torch.device("cpu"))
    assert batch["x0"].shape == (2, 16, 3, 6, 8) and batch["x0"][1].eq(3).all()
    assert batch["context"].shape == (2, 6, 32)  # padded with zeros to the longest
    assert batch["context"][0, 4:].eq(0).all() and batch["context"][0, :4].eq(1).all()


def test_epochs_and_repeats_set_the_step_count(prepared, tmp_path):
    train(prepared, tmp_path / "one", "--batch-size", "2", "--epochs", "1")
    assert len(log(tmp_path / "one")) == 2  # 4 clips of one size, 2 a batch
    assert log(tmp_path / "one", "samples_per_s")[0] > 0
    train(prepared, tmp_path / "twice", "--batch-size", "2", "--epochs", "1", "--repeats", "2")
    assert len(log(tmp_path / "twice")) == 4
    train(prepared, tmp_path / "accum", "--batch-size", "2", "--epochs", "2", "--grad-accum", "2")
    assert len(log(tmp_path / "accum")) == 2  # 4 micro-batches, 2 per step


# -- 4. --full ------------------------------------------------------------------------------


def test_full_fine_tuning(prepared, tmp_path, capsys):
    import wanx
    from wanx.tiny import tiny_model_dir

    train(prepared, tmp_path / "full", "--full", "--steps", "2", "--lr", "1e-3")
    path = tmp_path / "full" / "model.safetensors"
    assert not (tmp_path / "full" / "full.safetensors").exists()
    base = wanx.load_model(tiny_model_dir("tiny")).state_dict()
    trained = load_file(str(path))
    assert trained.keys() == base.keys()
    unchanged = [k for k in base if torch.equal(trained[k], base[k])]
    assert not unchanged, unchanged  # every weight trained
    # written beside it: a width-32 DiT's head count cannot be told from shapes
    assert json.loads((path.parent / "config.json").read_text())["num_heads"] == 2
    loaded = wanx.load_model(path).state_dict()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)

    train(prepared, tmp_path / "full", "--full", "--steps", "3", "--lr", "1e-3", "--resume")
    assert len(log(tmp_path / "full")) == 3
    err = error_of(capsys, ["train", "--data", str(prepared), "--model", "tiny", "--output", str(tmp_path / "fp8"),
                            "--full", "--fp8", "--quiet"])
    assert "--fp8" in err


def test_full_with_int8_is_refused_in_one_line(prepared, tmp_path, capsys):
    err = error_of(capsys, ["train", "--data", str(prepared), "--model", "tiny", "--output", str(tmp_path / "int8"),
                            "--full", "--int8", "--quiet"])
    assert "--full trains every weight: drop --int8 (INT8 weights are frozen)" in err
    assert not (tmp_path / "int8").exists()  # refused before anything was made


def test_init_weights_is_wans_from_scratch_start():
    from wanx.configs import DiTConfig
    from wanx.models.transformer import WanDiT

    cfg = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, text_len=8)
    a, b = WanDiT(cfg), WanDiT(cfg)  # two different default inits
    trainable.init_weights(a, torch.Generator().manual_seed(3))
    with torch.no_grad():  # as if b were loaded from a trained checkpoint
        b.blocks[0].norm3.weight.fill_(3.0)
        b.blocks[0].self_attn.norm_q.weight.fill_(3.0)
    trainable.init_weights(b, torch.Generator().manual_seed(3))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name  # nothing loaded leaks into the start, norms included
    assert not a.head.head.weight.any() and not a.blocks[0].self_attn.q.bias.any()
    bound = math.sqrt(6 / (32 + 32))  # Xavier-uniform q: fan_in = fan_out = dim
    q = a.blocks[0].self_attn.q.weight
    assert q.abs().max() <= bound and q.abs().max() > 0.9 * bound
    assert abs(float(a.text_embedding[0].weight.detach().std()) - 0.02) < 0.004
    # a zero output layer: the untrained model predicts zero velocity, so the first loss is E|eps - x0|^2
    x = torch.randn(1, 16, 2, 4, 4)
    assert not a(x, torch.tensor([500.0]), torch.randn(1, 8, 16)).any()
    flf2v = WanDiT(DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=1, text_dim=16, text_len=8, in_dim=36,
                             model_type="flf2v", image_dim=24))
    trainable.init_weights(flf2v, torch.Generator())  # a rule for every parameter of every variant
    assert not flf2v.img_emb.emb_pos.any()


def test_from_scratch_ignores_the_loaded_weights(prepared, tmp_path, capsys):
    train(prepared, tmp_path / "a", "--full", "--from-scratch", "--steps", "1", "--lr", "1e-12")
    first = log(tmp_path / "a")[0]
    train(prepared, tmp_path / "b", "--full", "--steps", "1", "--lr", "1e-12")
    trained, base = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert trained["head.head.weight"].abs().max() < 1e-9 < base["head.head.weight"].abs().max()  # one step of 1e-12
    # predicting zero: the loss is the mean squared velocity target, near 2 for unit latents and noise
    assert first != log(tmp_path / "b")[0]
    err = error_of(capsys, ["train", "--data", str(prepared), "--model", "tiny", "--output", str(tmp_path / "c"),
                            "--from-scratch", "--quiet"])
    assert "--full" in err


# -- 5. gaussian weighting ------------------------------------------------------------------


def test_gaussian_weight():
    shift = 5.0
    t = torch.linspace(1, 0, 1001)[:-1]
    grid = shift * t / (1 + (shift - 1) * t)
    weights = loss.gaussian_weight(grid, shift)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert weights.min().item() == pytest.approx(0.0, abs=1e-6)
    curve = torch.exp(-2 * ((1000 * grid.double() - 500) / 1000) ** 2)
    expected = (curve - curve.min()) / (curve - curve.min()).mean()
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-6)
    sigmas = torch.linspace(0, 1, 101)
    w = loss.gaussian_weight(sigmas, shift)
    assert w.argmax().item() == 50 and w[50] > w[10] and w[50] > w[90]


def test_gaussian_weighting_scales_the_loss(prepared, tmp_path):
    train(prepared, tmp_path / "plain", "--steps", "2", "--lr", "1e-2")
    train(prepared, tmp_path / "gauss", "--steps", "2", "--lr", "1e-2", "--weighting", "gaussian")
    plain, gauss = log(tmp_path / "plain"), log(tmp_path / "gauss")
    assert plain != gauss
    # step 1: the same untouched model, timestep and noise; only the weight of its sigma differs
    generator = torch.Generator().manual_seed(0)
    sigma = loss.sample_sigma(generator, 5.0)
    assert gauss[0] == pytest.approx(plain[0] * loss.gaussian_weight(sigma, 5.0).item(), rel=1e-4)


# -- 6, 7. memory options train the same LoRA ----------------------------------------------


def assert_close_files(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def plain_run(prepared, tmp_path_factory):
    output = tmp_path_factory.mktemp("plain")
    train(prepared, output, "--steps", "3", "--lr", "1e-2")
    return output


def test_activation_offload_trains_the_same_lora(prepared, plain_run, tmp_path, capsys):
    train(prepared, tmp_path / "offload", "--steps", "3", "--lr", "1e-2", "--gradient-checkpointing",
          "--offload-activations")
    assert_close_files(plain_run / f"{plain_run.name}.safetensors", tmp_path / "offload" / "offload.safetensors")
    err = error_of(capsys, ["train", "--data", str(prepared), "--model", "tiny", "--output", str(tmp_path / "o"),
                            "--offload-activations", "--quiet"])
    assert "--gradient-checkpointing" in err


@pytest.mark.parametrize("checkpointing", [False, True])
def test_streamed_base_trains_the_same_lora(prepared, plain_run, tmp_path, checkpointing, monkeypatch):
    from wanx.memory import placement, streaming

    streamers = []

    class Recorded(streaming.BlockStreamer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            streamers.append(self)

    monkeypatch.setattr(placement, "BlockStreamer", Recorded)  # training streams through runtime.apply's placement
    extra = ["--gradient-checkpointing"] if checkpointing else []
    train(prepared, tmp_path / "streamed", "--steps", "3", "--lr", "1e-2", "--device", "cpu", "--offload", "blocks",
          "--vram-budget", "0", *extra)
    assert_close_files(plain_run / f"{plain_run.name}.safetensors", tmp_path / "streamed" / "streamed.safetensors")
    assert log(tmp_path / "streamed") == pytest.approx(log(plain_run), rel=1e-5)
    stats = streamers[0].stats  # the blocks really were copied in and dropped, not left resident
    assert len(streamers) == 1 and stats.resident == 0 and stats.streamed > 0 and stats.moved_bytes > 0


def test_streamed_base_without_a_budget_keeps_every_block_on_a_cpu(prepared, plain_run, tmp_path, monkeypatch):
    """--offload blocks without --vram-budget: an automatic budget (it was a TypeError, issue
    27). On a CPU host and device are one memory, so the budget keeps every block resident."""
    from wanx.memory import placement, streaming

    streamers = []

    class Recorded(streaming.BlockStreamer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            streamers.append(self)

    monkeypatch.setattr(placement, "BlockStreamer", Recorded)
    train(prepared, tmp_path / "auto", "--steps", "3", "--lr", "1e-2", "--device", "cpu", "--offload", "blocks")
    assert_close_files(plain_run / f"{plain_run.name}.safetensors", tmp_path / "auto" / "auto.safetensors")
    stats = streamers[0].stats
    assert len(streamers) == 1 and stats.streamed == 0 and stats.resident > 0 and stats.moved_bytes == 0


def test_training_work_follows_the_settings(tmp_path):
    """The automatic budget of a streamed DiT on a GPU is its free memory less this: more for a
    larger batch, less with gradient checkpointing (less again with the kept inputs in host
    memory), the optimizer state on top with --full."""
    from wanx.configs import DiTConfig
    from wanx.training.recipe import TrainConfig
    from wanx.training.run import training_work

    item = tmp_path / "item.safetensors"
    save_file({"latents": torch.zeros(16, 3, 6, 8)}, str(item))
    dit = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32, text_len=16)

    def work(**options):
        return training_work(dit, TrainConfig(data=tmp_path, output=tmp_path, **options), [item])

    plain = work()
    assert work(batch_size=2) > plain > work(gradient_checkpointing=True) \
        > work(gradient_checkpointing=True, offload_activations=True) > 0
    assert work(full=True) > plain


# -- 8. validation videos ------------------------------------------------------------------


def test_validation_videos_leave_training_alone(prepared, tmp_path):
    from wanx.video import read_video

    common = ["--steps", "4", "--lr", "1e-2", "--gradient-checkpointing"]
    train(prepared, tmp_path / "validated", *common, "--validation-prompts", "a red square|a blue sky",
          "--validate-every", "2", "--validation-size", "64x48", "--validation-frames", "5", "--validation-steps", "2")
    train(prepared, tmp_path / "plain", *common)
    for step in (2, 4):
        folder = tmp_path / "validated" / "validation" / f"step-{step}"
        assert sorted(p.name for p in folder.iterdir()) == ["0.mp4", "1.mp4"]
        for name in ("0.mp4", "1.mp4"):
            video = read_video(folder / name)
            assert len(video.frames) == 5 and video.frames.shape[1:3] == (48, 64)
    assert not (tmp_path / "validated" / "validation" / "step-1").exists()
    # the LoRA being trained is live in validation: the same prompt and seed change with it
    early, late = (read_video(tmp_path / "validated" / "validation" / f"step-{n}" / "0.mp4").frames for n in (2, 4))
    assert not np.array_equal(early, late)
    assert_same_file(tmp_path / "plain" / "plain.safetensors", tmp_path / "validated" / "validated.safetensors")
    assert log(tmp_path / "plain") == log(tmp_path / "validated")


# -- 9, 10. conditioning and encoders of the cache ------------------------------------------


def test_i2v_cache_and_training(prepared_i2v, tmp_path):
    import wanx
    from wanx.tiny import tiny_model_dir

    image_dim = wanx.load_model(tiny_model_dir("tiny-i2v")).config.image_dim
    files = cached_items(prepared_i2v)
    assert len(files) == 2
    with safe_open(str(files[0]), framework="pt") as fh:
        assert tuple(fh.get_tensor("latents").shape) == (16, 3, 6, 8)
        y = fh.get_tensor("y")
        assert tuple(y.shape) == (20, 3, 6, 8)  # 4 mask channels + the 16 of the encoded first frame
        assert tuple(fh.get_tensor("clip_features").shape) == (257, image_dim)
        assert torch.isfinite(y).all()
    train(prepared_i2v, tmp_path / "i2v", "--steps", "2", "--lr", "1e-2", model="tiny-i2v")
    losses = log(tmp_path / "i2v")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert len(load_file(str(tmp_path / "i2v" / "i2v.safetensors"))) == 2 * 10 * 3


def test_cache_of_another_model_stops_training(prepared, prepared_i2v, tmp_path, capsys):
    for data, model in ((prepared_i2v, "tiny"), (prepared, "tiny-i2v")):
        err = error_of(capsys, ["train", "--data", str(data), "--model", model, "--output", str(tmp_path / model),
                                "--quiet"])
        assert "wanx prepare" in err and "image conditioning" in err
        assert not (tmp_path / model).exists()

    cache = tmp_path / "cache"
    shutil.copytree(prepared / ".wanx-cache", cache)
    last = cached_items(cache)[-1]  # every item is checked, not just the first
    with safe_open(str(last), framework="pt") as fh:
        metadata, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    settings = json.loads(metadata["settings"])
    settings["model"] = "Wan2.1_VAE.pth:1;models_t5_umt5-xxl-enc-bf16.pth:2"
    metadata["settings"] = json.dumps(settings, sort_keys=True)
    save_file(tensors, str(last), metadata=metadata)
    err = error_of(capsys, ["train", "--data", str(cache), "--model", "tiny", "--output", str(tmp_path / "o"), "--quiet"])
    assert "other encoders" in err and "wanx prepare" in err
