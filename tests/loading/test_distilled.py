"""Distilled DiTs (lightx2v StepDistill-CfgDistill, Distill-Models): they load like any DiT, and
`wanx info` says "distilled (N steps, no CFG)" where the file's metadata, the config.json beside
it or the model card says so, in the keys those releases use (see wanx/loading/distilled.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import wanx
from tests.oracles import assert_same_tensors, tiny_dit, write_comfy_dit, write_official_dit
from wanx.cli import main
from wanx.loading import inspect_checkpoint

# lightx2v's configs/distill/wan_i2v_distill_4step_cfg.json, the keys that say "distilled"
LIGHTX2V_CONFIG = {"infer_steps": 4, "sample_guide_scale": 5, "sample_shift": 5, "enable_cfg": False,
                   "denoising_step_list": [1000, 750, 500, 250]}
# the front matter of lightx2v's model cards (and their re-uploads' cards)
MODEL_CARD = """---
license: apache-2.0
pipeline_tag: image-to-video
tags:
  - video generation
  - diffusion-single-file
  - distillation
library_name: diffusers
inference:
  parameters:
    num_inference_steps: 4
base_model:
- Wan-AI/Wan2.1-I2V-14B-480P
---
# Wan2.1-I2V-14B-480P-StepDistill-CfgDistill-Lightx2v

Step distillation and classifier-free guidance distillation: 4 steps without CFG.
"""


def with_metadata(file, metadata):
    save_file(load_file(file), str(file), metadata=metadata)
    return file


def test_safetensors_metadata_says_distilled(tmp_path, capsys):
    model = tiny_dit()
    file = write_comfy_dit(tmp_path, model, name="wan2.1_t2v_14b_lightx2v_4step.safetensors")
    with_metadata(file, {"format": "pt", "denoising_step_list": "[1000, 750, 500, 250]", "enable_cfg": "false"})
    info = inspect_checkpoint(file)
    assert (info.distilled.steps, info.distilled.cfg) == (4, False)
    assert main(["info", str(file)]) == 0
    out = capsys.readouterr().out
    assert "sampling:   distilled (4 steps, no CFG; wan2.1_t2v_14b_lightx2v_4step.safetensors metadata): " \
           "run it with --steps 4 --guidance 1" in out
    # and it loads like any DiT: the same weights, bit for bit
    assert_same_tensors(wanx.load_model(file).state_dict(), model.state_dict(), "distilled")


def test_metadata_as_one_json_config(tmp_path):
    file = write_comfy_dit(tmp_path, tiny_dit())
    with_metadata(file, {"config": json.dumps({"infer_steps": 4, "enable_cfg": False})})
    assert inspect_checkpoint(file).distilled.summary().startswith("distilled (4 steps, no CFG;")


def test_config_json_beside_the_weights(tmp_path):
    folder = write_official_dit(tmp_path / "distill", tiny_dit())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **LIGHTX2V_CONFIG}))
    info = inspect_checkpoint(folder)
    assert (info.distilled.steps, info.distilled.cfg, info.distilled.source) == (4, False, "config.json")
    assert wanx.load_model(folder).config == info.config


def test_model_card(tmp_path, capsys):
    folder = write_official_dit(tmp_path / "Wan2.1-T2V-StepDistill-CfgDistill", tiny_dit())
    (folder / "README.md").write_text(MODEL_CARD)
    assert main(["info", str(folder)]) == 0
    assert "distilled (4 steps, no CFG; README.md): run it with --steps 4 --guidance 1" in capsys.readouterr().out
    # a card that distils steps only keeps CFG on
    (folder / "README.md").write_text(MODEL_CARD.replace("without CFG", "").replace("classifier-free guidance ", "")
                                      .replace("-CfgDistill", ""))
    assert inspect_checkpoint(folder).distilled.summary() == "distilled (4 steps; README.md): run it with --steps 4"


@pytest.mark.parametrize("card", [
    "# Wan2.1-T2V-14B\n\nthe base model, 50 steps\n",  # no front matter
    MODEL_CARD.replace("  - distillation\n", ""),  # no distillation tag
    "---\ntags: [distillation\n---\n",  # broken YAML: said nothing
])
def test_base_models_say_nothing(tmp_path, capsys, card):
    folder = write_official_dit(tmp_path / "base", tiny_dit())
    (folder / "README.md").write_text(card)
    with_metadata(folder / "diffusion_pytorch_model.safetensors", {"format": "pt", "infer_steps": "50"})
    assert inspect_checkpoint(folder).distilled is None
    assert main(["info", str(folder)]) == 0
    assert "distilled" not in capsys.readouterr().out


def test_metadata_strings():
    """Metadata values are strings: JSON ones, and Python's str(False) as some writers leave it."""
    from wanx.loading.distilled import from_settings

    found = from_settings({"infer_steps": "4", "enable_cfg": "False"}, "x")
    assert (found.steps, found.cfg) == (4, False)
    assert from_settings({"infer_steps": "50", "enable_cfg": "true"}, "x") is None  # a base model's run config
