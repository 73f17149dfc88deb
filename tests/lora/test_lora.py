"""LoRA: every format against a hand-merged W' = W + scale * delta, diffusers' loader as an
oracle, fused vs live, stacking, strength, unloading, FP8 and streamed bases, diagnostics."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from tests.loading.test_load_model import dit_inputs
from tests.oracles import assert_same_outputs, diffusers_dit, official_state, run_diffusers_dit, tiny_dit
from wanx.lora import LoraError, apply_lora, read_lora, remove_lora, set_lora_strength
from wanx.memory.fp8 import quantize_fp8
from wanx.memory.streaming import BlockStreamer

TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "ffn.0", "ffn.2"]
RANK, ALPHA = 4, 2.0

# official name -> diffusers / kohya module names
DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
             "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "ffn.0": "ffn.net.0.proj",
             "ffn.2": "ffn.net.2"}


def factors(model, seed=1):
    """Random low-rank factors for TARGETS of every block: {official module: (down, up)}."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(model.config.num_layers):
        for target in TARGETS:
            w = model.get_submodule(f"blocks.{i}.{target}").weight
            out[f"blocks.{i}.{target}"] = (torch.randn(RANK, w.shape[1], generator=gen) * 0.2,
                                           torch.randn(w.shape[0], RANK, generator=gen) * 0.2)
    return out


def write(fmt: str, fac: dict, with_alpha: bool = True) -> dict:
    state = {}
    for name, (down, up) in fac.items():
        block, target = name.split(".", 2)[1], name.split(".", 2)[2]
        if fmt == "official":
            key = f"diffusion_model.{name}"
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, up
        elif fmt == "official-down-up":
            key = f"diffusion_model.{name}"
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        elif fmt == "kohya":
            key = f"lora_unet_{name.replace('.', '_')}"
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        elif fmt == "diffusers":
            key = f"transformer.blocks.{block}.{DIFFUSERS[target]}"
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, up
        elif fmt == "diffsynth":
            state[f"{name}.lora_A.default.weight"], state[f"{name}.lora_B.default.weight"] = down, up
        if with_alpha and fmt in ("official-down-up", "kohya"):
            state[f"{key}.alpha"] = torch.tensor(ALPHA)
    return state


