"""Wan2.2-Animate checkpoints: the official (with its blur-kernel buffers), diffusers and ComfyUI
layouts load to the same weights, bit for bit; the config is read from the tensors; `wanx
info` names the model."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import wanx
from tests.models.test_animate import FOUR_BLOCKS, TINY, animate_inputs, relative, tiny_animate
from tests.oracles import (
    assert_same_outputs, assert_same_tensors, write_comfy_dit, write_diffusers_dit, write_official_dit,
)
from wanx.configs import dit_config
from wanx.loading import CheckpointError, inspect_checkpoint, model_name
from wanx.models.animate import AnimateWanDiT


def _with_blur_kernels(path, model):
    """The released file's extra tensors: each blurred conv's kernel buffer (`...conv2.0.kernel`,
    `...skip.0.kernel`), as the official `Blur` registers it."""
    state = load_file(str(path))
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = (k[None, :] * k[:, None]) / 64
    for i in range(1, len(model.config.motion_encoder_channels)):
        for part in ("conv2", "skip"):
            state[f"motion_encoder.enc.net_app.convs.{i}.{part}.0.kernel"] = kernel.clone()
    save_file(state, str(path))


@pytest.mark.parametrize("cfg", [TINY, FOUR_BLOCKS], ids=["tiny-animate", "4-blocks"])
def test_layouts_load_to_identical_weights(tmp_path, cfg):
    model = tiny_animate(cfg)
    official = write_official_dit(tmp_path / "official", model)
    _with_blur_kernels(official / "diffusion_pytorch_model.safetensors", model)
    paths = {
        "official": official,
        "official-sharded": write_official_dit(tmp_path / "sharded", model, shards=3),
        "diffusers": write_diffusers_dit(tmp_path / "diffusers", model),
        "comfyui": write_comfy_dit(tmp_path / "comfy", model),  # only num_heads beside it: the rest inferred
    }
    inputs = animate_inputs(cfg, batch=1)
    with torch.no_grad():
        expected = model(**inputs)
        for layout, path in paths.items():
            loaded = wanx.load_model(path)
            assert type(loaded) is AnimateWanDiT and loaded.config == model.config, layout
            assert_same_tensors(loaded.state_dict(), model.state_dict(), layout)
            assert_same_outputs(loaded(**inputs), expected, layout)
            info = inspect_checkpoint(path)
            assert info.layout == layout.split("-")[0] and info.config.model_type == "animate"
            assert "network:    Wan2.2 DiT animate" in info.summary()


def test_info_names_the_released_animate_model():
    assert model_name(dit_config("animate-14B")) == "Wan2.2 Animate-14B"


def test_bf16_and_fp8_files(tmp_path):
    model = tiny_animate()
    path = write_comfy_dit(tmp_path, model, dtype=torch.bfloat16)
    loaded = wanx.load_model(path)
    assert loaded.face_adapter.fuser_blocks[0].linear1_kv.weight.dtype == torch.bfloat16
    assert loaded.motion_encoder.dec.direction.weight.dtype == torch.float32  # orthonormalised in float32
    fp8 = wanx.load_model(path, quantize="fp8")
    inputs = animate_inputs(model.config, batch=1)
    with torch.no_grad():
        assert relative(fp8(**inputs), loaded(**inputs)) <= 0.06


def test_a_file_without_its_face_adapter_stops_in_one_line(tmp_path):
    folder = write_official_dit(tmp_path / "official", tiny_animate())
    file = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    save_file({k: v for k, v in state.items() if not k.startswith("face_adapter.")}, str(file))
    with pytest.raises(CheckpointError, match="face_adapter.fuser_blocks.0.linear1_q.weight") as err:
        wanx.load_model(folder)
    assert "\n" not in str(err.value)
