"""GGUF files of Wan DiTs as city96's conversions write them: loaded with the block Linear
weights kept packed (GGUFLinear), compared with the float model they came from."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import wanx  # noqa: E402
from tests.oracles import official_config_json, official_state, tiny_dit  # noqa: E402
from tests.loading.kquants import K_QUANTS, quantize_k  # noqa: E402
from tests.loading.test_load_model import dit_inputs  # noqa: E402
from wanx.loading import CheckpointError, DamagedCheckpoint, inspect_checkpoint  # noqa: E402
from wanx.memory.fp8 import fp8_layer_names  # noqa: E402
from wanx.memory.gguf import GGUFLinear  # noqa: E402

Q = gguf.GGMLQuantizationType


def write_gguf(path, model, qtype, *, arch="wan", others=Q.F16):
    """city96's layout: block Linear weights in `qtype` (a list: taken in turn), other >1-dim
    tensors in `others`, 1-dim tensors F32, tensors of more than 4 dims flattened with
    `comfy.gguf.orig_shape.<name>`; a weight whose rows are not whole blocks of its type stays
    F16, as city96's converter leaves it."""
    kinds = qtype if isinstance(qtype, list) else [qtype]
    linears = {n + ".weight": kinds[i % len(kinds)] for i, n in enumerate(fp8_layer_names(model))}
    writer = gguf.GGUFWriter(str(path), arch)
    for name, tensor in official_state(model).items():
        data = tensor.float().numpy()
        if data.ndim > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(data.shape))
            data = data.reshape(-1)
        kind = linears[name] if name in linears else (Q.F32 if data.ndim == 1 else others)
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
            kind = Q.F16
        packed = quantize_k(data, kind.name) if kind.name in K_QUANTS else gguf.quants.quantize(data, kind)
        writer.add_tensor(name, packed, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # a tiny DiT's head count is not the released head dim's: config.json beside it, as for safetensors
    (path.parent / "config.json").write_text(json.dumps(official_config_json(model.config)), encoding="utf-8")
    return path


# Stated output error of the tiny DiT (random weights, width 32: a worst case, every layer's
# rounding lands on a narrow residual stream) against its fp32 self, as a fraction of the
# output's largest magnitude, computing in fp32. Measured: Q8_0 0.7% (FP8 in bf16 is 2.7%,
# tests/memory/test_fp8.py), Q5_0 6.8%, Q4_0 7.1%, the mix 6.1%. Q5_0 is not below Q4_0 here
# although its weights are (RMS 0.043 vs 0.086 of N(0, 1)): at this size the maximum is noise.
# K-quants need rows of 256, wider than the tiny DiT's: test_k_quant_dit_loads_packed_and_stays_close.
BOUNDS = {"Q8_0": 0.015, "Q5_0": 0.10, "Q4_0": 0.12, "Q8_0+Q4_0+F16": 0.12}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_gguf_dit_loads_packed_and_stays_close(tmp_path, name):
    model = tiny_dit()
    kinds = [Q[k] for k in name.split("+")]
    path = write_gguf(tmp_path / "wan-tiny.gguf", model, kinds)
    loaded = wanx.load_model(path, dtype=torch.float32)
    layers = fp8_layer_names(model)
    want = {n: kinds[i % len(kinds)].name for i, n in enumerate(layers)}
    got = {n: getattr(loaded.get_submodule(n), "qtype", "F16") for n in layers}
    assert got == want  # quantized layers packed in their type, F16 ones plain Linear
    assert all(isinstance(loaded.get_submodule(n), GGUFLinear) == (want[n] != "F16") for n in layers)
    assert loaded.patch_embedding.weight.shape == model.patch_embedding.weight.shape  # 5-dim, from orig_shape
    assert not any(p.is_meta for p in loaded.parameters())
    x, t, context, _ = dit_inputs(model.config)
    with torch.no_grad():
        reference, out = model(x, t, context), loaded(x, t, context)
    error = ((out - reference).abs().max() / reference.abs().max()).item()
    assert 0 < error <= BOUNDS[name], error


# The K-quants on a DiT 256 wide (rows of 256: one K-quant block), ffn 384 wide so that ffn.2's
# rows are not whole blocks and stay F16, as city96's converter leaves them; weights N(0, 1/256)
# as a trained layer's scale. The output's RMS error against its fp32 self, as a fraction of the
# output's RMS, computing in fp32. Measured (the writer rounds to nearest, tests/loading/kquants.py;
# llama.cpp's search of scales does better): Q6_K 1.4%, Q5_K 2.8%, Q4_K 5.7%, Q3_K 12%, Q2_K 25%.
K_BOUNDS = {"Q6_K": 0.03, "Q5_K": 0.05, "Q4_K": 0.10, "Q3_K": 0.20, "Q2_K": 0.40}


def test_k_quant_dit_loads_packed_and_stays_close(tmp_path):
    from tests.oracles import randomize
    from wanx.configs import DiTConfig
    from wanx.models.transformer import WanDiT

    config = DiTConfig(dim=256, ffn_dim=384, num_heads=4, num_layers=2, text_dim=32)
    model = randomize(WanDiT(config), 0, std=1 / 16)
    x, t, context, _ = dit_inputs(config)
    with torch.no_grad():
        reference = model(x, t, context)
    layers = fp8_layer_names(model)
    errors = {}
    for name in K_BOUNDS:
        loaded = wanx.load_model(write_gguf(tmp_path / f"{name}.gguf", model, Q[name]), dtype=torch.float32)
        kinds = {n: getattr(loaded.get_submodule(n), "qtype", "F16") for n in layers}
        assert kinds == {n: "F16" if n.endswith("ffn.2") else name for n in layers}
        with torch.no_grad():
            out = loaded(x, t, context)
        errors[name] = ((out - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()
    assert all(0 < errors[k] <= bound for k, bound in K_BOUNDS.items()), errors
    assert list(errors.values()) == sorted(errors.values()), errors  # fewer bits, larger error


def test_gguf_dit_computes_in_bf16_by_default(tmp_path):
    model = tiny_dit()
    loaded = wanx.load_model(write_gguf(tmp_path / "q8.gguf", model, Q.Q8_0))
    layer = loaded.get_submodule(fp8_layer_names(model)[0])
    assert layer.compute_dtype == torch.bfloat16 and layer.qweight.dtype == torch.uint8
    x, t, context, _ = dit_inputs(model.config)
    with torch.no_grad():
        reference, out = model(x, t, context), loaded(x, t, context)
    assert (out.float() - reference).abs().max() <= 0.06 * reference.abs().max()


def test_quantize_none_dequantizes_everything(tmp_path):
    model = tiny_dit()
    loaded = wanx.load_model(write_gguf(tmp_path / "q8.gguf", model, Q.Q8_0), dtype=torch.float32, quantize="none")
    assert not any(isinstance(m, GGUFLinear) for m in loaded.modules())
    assert loaded.blocks[0].self_attn.q.weight.dtype == torch.float32
    from wanx.memory.fp8 import FP8Linear  # --fp8: dequantized, then re-quantized to fp8 per channel

    fp8 = wanx.load_model(tmp_path / "q8.gguf", quantize="fp8")
    assert all(isinstance(fp8.get_submodule(n), FP8Linear) for n in fp8_layer_names(model))


def test_inspect_names_the_quant_types_and_bytes(tmp_path):
    model = tiny_dit()
    path = write_gguf(tmp_path / "mixed.gguf", model, Q.Q4_0)
    info = inspect_checkpoint(path)
    n_linear = len(fp8_layer_names(model))
    assert info.layout == "gguf" and info.network == "dit" and info.config == model.config
    assert info.dtypes["Q4_0"] == sum(model.get_submodule(n).weight.numel() for n in fp8_layer_names(model))
    assert f"Q4_0 x {n_linear}" in info.gguf and "architecture wan" in info.gguf
    assert "gguf:       architecture wan" in info.summary()
    assert info.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["llama", "t5encoder"])  # a language model; city96's umT5 encoder GGUF
def test_another_architecture_is_refused_in_one_line(tmp_path, capsys, arch):
    from wanx.cli import main

    path = write_gguf(tmp_path / f"{arch}.gguf", tiny_dit(), Q.Q8_0, arch=arch)
    with pytest.raises(CheckpointError, match=rf"a GGUF of architecture '{arch}', not a Wan DiT; .*text encoders") as err:
        wanx.load_model(path)
    assert "\n" not in str(err.value)
    assert main(["info", str(path)]) != 0
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_truncated_gguf_is_damaged(tmp_path):
    path = write_gguf(tmp_path / "full.gguf", tiny_dit(), Q.Q8_0)
    short = tmp_path / "short.gguf"
    short.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DamagedCheckpoint, match=r"damaged: .*short.gguf: .*truncated") as err:
        wanx.load_model(short)
    assert "\n" not in str(err.value)


def test_unsupported_quant_type_is_named(tmp_path):
    writer_path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(writer_path), "wan")
    # bytes of an IQ4_NL [2, 32] tensor (2 blocks of 18 bytes): the type is what matters here
    writer.add_tensor("patch_embedding.bias", np.zeros((2, 18), dtype=np.uint8), raw_dtype=Q.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"'patch_embedding.bias': GGUF tensor type IQ4_NL is not supported; "
                                              r"supported: .*Q8_0.*Q3_K"):
        wanx.load_model(writer_path)