def merged(model, deltas: dict, strength: float = 1.0):
    """The base model with W += strength * delta by hand (float32)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, delta in deltas.items():
            model.get_submodule(name).weight += strength * delta
    return model


def lowrank_deltas(fac, scale):
    return {name: up @ down * scale for name, (down, up) in fac.items()}


def close(a, b, rel=1e-5):
    assert (a - b).abs().max() <= rel * b.abs().max(), ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def base():
    model = tiny_dit()
    return model, dit_inputs(model.config)


@pytest.mark.parametrize("fmt, scale", [("official", 1.0), ("official-down-up", ALPHA / RANK), ("kohya", ALPHA / RANK),
                                        ("diffusers", 1.0), ("diffsynth", 1.0)])
@pytest.mark.parametrize("fuse", [True, False])
def test_formats_match_a_hand_merge(base, tmp_path, fmt, scale, fuse):
    model, (x, t, context, _) = base
    fac = factors(model)
    path = tmp_path / "lora.safetensors"
    save_file(write(fmt, fac), str(path))
    lora = read_lora(path)
    assert lora.format == fmt.split("-")[0] and lora.ranks == [RANK] and len(lora.modules) == len(fac)
    with torch.no_grad():
        expected = merged(model, lowrank_deltas(fac, scale), 0.7)(x, t, context)
        dit = copy.deepcopy(model)
        report = apply_lora(dit, path, 0.7, fuse=fuse)
        assert report.matched == report.modules == len(fac) and report.fused == fuse
        close(dit(x, t, context), expected)


def test_diffsynth_lightning_ckpt(base, tmp_path):
    model, (x, t, context, _) = base
    fac = factors(model)
    path = tmp_path / "epoch=0-step=500.ckpt"
    torch.save({"epoch": 0, "global_step": 500, "state_dict": write("diffsynth", fac)}, path)
    with torch.no_grad():
        dit = copy.deepcopy(model)
        apply_lora(dit, path)
        close(dit(x, t, context), merged(model, lowrank_deltas(fac, 1.0))(x, t, context))


def test_loha_lokr_and_diffs(base):
    model, (x, t, context, _) = base
    gen = torch.Generator().manual_seed(3)
    r = 2
    q, ffn, norm = model.blocks[0].self_attn.q, model.blocks[1].ffn[0], model.blocks[0].self_attn.norm_q
    w1a, w1b, w2a, w2b = (torch.randn(32, r, generator=gen) * 0.3, torch.randn(r, 32, generator=gen) * 0.3,
                          torch.randn(32, r, generator=gen) * 0.3, torch.randn(r, 32, generator=gen) * 0.3)
    k1, k2a, k2b = torch.randn(4, 2, generator=gen) * 0.3, torch.randn(16, r, generator=gen) * 0.3, torch.randn(r, 16, generator=gen) * 0.3
    norm_diff, bias_diff = torch.randn(32, generator=gen) * 0.1, torch.randn(64, generator=gen) * 0.1
    state = {
        "lora_unet_blocks_0_self_attn_q.hada_w1_a": w1a, "lora_unet_blocks_0_self_attn_q.hada_w1_b": w1b,
        "lora_unet_blocks_0_self_attn_q.hada_w2_a": w2a, "lora_unet_blocks_0_self_attn_q.hada_w2_b": w2b,
        "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(1.0),
        "lora_unet_blocks_1_ffn_0.lokr_w1": k1, "lora_unet_blocks_1_ffn_0.lokr_w2_a": k2a,
        "lora_unet_blocks_1_ffn_0.lokr_w2_b": k2b, "lora_unet_blocks_1_ffn_0.alpha": torch.tensor(4.0),
        "lora_unet_blocks_0_self_attn_norm_q.diff": norm_diff, "lora_unet_blocks_1_ffn_0.diff_b": bias_diff,
    }
    expected_model = copy.deepcopy(model)
    with torch.no_grad():
        expected_model.blocks[0].self_attn.q.weight += (w1a @ w1b) * (w2a @ w2b) * (1.0 / r)
        expected_model.blocks[1].ffn[0].weight += torch.kron(k1, k2a @ k2b) * (4.0 / r)
        expected_model.blocks[0].self_attn.norm_q.weight += norm_diff
        expected_model.blocks[1].ffn[0].bias += bias_diff
        expected = expected_model(x, t, context)
        for fuse in (True, False):
            dit = copy.deepcopy(model)
            apply_lora(dit, state, fuse=fuse)
            close(dit(x, t, context), expected)
    assert q is model.blocks[0].self_attn.q and ffn is not None and norm is not None


def test_diffusers_load_lora_weights_agrees(base):
    """diffusers' WanPipeline.load_lora_weights (peft) on its transformer with the same weights."""
    from diffusers import WanPipeline as DiffusersPipeline

    model, (x, t, context, _) = base
    fac = factors(model)
    for fmt in ("official-down-up", "diffusers"):
        state = write(fmt, fac)
        oracle = diffusers_dit(model.config, official_state(model))
        pipe = DiffusersPipeline(tokenizer=None, text_encoder=None, transformer=oracle, vae=None, scheduler=None)
        pipe.load_lora_weights({k: v.clone() for k, v in state.items()}, adapter_name="test")
        pipe.set_adapters(["test"], adapter_weights=[0.7])
        with torch.no_grad():
            theirs = run_diffusers_dit(pipe.transformer, model.config, x, t, context)
            dit = copy.deepcopy(model)
            apply_lora(dit, state, 0.7)
            ours = dit(x, t, context)
            without = model(x, t, context)
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max(), fmt  # the DiT parity bound
        assert (theirs - without).abs().max() >= 0.05 * theirs.abs().max(), fmt  # the LoRA really acts


