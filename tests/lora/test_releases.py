"""The published step-distilled LoRAs' key sets, built tensor by tensor from each release's
rules, load completely: every tensor applied (on the tiny DiT, values; on a meta DiT of the
release's real geometry, names and shapes), and a LoRA for another model stays a one-line error.

Key rules, by release (sources in the comments of each builder):
- lightx2v (Wan2.1 T2V/I2V 1.3B/14B StepDistill-CfgDistill, rank 32-256; Wan2.2-Distill-Loras
  A14B high/low): extracted from the distilled DiT by lightx2v's LoRA extractor: a 2-D weight of
  >= 1M parameters becomes `lora_down`/`lora_up` at the rank, every other weight `.diff`, every
  bias `.diff_b`, a `modulation` `.diff_m` (blocks.N.diff_m, head.diff_m); `diffusion_model.`
  prefix; Kijai's re-saves add `.alpha`.
- Wan2.2 Lightning (A14B high/low, Seko V1.0/V1.1/V2.0, 250928): trained LoRAs on the attention
  and FFN linears, `lora_down`/`lora_up`/`alpha`, `diffusion_model.` prefix.
- CausVid / rCM (Kijai's extractions): `lora_down`/`lora_up`/`alpha` on every linear (blocks,
  embeddings, time_projection, head), `.diff_b` biases, `.diff` norms; rCM's "average rank"
  files have a rank per module.
"""

import copy
import re

import pytest
import torch
from safetensors.torch import save_file

from tests.loading.test_load_model import dit_inputs
from wanx.configs import DiTConfig, dit_config
from wanx.lora import LoraError, apply_lora, read_lora
from wanx.lora.apply import match, not_applied
from wanx.models.transformer import WanDiT

PREFIX = "diffusion_model."


def meta_dit(name: str) -> WanDiT:
    with torch.device("meta"):
        return WanDiT(dit_config(name))


def _generic(name: str) -> str:
    return re.sub(r"^blocks\.\d+\.", "blocks.N.", name)


def extractor_keys(target: WanDiT, geometry: str, rank: int, alpha: bool) -> dict[str, tuple]:
    """lightx2v's LoRA extractor (LightX2V tools/extract/lora_extractor.py: `_decompose_to_lora`
    for 2-D weights of >= 1,000,000 parameters, `_generate_lora_diff_key` for the rest:
    .weight -> .diff, .bias -> .diff_b, .modulation -> .diff_m), deciding by the release's real
    geometry (`geometry`, e.g. 1.3B keeps time_embedding.0 as a diff) and shaped for `target`."""
    real = {_generic(n): p for n, p in meta_dit(geometry).named_parameters()}
    keys = {}
    for name, param in target.named_parameters():
        decide = real[_generic(name)]
        shape = tuple(param.shape)
        if name.endswith(".weight") and decide.ndim == 2 and decide.numel() >= 1_000_000:
            stem = PREFIX + name.removesuffix(".weight")
            keys[f"{stem}.lora_down.weight"] = (rank, shape[1])
            keys[f"{stem}.lora_up.weight"] = (shape[0], rank)
            if alpha:
                keys[f"{stem}.alpha"] = ()
        elif name.endswith(".weight"):
            keys[PREFIX + name.removesuffix(".weight") + ".diff"] = shape
        elif name.endswith(".bias"):
            keys[PREFIX + name.removesuffix(".bias") + ".diff_b"] = shape
        elif name.endswith(".modulation"):
            keys[PREFIX + name.removesuffix(".modulation") + ".diff_m"] = shape
    return keys


