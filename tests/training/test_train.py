"""`wanx train` on a tiny model: the loss falls on an overfitted clip, the LoRA file is in the
official format and loads back, a resumed run is bit-identical to a straight one, and bad
input stops before training."""

import csv

import pytest
import torch
from safetensors.torch import load_file

from tests.training.test_prepare import moving_square
from wanx.cli import main
from wanx.lora import read_lora


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    moving_square(12).save(folder / "clip.mp4")
    (folder / "metadata.csv").write_text("file_name,text\nclip.mp4,a red square moves right\n", encoding="utf-8")
    assert main(["prepare", str(folder), "--model", "tiny", "--size", "64x48", "--frames", "9", "--quiet"]) == 0
    return folder


def train(data, output, *extra):
    assert main(["train", "--data", str(data), "--model", "tiny", "--output", str(output), "--lora-rank", "8",
                 "--quiet", *extra]) == 0


def losses(output):
    with open(output / "log.csv", encoding="utf-8") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def test_loss_falls_and_the_lora_loads(prepared, tmp_path):
    """On one clip the loss falls by a fifth (measured 1.38 -> 1.08 over 150 steps at this lr).
    It cannot fall to half on the tiny model: its width, 32, is below the 64 latent values of a
    patch, so the frozen patch embedding loses the information a perfect fit would need."""
    train(prepared, tmp_path / "run", "--steps", "100", "--lr", "1e-2")
    history = losses(tmp_path / "run")
    assert len(history) == 100
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert last < 0.85 * first, (first, last)
    lora = read_lora(tmp_path / "run" / "run.safetensors")
    assert lora.format == "official" and lora.ranks == [8] and len(lora.modules) == 2 * 10  # 2 blocks x 10 layers
    from wanx.pipeline import WanPipeline

    pipe = WanPipeline.from_pretrained("tiny")
    report = pipe.load_lora(tmp_path / "run" / "run.safetensors")
    assert report.matched == 20