def test_fused_live_stacking_strength_and_unload(base):
    model, (x, t, context, _) = base
    a, b = write("official", factors(model, 1)), write("kohya", factors(model, 2))
    dit = copy.deepcopy(model)
    original = {k: v.clone() for k, v in dit.state_dict().items()}
    with torch.no_grad():
        plain = dit(x, t, context)
        apply_lora(dit, a, 0.5, name="a")
        apply_lora(dit, b, 1.0, name="b")
        fused = dit(x, t, context)
        remove_lora(dit)
        assert all(torch.equal(original[k], v) for k, v in dit.state_dict().items())  # bit-exact restore
        both = merged(merged(model, lowrank_deltas(factors(model, 1), 1.0), 0.5),
                      lowrank_deltas(factors(model, 2), ALPHA / RANK))(x, t, context)
        close(fused, both)  # two LoRAs stacked = their sum
        apply_lora(dit, a, 0.5, name="a", fuse=False)
        apply_lora(dit, b, 1.0, name="b", fuse=False)
        close(dit(x, t, context), fused)  # live = fused (stated: 1e-5 of the output scale)
        set_lora_strength(dit, "a", 0.0)
        set_lora_strength(dit, "b", 0.0)
        assert_same_outputs(dit(x, t, context), plain)  # strength 0 is the base
        remove_lora(dit, "a")
        with pytest.raises(LoraError, match="no LoRA named 'a'"):
            remove_lora(dit, "a")
        remove_lora(dit)
        assert torch.equal(dit(x, t, context), plain)


def test_live_lora_on_fp8_and_streamed_bases(base):
    model, (x, t, context, _) = base
    state = write("official", factors(model))
    with torch.no_grad():
        reference = merged(model, lowrank_deltas(factors(model), 1.0))(x, t, context)
        fp8 = quantize_fp8(copy.deepcopy(model), compute_dtype=torch.float32)
        report = apply_lora(fp8, state)
        assert not report.fused  # an FP8 base defaults to live
        assert (fp8(x, t, context) - reference).abs().max() <= 0.06 * reference.abs().max()  # the FP8 bound
        fused_fp8 = quantize_fp8(copy.deepcopy(model), compute_dtype=torch.float32)
        apply_lora(fused_fp8, state, fuse=True)  # merged in fp32, requantized
        assert (fused_fp8(x, t, context) - reference).abs().max() <= 0.06 * reference.abs().max()

        streamed = copy.deepcopy(model)
        streamer = BlockStreamer(streamed, "cpu", 0)
        assert not apply_lora(streamed, state).fused
        assert_same_outputs(streamed(x, t, context), merged(model, lowrank_deltas(factors(model), 1.0))(x, t, context))
        with pytest.raises(LoraError, match="streamed model"):
            apply_lora(streamed, state, fuse=True, name="again")
        streamer.remove()


def test_misfits_are_errors_and_change_nothing(base, tmp_path):
    model, _ = base
    dit = copy.deepcopy(model)
    before = {k: v.clone() for k, v in dit.state_dict().items()}

    def fails(state, message):
        with pytest.raises(LoraError, match=message):
            apply_lora(dit, state)
        assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())
        assert not hasattr(dit.blocks[0].self_attn.q, "lora_adapters")

    down, up = torch.zeros(4, 32), torch.zeros(32, 4)
    fails({"diffusion_model.blocks.39.self_attn.q.lora_A.weight": down,
           "diffusion_model.blocks.39.self_attn.q.lora_B.weight": up},
          r"targets a 40-block model \(Wan2.1 14B\); the loaded model has 2 blocks")
    fails({"diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight": down,
           "diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight": up},
          r"image cross-attention keys \(k_img/v_img\): it was trained on an I2V model; this is a T2V model")
    fails({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 5120),
           "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(5120, 4)},
          r"width 5120 \(Wan2.1 14B\); the loaded model has width 32")
    fails({"diffusion_model.blocks.0.self_attn.zz.lora_A.weight": down,
           "diffusion_model.blocks.0.self_attn.zz.lora_B.weight": up}, "match no module of this Wan2.1 DiT: blocks.0.self_attn.zz")
    fails({"lora_unet_blocks_0.cross_attn_q.lora_down.weight": down, "lora_unet_blocks_0.cross_attn_q.lora_up.weight": up},
          "not LoRA weights wanx knows|not a LoRA")  # a malformed kohya key (KJ#869)
    fails({"text_model.encoder.weight": down}, "not a LoRA for the Wan2.1 DiT")
    fails({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": down}, "only part of a LoRA")

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"blocks.0.self_attn.q.lora_A.default.weight": down}, "x": Payload()}, evil)
    fails(evil, "weights_only=True")