def lightning_keys(target: WanDiT, rank: int = 64, naming: str = "down-up") -> dict[str, tuple]:
    """Wan2.2-Lightning (lightx2v/Wan2.2-Lightning; DiffSynth-Studio #1067 converts its
    `X.alpha` / `X.lora_down.weight` / `X.lora_up.weight`; diffusers PR #12074 "lightning LoRA
    (has alpha keys)"): self/cross-attention q, k, v, o and ffn.0/ffn.2 of every block."""
    keys = {}
    for i, block in enumerate(target.blocks):
        for module in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                       "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"):
            w = block.get_submodule(module).weight
            if naming == "kohya":
                stem, down, up = f"lora_unet_blocks_{i}_{module.replace('.', '_')}", "lora_down", "lora_up"
            else:
                stem, (down, up) = f"{PREFIX}blocks.{i}.{module}", {"down-up": ("lora_down", "lora_up"),
                                                                    "A-B": ("lora_A", "lora_B")}[naming]
            keys[f"{stem}.{down}.weight"], keys[f"{stem}.{up}.weight"] = (rank, w.shape[1]), (w.shape[0], rank)
            keys[f"{stem}.alpha"] = ()
    return keys


def kijai_extracted_keys(target: WanDiT, rank, with_time_projection_weight: bool = True) -> dict[str, tuple]:
    """CausVid (Wan21_CausVid_14B_T2V_lora_rank32, diffusers' converter: "CausVid lora has the
    weight keys and the bias keys" of time_projection) and rCM (..._rCM_lora_average_rank_83:
    a rank per module): every Linear as lora_down/lora_up/alpha, biases diff_b, norms diff.
    rank: an int, or a function of the module name."""
    keys = {}
    for name, module in target.named_modules():
        if isinstance(module, torch.nn.Linear):
            stem = PREFIX + name
            r = rank(name) if callable(rank) else rank
            if with_time_projection_weight or not name.startswith("time_projection"):
                keys[f"{stem}.lora_down.weight"] = (r, module.in_features)
                keys[f"{stem}.lora_up.weight"] = (module.out_features, r)
                keys[f"{stem}.alpha"] = ()
            keys[f"{stem}.diff_b"] = (module.out_features,)
        elif re.search(r"norm", name.rsplit(".", 1)[-1]) and getattr(module, "weight", None) is not None:
            keys[f"{PREFIX}{name}.diff"] = tuple(module.weight.shape)
            if getattr(module, "bias", None) is not None:
                keys[f"{PREFIX}{name}.diff_b"] = tuple(module.bias.shape)
    return keys


# release -> (the real model it is for, the tiny model standing in, its key set for a DiT)
RELEASES = {
    "lightx2v-T2V-14B-rank64-alpha": ("t2v-14B", "tiny", lambda d: extractor_keys(d, "t2v-14B", 64, True)),
    "lightx2v-I2V-14B-480P-rank128": ("i2v-14B", "tiny-i2v", lambda d: extractor_keys(d, "i2v-14B", 128, False)),
    "lightx2v-I2V-14B-rank256-alpha": ("i2v-14B", "tiny-i2v", lambda d: extractor_keys(d, "i2v-14B", 256, True)),
    "lightx2v-T2V-1.3B-rank32": ("t2v-1.3B", "tiny", lambda d: extractor_keys(d, "t2v-1.3B", 32, True)),
    "lightx2v-Wan2.2-I2V-A14B-high/low-rank64": ("i2v-A14B", "tiny-i2v-A14B",
                                                 lambda d: extractor_keys(d, "i2v-A14B", 64, False)),
    "lightning-Wan2.2-T2V-A14B-rank64": ("t2v-14B", "tiny", lightning_keys),
    "lightning-Wan2.2-I2V-A14B-rank64": ("i2v-A14B", "tiny-i2v-A14B", lightning_keys),
    "lightning-lora_A/B": ("t2v-14B", "tiny", lambda d: lightning_keys(d, naming="A-B")),
    "lightning-kohya": ("t2v-14B", "tiny", lambda d: lightning_keys(d, naming="kohya")),
    "causvid-T2V-14B-rank32": ("t2v-14B", "tiny", lambda d: kijai_extracted_keys(d, 32)),
    "accvideo-time_projection-bias-only": ("t2v-14B", "tiny",
                                           lambda d: kijai_extracted_keys(d, 16, with_time_projection_weight=False)),
    "rcm-T2V-14B-average-rank": ("t2v-14B", "tiny",
                                 lambda d: kijai_extracted_keys(d, lambda n: 8 + (len(n) * 7) % 120)),
}


