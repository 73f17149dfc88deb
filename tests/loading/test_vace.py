"""VACE checkpoints: the official, diffusers and ComfyUI layouts load to the same weights, bit
for bit; `wanx info` names the model; Wan2.2 VACE-Fun experts pair like other experts; a file
whose VACE blocks do not match its config stops in one line."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import wanx
from tests.models.test_vace import FOUR_BLOCKS, TWO_BLOCKS, relative, tiny_vace, vace_inputs
from tests.oracles import (
    assert_same_outputs, assert_same_tensors, write_comfy_dit, write_diffusers_dit, write_official_dit,
)
from wanx.configs import dit_config
from wanx.loading import CheckpointError, inspect_checkpoint, model_name
from wanx.models.vace import VaceWanDiT


@pytest.mark.parametrize("cfg", [TWO_BLOCKS, FOUR_BLOCKS], ids=["2-blocks", "4-blocks"])
def test_layouts_load_to_identical_weights(tmp_path, cfg):
    model = tiny_vace(cfg)
    paths = {
        "official": write_official_dit(tmp_path / "official", model),
        "official-sharded": write_official_dit(tmp_path / "sharded", model, shards=3),
        "diffusers": write_diffusers_dit(tmp_path / "diffusers", model),
        "comfyui": write_comfy_dit(tmp_path / "comfy", model),  # no vace_layers beside it: inferred
    }
    x, t, context, vace = vace_inputs(cfg, batch=1)
    with torch.no_grad():
        expected = model(x, t, context, vace_context=vace)
        for layout, path in paths.items():
            loaded = wanx.load_model(path)
            assert type(loaded) is VaceWanDiT and loaded.config == model.config, layout
            assert_same_tensors(loaded.state_dict(), model.state_dict(), layout)
            assert_same_outputs(loaded(x, t, context, vace_context=vace), expected, layout)
            info = inspect_checkpoint(path)
            assert info.layout == layout.split("-")[0] and info.config.model_type == "vace"
            assert "network:    Wan2.1 DiT vace" in info.summary()


def test_info_names_the_released_vace_models():
    assert model_name(dit_config("vace-1.3B")) == "Wan2.1 VACE-1.3B"
    assert model_name(dit_config("vace-14B")) == "Wan2.1 VACE-14B"
    assert model_name(dit_config("vace-14B"), "high") == "Wan2.2 VACE-Fun A14B, high-noise expert"


def test_bf16_and_fp8_files(tmp_path):
    model = tiny_vace()
    path = write_comfy_dit(tmp_path, model, dtype=torch.bfloat16)
    loaded = wanx.load_model(path)
    assert loaded.vace_blocks[0].before_proj.weight.dtype == torch.bfloat16
    assert loaded.vace_blocks[0].modulation.dtype == torch.float32  # an fp32 island, as in the main blocks
    fp8 = wanx.load_model(path, quantize="fp8")
    x, t, context, vace = vace_inputs(model.config, batch=1)
    with torch.no_grad():
        assert relative(fp8(x, t, context, vace_context=vace), loaded(x, t, context, vace_context=vace)) <= 0.06


def test_expert_folders_pair(tmp_path):
    """Wan2.2 VACE-Fun A14B: two VACE DiTs in the official expert folders, found as the two experts."""
    for seed, folder in enumerate(("high_noise_model", "low_noise_model")):
        write_official_dit(tmp_path / folder, tiny_vace(seed=seed), shards=2)
    high, low = inspect_checkpoint(tmp_path / "high_noise_model"), inspect_checkpoint(tmp_path / "low_noise_model")
    assert (high.expert, low.expert) == ("high", "low") and high.config == low.config == TWO_BLOCKS
    assert "high-noise expert" in model_name(high.config, high.expert)


def test_vace_blocks_that_do_not_match_the_config_stop_in_one_line(tmp_path):
    model = tiny_vace(FOUR_BLOCKS)
    folder = write_official_dit(tmp_path / "official", model)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, vace_layers=[0, 1, 2])))
    with pytest.raises(CheckpointError, match=r"vace_layers names 3 VACE layers but the weights hold 2 vace_blocks") as err:
        wanx.load_model(folder)
    assert "\n" not in str(err.value)

    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    state.update({k.replace("vace_blocks.1.", "vace_blocks.2."): v for k, v in state.items() if "vace_blocks.1." in k})
    state = {k: v for k, v in state.items() if "vace_blocks.1." not in k}  # a hole: block 1 missing
    (folder / "config.json").write_text(json.dumps(dict(config, vace_layers=[0, 1, 2])))
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \(vace_blocks\.1\.") as err:
        wanx.load_model(folder)
    assert "\n" not in str(err.value)

    del state["vace_patch_embedding.weight"], state["vace_patch_embedding.bias"]
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor 'vace_patch_embedding.weight'"):
        wanx.load_model(folder)


def test_gguf_vace_file_keeps_the_vace_blocks_packed(tmp_path):
    """A city96-style GGUF of a VACE DiT (as QuantStack's VACE GGUFs): the VACE blocks' Linear
    weights stay packed like the main blocks', and the output stays within the Q8_0 bound."""
    pytest.importorskip("gguf")
    from tests.loading.test_gguf import BOUNDS, Q, write_gguf
    from wanx.memory.gguf import GGUFLinear

    model = tiny_vace()
    path = write_gguf(tmp_path / "wan-vace-tiny.gguf", model, Q.Q8_0)
    loaded = wanx.load_model(path, dtype=torch.float32)
    assert type(loaded) is VaceWanDiT and loaded.config == model.config
    assert isinstance(loaded.vace_blocks[0].before_proj, GGUFLinear)
    assert isinstance(loaded.vace_blocks[1].self_attn.q, GGUFLinear)
    x, t, context, vace = vace_inputs(model.config, batch=1)
    with torch.no_grad():
        error = relative(loaded(x, t, context, vace_context=vace), model(x, t, context, vace_context=vace))
    assert 0 < error <= BOUNDS["Q8_0"], error


def test_a_vace_module_file_alone_is_named(tmp_path):
    """Kijai's `Wan2_1-VACE_module_*` files hold only the VACE part (for ComfyUI to add to a T2V
    DiT): refused in one line that says so, not as "not a Wan checkpoint"."""
    state = {k: v for k, v in tiny_vace().state_dict().items() if k.startswith("vace_")}
    save_file(state, str(tmp_path / "Wan2_1-VACE_module_tiny.safetensors"))
    with pytest.raises(CheckpointError, match="only the VACE blocks of a VACE model") as err:
        inspect_checkpoint(tmp_path / "Wan2_1-VACE_module_tiny.safetensors")
    assert "\n" not in str(err.value)