def test_cli_lora_flag_info_and_metadata(tmp_path, capsys, monkeypatch):
    import av
    import numpy as np

    from wanx.cli import main
    from wanx.video import read_video

    monkeypatch.setenv("WANX_HOME", str(tmp_path / "home"))
    model = tiny_dit()
    path = tmp_path / "style.safetensors"
    save_file(write("kohya", factors(model)), str(path))
    args = ["generate", "--model", "tiny", "--prompt", "a cat", "--size", "64x48", "--frames", "5", "--steps", "2",
            "--seed", "1", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "plain.mp4")]) == 0
    assert main([*args, "--lora", f"{path}:0.8", "-o", str(tmp_path / "lora.mp4")]) == 0
    err = capsys.readouterr().err
    assert f"LoRA style: kohya format, {len(factors(model))}/{len(factors(model))} modules matched, rank 4, strength 0.8, fused" in err
    plain, styled = (read_video(tmp_path / f"{n}.mp4").frames.astype(int) for n in ("plain", "lora"))
    assert np.abs(plain - styled).mean() > 1
    with av.open(str(tmp_path / "lora.mp4")) as container:
        assert '"strength": 0.8' in container.metadata["loras"] and "style.safetensors" in container.metadata["loras"]

    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format:     kohya" in out and "rank:       4" in out and "width 32" in out

    big = tmp_path / "14b.safetensors"
    save_file({"diffusion_model.blocks.39.ffn.0.lora_A.weight": torch.zeros(4, 5120),
               "diffusion_model.blocks.39.ffn.0.lora_B.weight": torch.zeros(13824, 4)}, str(big))

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the LoRA was refused")

    from wanx.pipeline import WanPipeline

    monkeypatch.setattr(WanPipeline, "from_files", refuse)
    assert main([*args, "--lora", str(big), "-o", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "targets a 40-block model (Wan2.1 14B)" in err


def test_live_adapters_on_a_streamed_model_live_where_it_computes(base, tmp_path):
    """The streamed weights wait in host memory; the live LoRA must be made on the streamer's
    device (the GPU), or the first block fails with tensors on two devices. The caller may
    say so itself (streamed=, device=) instead of the streamer's record."""
    from wanx.memory.streaming import BlockStreamer

    told = copy.deepcopy(base[0])
    model = copy.deepcopy(base[0])
    BlockStreamer(model, "meta", 0)  # stands in for cuda: budget 0, nothing is copied there yet
    dim = model.config.dim
    path = tmp_path / "q.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(2, dim),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.ones(dim, 2)}, str(path))
    apply_lora(model, path, 1.0, fuse=False)
    adapter = model.blocks[0].self_attn.q.lora_adapters
    assert {p.device.type for p in adapter.parameters()} == {"meta"}
    with pytest.raises(LoraError, match="streamed model"):
        apply_lora(told, path, 1.0, fuse=True, streamed=True)
    apply_lora(told, path, 1.0, streamed=True, device="meta")  # live: the default on a streamed model
    adapter = told.blocks[0].self_attn.q.lora_adapters
    assert {p.device.type for p in adapter.parameters()} == {"meta"}


# -- issue 24: a diff beside a LoRA, every key applied, unique names ------------------------


def test_a_diff_beside_a_lora_is_added_to_it(base):
    """The official/ComfyUI meaning of a module with LoRA factors and a `.diff` (lightx2v-style
    files): W' = W + strength * (diff + scale * up @ down), b' = b + strength * diff_b. The diff
    was dropped without a word (3.5e-4 of the output)."""
    model, (x, t, context, _) = base
    gen = torch.Generator().manual_seed(7)

    def rand(*shape, std=0.1):
        return torch.randn(*shape, generator=gen) * std

    dim, ffn = model.config.dim, model.blocks[1].ffn[0].out_features
    q_down, q_up, q_diff, q_diff_b = rand(RANK, dim), rand(dim, RANK), rand(dim, dim), rand(dim)
    f_down, f_up, f_diff = rand(RANK, dim), rand(ffn, RANK), rand(ffn, dim)
    h1a, h1b, h2a, h2b, k_diff = rand(dim, 2, std=0.3), rand(2, dim, std=0.3), rand(dim, 2, std=0.3), rand(2, dim, std=0.3), rand(dim, dim)
    norm_diff = rand(dim)
    state = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": q_down, "diffusion_model.blocks.0.self_attn.q.lora_up.weight": q_up,
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(ALPHA), "diffusion_model.blocks.0.self_attn.q.diff": q_diff,
        "diffusion_model.blocks.0.self_attn.q.diff_b": q_diff_b,
        "diffusion_model.blocks.1.ffn.0.lora_A.weight": f_down, "diffusion_model.blocks.1.ffn.0.lora_B.weight": f_up,
        "diffusion_model.blocks.1.ffn.0.diff": f_diff,
        "lora_unet_blocks_1_self_attn_k.hada_w1_a": h1a, "lora_unet_blocks_1_self_attn_k.hada_w1_b": h1b,
        "lora_unet_blocks_1_self_attn_k.hada_w2_a": h2a, "lora_unet_blocks_1_self_attn_k.hada_w2_b": h2b,
        "lora_unet_blocks_1_self_attn_k.diff": k_diff,
        "diffusion_model.blocks.0.self_attn.norm_q.diff": norm_diff,
    }
    s = 0.7
    hand = copy.deepcopy(model)
    with torch.no_grad():
        hand.blocks[0].self_attn.q.weight += s * (q_diff + ALPHA / RANK * q_up @ q_down)
        hand.blocks[0].self_attn.q.bias += s * q_diff_b
        hand.blocks[1].ffn[0].weight += s * (f_diff + f_up @ f_down)
        hand.blocks[1].self_attn.k.weight += s * (k_diff + (h1a @ h1b) * (h2a @ h2b))
        hand.blocks[0].self_attn.norm_q.weight += s * norm_diff
        expected = hand(x, t, context)
        assert "lora+diff" in read_lora(state).summary()
        for fuse in (True, False):
            dit = copy.deepcopy(model)
            report = apply_lora(dit, state, s, fuse=fuse)
            assert report.matched == report.modules == 4
            close(dit(x, t, context), expected, rel=1e-6)


@pytest.mark.parametrize("keys, message", [
    ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": "down", "diffusion_model.blocks.0.self_attn.q.lora_B.weight": "up",
      "diffusion_model.blocks.0.self_attn.q.lora_down.weight": "down"},
     r"lora_A.weight and diffusion_model.blocks.0.self_attn.q.lora_down.weight both hold the down of blocks.0.self_attn.q"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": "down", "diffusion_model.blocks.0.self_attn.q.lora_B.weight": "up",
      "transformer.blocks.0.attn1.to_q.lora_A.weight": "down", "transformer.blocks.0.attn1.to_q.lora_B.weight": "up"},
     r"both hold the down of blocks.0.self_attn.q"),  # two namings of one module
    ({"diffusion_model.blocks.0.self_attn.q.lora_B.bias": "bias", "diffusion_model.blocks.0.self_attn.q.diff_b": "bias"},
     r"both hold the diff_b of blocks.0.self_attn.q"),
    ({"lora_unet_blocks_0_self_attn_q.lora_down.weight": "down", "lora_unet_blocks_0_self_attn_q.lora_up.weight": "up",
      "lora_unet_blocks_0_self_attn_q.hada_w1_a": "a", "lora_unet_blocks_0_self_attn_q.hada_w1_b": "b",
      "lora_unet_blocks_0_self_attn_q.hada_w2_a": "a", "lora_unet_blocks_0_self_attn_q.hada_w2_b": "b"},
     r"key lora_unet_blocks_0_self_attn_q.hada_w1_a would not be applied: blocks.0.self_attn.q takes its product from "
     r"lora_unet_blocks_0_self_attn_q.lora_down.weight, lora_unet_blocks_0_self_attn_q.lora_up.weight \(lora\)"),
    ({"lora_unet_blocks_0_self_attn_q.lokr_w1": "k1", "lora_unet_blocks_0_self_attn_q.lokr_w1_a": "a",
      "lora_unet_blocks_0_self_attn_q.lokr_w1_b": "b", "lora_unet_blocks_0_self_attn_q.lokr_w2": "k2"},
     r"key lora_unet_blocks_0_self_attn_q.lokr_w1_a would not be applied"),
    ({"diffusion_model.blocks.0.self_attn.q.diff": "diff", "diffusion_model.blocks.0.self_attn.q.alpha": "alpha"},
     r"key diffusion_model.blocks.0.self_attn.q.alpha would not be applied: an alpha, and blocks.0.self_attn.q has no"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": "down", "diffusion_model.blocks.0.self_attn.q.diff": "diff"},
     r"only part of a LoRA"),  # lora_A beside a diff: was applied as the diff alone
])
def test_every_key_is_applied_or_the_file_is_refused(base, keys, message):
    model, _ = base
    dim = model.config.dim
    shapes = {"down": (RANK, dim), "up": (dim, RANK), "bias": (dim,), "diff": (dim, dim), "alpha": (), "a": (4, 2),
              "b": (2, 8), "k1": (4, 4), "k2": (8, 8)}
    state = {key: torch.ones(shapes[role]) for key, role in keys.items()}
    dit = copy.deepcopy(model)
    with pytest.raises(LoraError, match=message) as err:
        apply_lora(dit, state)
    assert "\n" not in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(dit.state_dict().values(), model.state_dict().values()))