def test_resume_is_bit_identical(prepared, tmp_path):
    train(prepared, tmp_path / "straight", "--steps", "6")
    train(prepared, tmp_path / "split", "--steps", "3", "--save-every", "3")
    train(prepared, tmp_path / "split", "--steps", "6", "--resume")
    a, b = load_file(str(tmp_path / "straight" / "straight.safetensors")), load_file(str(tmp_path / "split" / "split.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "straight" / "checkpoints" / "step-6" / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "split" / "checkpoints" / "step-6" / "state.pt", weights_only=True)
    for key, value in sa["optimizer"]["state"].items():
        assert all(torch.equal(value[k], sb["optimizer"]["state"][key][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")


def test_bad_input_stops_before_training(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--data", str(empty), "--model", "tiny", "--output", str(tmp_path / "o")]) == 2
    assert "no prepared items; run `wanx prepare" in capsys.readouterr().err
    assert main(["train", "--data", str(empty), "--model", "tiny", "--output", str(tmp_path / "o"), "--lora-rank", "0"]) == 2
    assert "--lora-rank" in capsys.readouterr().err


def test_training_run_is_a_library_call(prepared, tmp_path):
    """`wanx.training.run`, what `wanx train` and the demo build call: its errors name its
    parameters (the CLI's name its flags), before anything is made; then the run, as the CLI's."""
    from wanx import training
    from wanx.runtime import Runtime
    from wanx.training.recipe import TrainConfig

    runtime = Runtime.create("cpu")
    with pytest.raises(ValueError, match=r"^config\.expert is for a model with two experts"):
        training.run(TrainConfig(data=prepared, output=tmp_path / "o", expert="high"), runtime, model="tiny")
    with pytest.raises(ValueError, match=r"^runtime\.offload 'model'"):
        training.run(TrainConfig(data=prepared, output=tmp_path / "o"), Runtime.create("cpu", offload="model"),
                     model="tiny")
    assert not (tmp_path / "o").exists()
    path = training.run(TrainConfig(data=prepared, output=tmp_path / "lib", lora_rank=8, steps=2), runtime,
                        model="tiny", progress=False)
    train(prepared, tmp_path / "cli", "--steps", "2")
    assert path == tmp_path / "lib" / "lib.safetensors"
    a, b = load_file(str(path)), load_file(str(tmp_path / "cli" / "cli.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# The LoRA key names ComfyUI's Wan loader maps onto its model (comfy/lora.py: the
# "diffusion_model." prefix + the official module name + lora_A/lora_B/alpha), for one block.
COMFY_KEYS = {f"diffusion_model.blocks.0.{m}.{leaf}" for m in
              ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
               "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
              for leaf in ("lora_A.weight", "lora_B.weight", "alpha")}


def test_trained_lora_interop(prepared, tmp_path):
    """Keys as ComfyUI maps them; diffusers' load_lora_weights (test-only oracle) changes its
    transformer's output exactly as wanx does with the same file."""
    from diffusers import WanPipeline as DiffusersPipeline

    from tests.loading.test_load_model import dit_inputs
    from tests.oracles import diffusers_dit, official_state, run_diffusers_dit
    from wanx.lora import apply_lora
    from wanx.tiny import tiny_model_dir
    import wanx

    train(prepared, tmp_path / "run", "--steps", "5", "--lr", "1e-2")
    path = tmp_path / "run" / "run.safetensors"
    state = load_file(str(path))
    assert {k for k in state if k.startswith("diffusion_model.blocks.0.")} == COMFY_KEYS
    base = wanx.load_model(tiny_model_dir("tiny"))
    x, t, context, _ = dit_inputs(base.config)
    oracle = diffusers_dit(base.config, official_state(base))
    pipe = DiffusersPipeline(tokenizer=None, text_encoder=None, transformer=oracle, vae=None, scheduler=None)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        theirs = run_diffusers_dit(pipe.transformer, base.config, x, t, context)
        without = base(x, t, context)
        apply_lora(base, path)
        ours = base(x, t, context)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert (ours - without).abs().max() >= 1e-3 * ours.abs().max()  # the trained LoRA acts


def test_a_checkpoint_cut_short_is_never_resumed_from(prepared, tmp_path, capsys):
    """A run killed while writing leaves only `.step-N.partial` (the rename is the last act):
    resume takes the last complete checkpoint and matches a straight run."""
    train(prepared, tmp_path / "straight", "--steps", "6")
    train(prepared, tmp_path / "killed", "--steps", "3", "--save-every", "3")
    partial = tmp_path / "killed" / "checkpoints" / ".step-5.partial"
    partial.mkdir()
    (partial / "lora.safetensors").write_bytes(b"half a file")
    capsys.readouterr()
    train(prepared, tmp_path / "killed", "--steps", "6", "--resume")
    assert f"resuming from {tmp_path / 'killed' / 'checkpoints' / 'step-3'} (step 3)" in capsys.readouterr().err
    assert not partial.exists()
    a = load_file(str(tmp_path / "straight" / "straight.safetensors"))
    b = load_file(str(tmp_path / "killed" / "killed.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_trains_the_same_lora(prepared, tmp_path):
    train(prepared, tmp_path / "plain", "--steps", "3", "--lr", "1e-2")
    train(prepared, tmp_path / "checkpointed", "--steps", "3", "--lr", "1e-2", "--gradient-checkpointing")
    a = load_file(str(tmp_path / "plain" / "plain.safetensors"))
    b = load_file(str(tmp_path / "checkpointed" / "checkpointed.safetensors"))
    for key in a:  # the recomputation runs the same ops on the same tensors
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    assert not torch.equal(a["diffusion_model.blocks.0.ffn.0.lora_B.weight"], torch.zeros_like(a["diffusion_model.blocks.0.ffn.0.lora_B.weight"]))


def test_training_on_an_fp8_base(prepared, tmp_path):
    train(prepared, tmp_path / "fp8", "--steps", "40", "--lr", "1e-2", "--fp8", "--gradient-checkpointing")
    history = losses(tmp_path / "fp8")
    assert sum(history[-10:]) < 0.9 * sum(history[:10])  # it learns on the FP8 base too
    assert len(read_lora(tmp_path / "fp8" / "fp8.safetensors").modules) == 20


def test_training_on_an_int8_base(prepared, tmp_path):
    """--int8: the frozen base quantized to INT8 as it loads, the LoRA trained on its Int8Linear
    layers (fp32 adapters); a different LoRA from the same run on the float base."""
    train(prepared, tmp_path / "int8", "--steps", "3", "--lr", "1e-2", "--int8")
    train(prepared, tmp_path / "float", "--steps", "3", "--lr", "1e-2")
    history = losses(tmp_path / "int8")
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(history)))
    lora, floats = load_file(str(tmp_path / "int8" / "int8.safetensors")), load_file(str(tmp_path / "float" / "float.safetensors"))
    assert len(read_lora(tmp_path / "int8" / "int8.safetensors").modules) == 20 and lora.keys() == floats.keys()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    assert any(not torch.equal(lora[k], floats[k]) for k in lora if "lora_B" in k)  # it trained on another base


def test_diffusers_format_and_logit_normal_timesteps(prepared, tmp_path):
    train(prepared, tmp_path / "official", "--steps", "3", "--lr", "1e-2", "--lora-alpha", "4")
    train(prepared, tmp_path / "diffusers", "--steps", "3", "--lr", "1e-2", "--lora-alpha", "4", "--lora-format", "diffusers")
    a, b = read_lora(tmp_path / "official" / "official.safetensors"), read_lora(tmp_path / "diffusers" / "diffusers.safetensors")
    assert b.format == "diffusers" and a.modules.keys() == b.modules.keys()  # the names map back exactly
    for name, module in a.modules.items():  # the same deltas: alpha/rank folded into B
        torch.testing.assert_close(b.modules[name].delta(), module.delta(), rtol=1e-6, atol=1e-9)
    train(prepared, tmp_path / "logit", "--steps", "3", "--timesteps", "logit-normal")
    assert losses(tmp_path / "logit") != losses(tmp_path / "official")[:3]


def test_adapters_live_where_a_streamed_dit_computes():
    """With --offload blocks the frozen weights stay in host memory and visit the GPU block by
    block; the trainable LoRA must be made on the GPU (the streamer's device), not beside the
    host weights (found on an H200: a 14B run failed with mat2 on cpu)."""
    from wanx.memory.streaming import BlockStreamer
    from wanx.models.transformer import WanDiT
    from wanx.memory.streaming import compute_device
    from wanx.training.trainable import add_trainable_lora

    dit = WanDiT("tiny")
    assert compute_device(dit) == torch.device("cpu")
    BlockStreamer(dit, "meta", 0)  # stands in for cuda: budget 0, nothing is copied there yet
    assert compute_device(dit) == torch.device("meta")
    adapters = add_trainable_lora(dit, 4, None, ("q",), torch.Generator().manual_seed(0))
    assert {a.down.device.type for a in adapters.values()} == {"meta"}


def test_caption_dropout_trains_on_the_empty_text():
    """An item dropped from its caption is seen with the empty prompt's embedding (what
    `--negative-prompt ""` gives at inference); the draw comes from the step's generator, so
    runs stay reproducible."""
    from pathlib import Path

    from wanx.models.transformer import WanDiT
    from wanx.training.loss import flow_matching_loss
    from wanx.training.recipe import TrainConfig

    torch.manual_seed(0)
    dit = WanDiT("tiny")
    empty = torch.randn(1, 7, 32)
    batch = {"x0": torch.randn(2, 16, 1, 4, 4), "context": torch.randn(2, 7, 32), "empty_text": empty}
    dropped = TrainConfig(data=Path("."), output=Path("."), caption_dropout=0.999999)
    plain = TrainConfig(data=Path("."), output=Path("."))
    with torch.no_grad():
        a = flow_matching_loss(dit, batch, dropped, torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        torch.rand(2, generator=g)  # the dropout draw
        b = flow_matching_loss(dit, {**batch, "context": empty.expand(2, -1, -1)}, plain, g)
        c = flow_matching_loss(dit, batch, plain, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, c)
