"""Wan-Animate-2 checkpoints: the official (`blocks.N.block.` names), diffusers and ComfyUI layouts
load to the same weights, bit for bit; the config is read from the tensors; `wanx info` names it."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

import wanx
from tests.models.test_animate2 import TINY, VARIANT, diffusers_animate2, segment_inputs, tiny_animate2
from tests.oracles import assert_same_outputs, assert_same_tensors, official_state, write_comfy_dit, write_official_dit
from wanx.configs import dit_config
from wanx.loading import CheckpointError, inspect_checkpoint, model_name
from wanx.models.animate2 import Animate2WanDiT


def _outputs(model, inputs):
    cache = model.new_cache()
    t = torch.tensor([600.0])
    model(inputs["ref"], t, inputs["context"], inputs["clip"], inputs["ref_y"], cache=cache, mode="extract")
    return model(inputs["noisy"], t, inputs["context"], inputs["clip"], inputs["y"], cache=cache, mode="cached")


@pytest.mark.parametrize("cfg", [TINY, VARIANT], ids=["tiny-animate2", "no-clip"])
def test_layouts_load_to_identical_weights(tmp_path, cfg):
    model = tiny_animate2(cfg)
    paths = {
        "official": write_official_dit(tmp_path / "official", model),
        "official-sharded": write_official_dit(tmp_path / "sharded", model, shards=3),
        "comfyui": write_comfy_dit(tmp_path / "comfy", model),  # only num_heads beside it: the rest inferred
    }
    diffusers_animate2(cfg, official_state(model)).save_pretrained(tmp_path / "diffusers")
    paths["diffusers"] = tmp_path / "diffusers"
    inputs = segment_inputs(cfg, frames=3 if cfg is VARIANT else 2)
    with torch.no_grad():
        expected = _outputs(model, inputs)
        for layout, path in paths.items():
            loaded = wanx.load_model(path)
            assert type(loaded) is Animate2WanDiT, layout
            assert_same_tensors(loaded.state_dict(), model.state_dict(), layout)
            if layout == "comfyui":  # no config.json with the reference RoPE placement: the release's
                assert loaded.config == (model.config if cfg is TINY else
                                         dataclasses.replace(model.config, refer_offset_t=1, refer_offset_h=0,
                                                             refer_stride=1)), layout
            else:
                assert loaded.config == model.config, layout
            if loaded.config == model.config:
                assert_same_outputs(_outputs(loaded, inputs), expected, layout)
            info = inspect_checkpoint(path)
            assert info.layout == layout.split("-")[0] and info.config.model_type == "animate2"


def test_info_names_the_released_model():
    assert model_name(dit_config("animate2-14B")) == "Wan-Animate-2-14B"


def test_a_file_without_a_block_tensor_stops_in_one_line(tmp_path):
    folder = write_official_dit(tmp_path / "official", tiny_animate2())
    file = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    del state["blocks.3.block.cross_attn.k_img.weight"]
    save_file(state, str(file))
    with pytest.raises(CheckpointError, match="blocks.3.block.cross_attn.k_img.weight") as err:
        wanx.load_model(folder)
    assert "\n" not in str(err.value)