def test_lora_names_are_unique_and_readable():
    from wanx.lora import lora_names

    assert lora_names(["a/lora.safetensors", "b/lora.safetensors", "style.safetensors"]) == ["a/lora", "b/lora", "style"]
    assert lora_names(["lora.safetensors", "runs/a/lora.safetensors"]) == ["lora", "a/lora"]
    assert lora_names(["runs/cat/out/lora.safetensors", "runs/dog/out/lora.safetensors"]) == ["cat/out/lora", "dog/out/lora"]
    assert lora_names(["loras/style.safetensors", "loras/style.ckpt"]) == ["style.safetensors", "style.ckpt"]
    assert lora_names(["x.safetensors", "x.safetensors"]) == ["x", "x-2"]  # the same file twice
    assert lora_names(["b/lora.safetensors"], taken={"lora"}) == ["b/lora"]  # clashes with a given name


def test_same_stem_loras_stack_under_their_folders(base, tmp_path):
    model, (x, t, context, _) = base
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "lora.safetensors", tmp_path / "b" / "lora.safetensors"
    save_file(write("official", factors(model, 1)), str(a))
    save_file(write("kohya", factors(model, 2)), str(b))
    with torch.no_grad():
        expected = merged(merged(model, lowrank_deltas(factors(model, 1), 1.0), 0.7),
                          lowrank_deltas(factors(model, 2), ALPHA / RANK), 0.5)(x, t, context)
        for fuse in (True, False):
            dit = copy.deepcopy(model)
            assert apply_lora(dit, a, 0.7, fuse=fuse).name == "lora"
            assert apply_lora(dit, b, 0.5, fuse=fuse).name == "b/lora"
            close(dit(x, t, context), expected)
            with pytest.raises(LoraError, match=r"lora.safetensors is loaded already \(as 'lora'\)"):
                apply_lora(dit, a, fuse=fuse)  # the same file again, unnamed: a rerun cell, not a stack
        # names that differ only in punctuation keep apart in the live layers
        dit = copy.deepcopy(model)
        apply_lora(dit, a, 0.7, fuse=False, name="a/lora")
        apply_lora(dit, b, 0.5, fuse=False, name="a_lora")
        assert len(dit.blocks[0].self_attn.q.lora_adapters) == 2
        close(dit(x, t, context), expected)