def test_gguf_suffix_without_the_magic(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf at all")
    with pytest.raises(DamagedCheckpoint, match="does not start with the GGUF magic"):
        wanx.load_model(path)


@pytest.fixture(scope="module")
def gguf_frames(tmp_path_factory):
    """`wanx generate` frames from the tiny model folder, and from GGUF copies of its DiT kept
    in a folder beside the other components (as a downloaded GGUF is used)."""
    import shutil

    from wanx.cli import main
    from wanx.tiny import make_tiny_model
    from wanx.video import read_video

    root = tmp_path_factory.mktemp("gguf-generate")
    floats = make_tiny_model(root / "float")
    folder = root / "gguf"
    shutil.copytree(floats, folder, ignore=shutil.ignore_patterns("diffusion_pytorch_model*"))
    model = wanx.load_model(floats, dtype=torch.float32)
    made = {}

    def run(kind, *extra):
        if (kind, extra) not in made:
            model_path = floats if kind == "float" else folder / f"wan-tiny-{kind}.gguf"
            if kind != "float" and not model_path.exists():
                write_gguf(model_path, model, Q[kind])
            out = root / f"{len(made)}.mp4"
            args = ["generate", "--model", str(model_path), "--prompt", "a cat walks on the grass", "--size", "64x48",
                    "--frames", "5", "--steps", "3", "--seed", "5", "--quiet", *extra, "-o", str(out)]
            assert main(args) == 0
            made[kind, extra] = read_video(out).frames.astype(np.int16)
        return made[kind, extra]

    return run


# Mean frame difference from the float model, of 255 levels, on random tiny weights; both runs
# compute in float32 on the CPU, so it is the quantization alone. Measured: Q8_0 2.4, Q5_0 3.1, Q4_0 3.8
# (FP8, computing in bf16: 3.4, tests/memory/test_offload_cli.py).
FRAME_BOUNDS = {"Q8_0": 6, "Q5_0": 10, "Q4_0": 10}


@pytest.mark.parametrize("kind", sorted(FRAME_BOUNDS))
def test_generate_from_a_gguf_file_writes_close_frames(gguf_frames, kind):
    difference = np.abs(gguf_frames(kind) - gguf_frames("float"))
    assert 0 < difference.mean() <= FRAME_BOUNDS[kind]


def test_gguf_streams_with_offload_blocks(gguf_frames):
    # the packed layers stream as any block's parameters do (on a CPU: the same frames)
    assert np.array_equal(gguf_frames("Q4_0", "--offload", "blocks", "--vram-budget", "0"), gguf_frames("Q4_0"))


def test_resident_bytes_are_the_files_tensor_bytes(tmp_path):
    """Held packed: the loaded quantized layers take exactly the bytes their tensors take in the
    file (Q4_0: 18 bytes per 32 weights), a quarter-ish of bf16's."""
    model = tiny_dit()
    path = write_gguf(tmp_path / "q4.gguf", model, Q.Q4_0)
    loaded = wanx.load_model(path)
    reader = gguf.GGUFReader(path)
    file_bytes = {t.name: int(t.n_bytes) for t in reader.tensors}
    layers = fp8_layer_names(model)
    assert sum(loaded.get_submodule(n).qweight.nbytes for n in layers) == sum(file_bytes[n + ".weight"] for n in layers)
    weights = sum(model.get_submodule(n).weight.numel() for n in layers)
    assert sum(loaded.get_submodule(n).qweight.nbytes for n in layers) * 32 == weights * 18


def test_live_lora_on_a_gguf_base(tmp_path):
    """A LoRA on packed layers loads live (adapters beside the packed weight): the same output as
    the same LoRA live on the dequantized weights; fusing is refused in one line (lossy)."""
    from tests.lora.test_lora import factors, write
    from wanx.lora import LoraError, apply_lora, remove_lora

    model = tiny_dit()
    path = write_gguf(tmp_path / "q4.gguf", model, Q.Q4_0)
    state = write("official", factors(model))
    packed = wanx.load_model(path, dtype=torch.float32)
    floats = wanx.load_model(path, dtype=torch.float32, quantize="none")
    x, t, context, _ = dit_inputs(model.config)
    with torch.no_grad():
        base = packed(x, t, context)
        report = apply_lora(packed, state)
        apply_lora(floats, state, fuse=False)
        out, reference = packed(x, t, context), floats(x, t, context)
    assert not report.fused and report.matched == report.modules == 7 * model.config.num_layers
    assert (out - base).abs().max() > 0.01 * base.abs().max()  # the LoRA does something
    assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()
    with pytest.raises(LoraError, match="a GGUF base keeps its weights packed: fusing would dequantize"):
        apply_lora(packed, state, fuse=True, name="again")
    remove_lora(packed, report.name)
    with torch.no_grad():
        assert torch.equal(packed(x, t, context), base)


def test_a_model_folder_holding_a_gguf_dit(tmp_path):
    """--model FOLDER finds a GGUF DiT among the other components (GGUFs of other networks,
    e.g. a llama text model, are passed over as other non-Wan files are)."""
    import shutil

    from wanx.hub import find_model
    from wanx.tiny import make_tiny_model

    floats = make_tiny_model(tmp_path / "float")
    folder = tmp_path / "gguf"
    shutil.copytree(floats, folder, ignore=shutil.ignore_patterns("diffusion_pytorch_model*"))
    write_gguf(folder / "wan-tiny-Q8_0.gguf", wanx.load_model(floats), Q.Q8_0)
    (folder / "other").mkdir()
    write_gguf(folder / "other" / "llama.gguf", tiny_dit(), Q.Q8_0, arch="llama")
    files = find_model(folder)
    assert files.dit == folder / "wan-tiny-Q8_0.gguf"


def test_streaming_moves_the_packed_bytes(tmp_path):
    """Block streaming moves the packed weights: per step, the bf16 blocks' bytes less what each
    quantized weight saves (Q8_0: 34 bytes per 32 weights instead of 64; Q4_0: 18)."""
    from wanx.memory.streaming import BlockStreamer

    model = tiny_dit()
    layers = fp8_layer_names(model)
    weights = sum(model.get_submodule(n).weight.numel() for n in layers)
    bf16 = BlockStreamer(wanx.load_model(write_gguf(tmp_path / "f16.gguf", model, Q.F16), dtype=torch.bfloat16), "cpu", 0)
    x, t, context, _ = dit_inputs(model.config)
    for kind, size in (("Q8_0", 34), ("Q4_0", 18)):
        loaded = wanx.load_model(write_gguf(tmp_path / f"{kind}.gguf", model, Q[kind]), dtype=torch.bfloat16)
        streamer = BlockStreamer(loaded, "cpu", 0)
        with torch.no_grad():
            loaded(x, t, context)
        assert streamer.stats.moved_bytes == streamer.stats.streamed
        assert bf16.stats.streamed - streamer.stats.streamed == weights * 2 - weights // 32 * size, kind
        streamer.remove()
    bf16.remove()


def test_a_lora_trains_on_a_gguf_base(tmp_path):
    """The trainer's LoRA attaches to the packed layers and learns (gradients reach the adapters
    through the dequantized matmul); the packed weights stay frozen and unchanged."""
    from wanx.training.trainable import add_trainable_lora

    model = tiny_dit()
    dit = wanx.load_model(write_gguf(tmp_path / "q4.gguf", model, Q.Q4_0), dtype=torch.float32)
    packed = {n: m.qweight.clone() for n, m in dit.named_modules() if isinstance(m, GGUFLinear)}
    adapters = add_trainable_lora(dit, 4, 4.0, ("q", "v", "ffn.0"), torch.Generator().manual_seed(0))
    assert len(adapters) == 5 * model.config.num_layers and all(  # q, v of both attentions, ffn.0
        isinstance(dit.get_submodule(n), GGUFLinear) for n in adapters)
    params = [p for a in adapters.values() for p in (a.down, a.up)]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    x, t, context, _ = dit_inputs(model.config)
    target = torch.zeros_like(x)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(dit(x, t, context), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.95, losses
    assert all(torch.equal(m.qweight, packed[n]) for n, m in dit.named_modules() if isinstance(m, GGUFLinear))


def test_full_training_on_a_gguf_base_is_refused(tmp_path):
    from wanx.training.recipe import TrainConfig
    from wanx.training.trainable import Trainable

    dit = wanx.load_model(write_gguf(tmp_path / "q8.gguf", tiny_dit(), Q.Q8_0))
    with pytest.raises(ValueError, match="--full trains every weight: a GGUF DiT's are packed"):
        Trainable(dit, TrainConfig(data=tmp_path, output=tmp_path / "out", full=True))


# -- Wan2.2 ---------------------------------------------------------------------------------------


def _gguf_copy(tmp_path, tiny: str, ggufs: dict[str, str], kinds=(Q.Q8_0, Q.Q4_0)):
    """A copy of a tiny model set with its DiT(s) as GGUF files named as released: `ggufs` maps
    the DiT's place in the tiny set ("." or an expert folder) to the GGUF's path in the copy."""
    import shutil

    from wanx.tiny import tiny_model_dir

    floats = tiny_model_dir(tiny)
    folder = tmp_path / tiny
    shutil.copytree(floats, folder, ignore=shutil.ignore_patterns("diffusion_pytorch_model*", "*_noise_model"))
    for (source, name), kind in zip(ggufs.items(), kinds):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        write_gguf(folder / name, wanx.load_model(floats / source, dtype=torch.float32), kind)
    return floats, folder


def _latents(model, **extra):
    from wanx.pipeline import WanPipeline

    pipe = WanPipeline.from_pretrained(model, device="cpu", dtype=torch.float32, offload="none")
    return pipe("a cat walks", height=32, width=32, num_frames=5, num_inference_steps=4, seed=3,
                output_type="latents", progress=False, **extra), pipe


@pytest.mark.parametrize("high, low", [
    ("Wan2.2-T2V-A14B-HighNoise-Q8_0.gguf", "Wan2.2-T2V-A14B-LowNoise-Q4_0.gguf"),  # QuantStack
    ("HighNoise/Wan2.2-T2V-A14B-high-noise-Q8_0.gguf", "LowNoise/Wan2.2-T2V-A14B-low-noise-Q4_0.gguf"),
    ("wan2.2_t2v_high_noise_14B_Q8_0.gguf", "wan2.2_t2v_low_noise_14B_Q4_0.gguf"),  # bullerwins, as ComfyUI's
])
def test_wan22_expert_ggufs_are_found_as_the_pair(tmp_path, high, low):
    """Two GGUF expert files beside the other components are Wan2.2 A14B's pair, told apart by
    their names as the released GGUFs are named, each kept packed in its own quant type."""
    from wanx.hub import find_model

    _, folder = _gguf_copy(tmp_path, "tiny-moe", {"high_noise_model": high, "low_noise_model": low})
    files = find_model(folder)
    assert (files.dit, files.dit_low) == (folder / high, folder / low) and files.moe
    assert [files.infos[n].expert for n in ("dit", "dit_low")] == ["high", "low"]
    assert [files.infos[n].layout for n in ("dit", "dit_low")] == ["gguf", "gguf"]


def test_wan22_expert_ggufs_generate_close_to_the_float_experts(tmp_path):
    """tiny-moe with its experts as Q8_0 (high noise) and Q4_0 (low noise) GGUFs: both experts
    packed in the pipeline, latents close to the float experts'. Measured: 0.84% RMS."""
    floats, folder = _gguf_copy(tmp_path, "tiny-moe", {"high_noise_model": "Wan2.2-T2V-A14B-HighNoise-Q8_0.gguf",
                                                       "low_noise_model": "Wan2.2-T2V-A14B-LowNoise-Q4_0.gguf"})
    reference, _ = _latents(floats)
    latents, pipe = _latents(folder)
    kinds = [{m.qtype for m in dit.modules() if isinstance(m, GGUFLinear)} for dit in (pipe.dit, pipe.dit_low)]
    assert kinds == [{"Q8_0"}, {"Q4_0"}]
    error = ((latents - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()
    assert 0 < error <= 0.03, error


def test_a_ti2v_5b_gguf_generates_close_to_the_float_dit(tmp_path):
    """TI2V-5B's DiT (48 latent channels, on the Wan2.2 VAE) as a GGUF, text and image to video.
    Q8_0; measured: 0.063% RMS (text), 0.060% (image)."""
    floats, folder = _gguf_copy(tmp_path, "tiny-ti2v", {".": "Wan2.2-TI2V-5B-Q8_0.gguf"})
    for extra in ({}, {"image": torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1}):
        reference, _ = _latents(floats, **extra)
        latents, pipe = _latents(folder, **extra)
        assert pipe.dit.config.model_type == "ti2v" and latents.shape[1] == 48
        assert any(isinstance(m, GGUFLinear) for m in pipe.dit.modules())
        error = ((latents - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()
        assert 0 < error <= 0.005, (extra.keys(), error)