def tiny(name: str) -> WanDiT:
    torch.manual_seed(0)
    cfg = dit_config(name)
    return WanDiT(cfg).eval()


def filled(keys: dict[str, tuple], seed: int = 0, meta: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys.items():
        if key.endswith(".alpha"):
            state[key] = torch.tensor(float(keys[key.replace(".alpha", ".lora_down.weight")][0]
                                            if key.replace(".alpha", ".lora_down.weight") in keys
                                            else keys[key.replace(".alpha", ".lora_A.weight")][0]) / 2)
            if key.startswith("lora_unet_"):
                state[key] = torch.tensor(32.0)
        elif meta:
            state[key] = torch.empty(shape, device="meta")
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.01
    return state


@pytest.mark.parametrize("release", list(RELEASES))
def test_release_key_set_applies_completely(release, tmp_path):
    _, stand_in, build = RELEASES[release]
    model = tiny(stand_in)
    state = filled(build(model))
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path))
    for fuse in (True, False):
        dit = copy.deepcopy(model)
        report = apply_lora(dit, path, 1.0, fuse=fuse)
        assert report.keys == report.applied_keys == len(state) and report.not_applied == []
        assert report.matched == report.modules and "partial" not in str(report)


@pytest.mark.parametrize("release", list(RELEASES))
def test_release_key_set_fits_the_real_geometry(release):
    geometry, _, build = RELEASES[release]
    dit = meta_dit(geometry)
    lora = read_lora(filled(build(dit), meta=True))
    targets = match(dit, lora)
    assert len(targets) == len(lora.modules) and not_applied(lora, targets) == []


def test_lightx2v_diff_m_and_norm_diffs_match_a_hand_merge():
    """lightx2v's `blocks.N.diff_m` / `head.diff_m` are the modulation parameters' differences
    (ComfyUI-WanVideoWrapper #807: "lora key not loaded: diffusion_model.blocks.0.diff_m")."""
    model = tiny("tiny-i2v")
    x, t, context, extra = dit_inputs(model.config)
    state = filled(extractor_keys(model, "i2v-14B", 4, True), seed=3)
    s = 0.8
    hand = copy.deepcopy(model)
    lora = read_lora(state)
    with torch.no_grad():
        for name, module in lora.modules.items():
            target = hand.get_parameter(name) if name.endswith("modulation") else hand.get_submodule(name).weight
            delta = module.delta()
            if delta is not None:
                target += s * delta.reshape(target.shape)
            if "diff_b" in module.parts:
                hand.get_submodule(name).bias += s * module.parts["diff_b"]
        assert torch.equal(hand.blocks[1].modulation, model.blocks[1].modulation + s * state[f"{PREFIX}blocks.1.diff_m"])
        expected = hand(x, t, context, **extra)
        for fuse in (True, False):
            dit = copy.deepcopy(model)
            apply_lora(dit, state, s, fuse=fuse)
            out = dit(x, t, context, **extra)
            assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


I2V_14B = lambda d: extractor_keys(d, "i2v-14B", 4, True)  # noqa: E731


@pytest.mark.parametrize("lora_for, model, message", [
    ("i2v-14B", "i2v-A14B", r"trained on an I2V model; this is a Wan2.2 I2V model, which has no image cross-attention "
                            r"\(no CLIP\) \(blocks.0.cross_attn.k_img, .*--lora-partial applies the rest\)"),
    ("i2v-14B", "t2v-14B", r"trained on an I2V model; this is a T2V model"),
    ("t2v-14B", "t2v-1.3B", r"targets a 40-block model \(Wan2.1 14B\); the loaded model has 30 blocks \(Wan2.1 1.3B\)"),
    ("t2v-1.3B", "ti2v-5B", r"width 1536 \(Wan2.1 1.3B\); the loaded model has width 3072 \(Wan2.2 TI2V-5B\)"),
    ("t2v-14B", "ti2v-5B", r"targets a 40-block model \(Wan2.1 14B\); the loaded model has 30 blocks"),
])
def test_a_lora_for_another_model_is_one_line(lora_for, model, message):
    lora = read_lora(filled(extractor_keys(meta_dit(lora_for), lora_for, 4, True), meta=True))
    with pytest.raises(LoraError, match=message) as err:
        match(meta_dit(model), lora)
    assert "\n" not in str(err.value)
    if model != "i2v-A14B":  # only image cross-attention may be left out: another size stays an error
        with pytest.raises(LoraError) as err:  # e.g. I2V on T2V: patch_embedding takes 36 channels, not 16
            match(meta_dit(model), lora, partial=True)
        assert "\n" not in str(err.value)