def test_lora_arg_forms(tmp_path, monkeypatch):
    from wanx.cli import _lora_arg

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my:style.safetensors").write_bytes(b"")
    assert _lora_arg("--lora", "a.safetensors") == ("a.safetensors", 1.0, None)
    assert _lora_arg("--lora", "a.safetensors:0.7") == ("a.safetensors", 0.7, None)
    assert _lora_arg("--lora", "a.safetensors:-1.5:cat") == ("a.safetensors", -1.5, "cat")
    assert _lora_arg("--lora", "my:style.safetensors") == ("my:style.safetensors", 1.0, None)  # a path with a colon
    assert _lora_arg("--lora", "my:style.safetensors:0.5:s") == ("my:style.safetensors", 0.5, "s")
    assert _lora_arg("--lora", "missing:x.safetensors") == ("missing:x.safetensors", 1.0, None)  # no such file, later
    for text, message in [("x:abc", r"--lora x:abc: bad strength 'abc'; write PATH, PATH:STRENGTH or PATH:STRENGTH:NAME"),
                          ("x.safetensors:", "bad strength ''"), ("x.safetensors:nan", "bad strength 'nan': give a finite"),
                          ("x.safetensors:0.5:a b", "bad LoRA name 'a b'")]:
        with pytest.raises(ValueError, match=message):
            _lora_arg("--lora", text)


def test_cli_stacks_same_stem_loras_and_checks_specs_before_the_model(tmp_path, capsys, monkeypatch):
    import av

    import wanx.hub
    from wanx.cli import main
    from wanx.pipeline import WanPipeline

    model = tiny_dit()
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "lora.safetensors", tmp_path / "b" / "lora.safetensors"
    save_file(write("official", factors(model, 1)), str(a))
    save_file(write("kohya", factors(model, 2)), str(b))
    args = ["generate", "--model", "tiny", "--prompt", "a cat", "--size", "64x48", "--frames", "5", "--steps", "1",
            "--seed", "1", "--quiet"]
    out = tmp_path / "two.mp4"
    assert main([*args, "--lora", f"{a}:0.7", "--lora", f"{b}:0.5", "--lora", f"{b}:0.2:mine", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "LoRA a/lora: official format" in err and "LoRA b/lora: kohya format" in err and "LoRA mine: kohya" in err
    with av.open(str(out)) as container:
        loras = container.metadata["loras"]
    assert all(f'"name": "{n}"' in loras for n in ("a/lora", "b/lora", "mine"))

    def refuse(*a, **k):
        raise AssertionError("the model was looked for before the LoRAs were checked")

    monkeypatch.setattr(wanx.hub, "find_model", refuse)
    monkeypatch.setattr(WanPipeline, "from_files", refuse)
    text = tmp_path / "notes.txt"
    text.write_text("not a LoRA")
    for lora, message in [([f"{a}:abc"], f"--lora {a}:abc: bad strength 'abc'"),
                          ([f"{tmp_path}/nope.safetensors:0.5"], f"--lora {tmp_path}/nope.safetensors: no such LoRA file"),
                          ([f"{a}:1:x", f"{b}:1:x"], "two LoRAs are named 'x'"),
                          ([f"{text}:0.5"], "unknown LoRA file type")]:
        assert main([*args, *(f for spec in lora for f in ("--lora", spec)), "-o", str(tmp_path / "x.mp4")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("wanx: error: ") and "\n" not in err and message in err, err