def test_partial_applies_what_fits_and_names_the_rest(tmp_path):
    """A Wan2.1 I2V lightx2v LoRA on Wan2.2 I2V (no k_img/v_img/img_emb: WanVideoWrapper #909
    #940, LightX2V #1246): partial=True applies the rest and the report names every leftover."""
    i2v, a14b = tiny("tiny-i2v"), tiny("tiny-i2v-A14B")
    state = filled(extractor_keys(i2v, "i2v-14B", 4, True))
    path = tmp_path / "i2v.safetensors"
    save_file(state, str(path))
    dit = copy.deepcopy(a14b)
    with pytest.raises(LoraError, match="no image cross-attention"):
        apply_lora(dit, path)
    report = apply_lora(dit, path, partial=True)
    image = [k for k in state if re.search(r"(k_img|v_img|norm_k_img)\.|img_emb\.", k)]
    assert image and sorted(report.not_applied) == sorted(image)
    assert report.applied_keys == len(state) - len(image) and report.keys == len(state)
    line = str(report)
    assert "\n" not in line and "partial:" in line
    assert "diffusion_model.blocks.*.cross_attn.k_img.lora_down.weight x2" in line
    assert "diffusion_model.img_emb.proj.1.lora_down.weight" in line or "img_emb.proj.1" in line

    bare = tmp_path / "other.safetensors"
    save_file({f"{PREFIX}blocks.0.zz.lora_down.weight": torch.zeros(2, 32),
               f"{PREFIX}blocks.0.zz.lora_up.weight": torch.zeros(32, 2)}, str(bare))
    with pytest.raises(LoraError, match="no module of the LoRA is in this model"):
        apply_lora(copy.deepcopy(a14b), bare, partial=True)


@pytest.mark.parametrize("budget", [0, "one block"])
def test_lightx2v_norm_and_modulation_diffs_on_a_streamed_model(budget):
    """lightx2v's files carry norm (`.diff`) and modulation (`.diff_m`) differences; a streamed
    model (--offload blocks) took none (refused): they are fused into the streamer's host copies,
    the same output as on a resident model, and removed bit for bit."""
    from wanx.lora import remove_lora
    from wanx.memory.streaming import BlockStreamer

    model = tiny("tiny-i2v")
    x, t, context, extra = dit_inputs(model.config)
    state = filled(extractor_keys(model, "i2v-14B", 4, True), seed=5)
    with torch.no_grad():
        resident = copy.deepcopy(model)
        apply_lora(resident, state, 0.6, fuse=False)
        expected = resident(x, t, context, **extra)
        plain = model(x, t, context, **extra)
        streamed = copy.deepcopy(model)
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        last = sum(p.numel() * p.element_size() for p in model.blocks[-1].parameters())
        streamer = BlockStreamer(streamed, "cpu", 0 if budget == 0 else total - last)  # all but the last block stay
        assert streamer.stats.streamed > 0 and (budget == 0) == (not streamer.stats.resident_units)
        report = apply_lora(streamed, state, 0.6)
        assert not report.fused and report.applied_keys == report.keys == len(state)
        assert torch.equal(streamed(x, t, context, **extra), expected)
        remove_lora(streamed)
        assert torch.equal(streamed(x, t, context, **extra), plain)
        streamer.remove()
        assert all(torch.equal(a, b) for a, b in zip(streamed.state_dict().values(), model.state_dict().values()))
