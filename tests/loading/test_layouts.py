"""Every key of each foreign layout maps onto exactly the official key set."""

import pytest
import torch

from tests.oracles import diffusers_dit, diffusers_vae, official_state, tiny_dit, tiny_vae
from wanx.loading.layouts import DIFFUSERS_DIT, DIFFUSERS_VAE, detect, rename


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v", "tiny-flf2v", "tiny-i2v-A14B", "tiny-ti2v"])
def test_every_diffusers_dit_key_maps(name):
    model = tiny_dit(name)
    official = official_state(model)
    foreign = diffusers_dit(model.config, official).state_dict()
    found = detect(foreign)
    assert (found.network, found.layout) == ("dit", "diffusers")
    mapped = {rename(k, DIFFUSERS_DIT): k for k in foreign}
    assert set(mapped) == set(official)
    for k, v in official.items():  # and each maps onto the same tensor
        assert torch.equal(foreign[mapped[k]], v), k


def test_every_diffusers_vae_key_maps():
    model = tiny_vae()
    official = official_state(model)
    foreign = diffusers_vae(official).state_dict()
    found = detect(foreign)
    assert (found.network, found.layout) == ("vae", "diffusers")
    mapped = {rename(k, DIFFUSERS_VAE): k for k in foreign}
    assert set(mapped) == set(official)
    for k, v in official.items():
        assert torch.equal(foreign[mapped[k]], v), k


def test_released_vae_key_set_maps():
    """The full-size VAE (15 decoder stages' worth of indices) through the same table."""
    from diffusers import AutoencoderKLWan

    from wanx.models.vae import WanVAE

    with torch.device("meta"):
        official = set(WanVAE().state_dict())
        foreign = AutoencoderKLWan().state_dict()
    assert {rename(k, DIFFUSERS_VAE) for k in foreign} == official


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_comfy_prefixes(prefix):
    keys = [prefix + k for k in official_state(tiny_dit())]
    found = detect(keys)
    assert (found.network, found.layout, found.prefix) == ("dit", "comfyui", prefix)


def test_released_wan22_dit_key_sets_map():
    """Full-size Wan2.2 DiTs (one A14B expert each, and TI2V-5B) through the same table, built
    by diffusers with the conversion script's configs (I2V-A14B: no image_dim)."""
    from diffusers import WanTransformer3DModel

    from wanx.configs import dit_config, infer_dit_config
    from wanx.models.transformer import WanDiT

    for preset, extra in (("i2v-A14B", dict(in_channels=36, out_channels=16)),
                          ("ti2v-5B", dict(num_attention_heads=24, num_layers=30, ffn_dim=14336, in_channels=48,
                                           out_channels=48))):
        with torch.device("meta"):
            official = WanDiT(preset).state_dict()
            config = dict(num_attention_heads=40, num_layers=40, ffn_dim=13824, attention_head_dim=128,
                          cross_attn_norm=True, eps=1e-6, qk_norm="rms_norm_across_heads")
            foreign = WanTransformer3DModel(**{**config, **extra}).state_dict()
        assert {rename(k, DIFFUSERS_DIT) for k in foreign} == set(official), preset
        shapes = {rename(k, DIFFUSERS_DIT): tuple(v.shape) for k, v in foreign.items()}
        assert infer_dit_config(shapes) == dit_config(preset)  # I2V without CLIP, TI2V from 48 channels


def test_official_and_unknown():
    assert detect(official_state(tiny_dit())).layout == "official"
    assert detect(official_state(tiny_vae())).network == "vae"
    assert detect(["text_model.encoder.layers.0.weight"]) is None
    with pytest.raises(KeyError):
        rename("blocks.0.attn1.to_qq.weight", DIFFUSERS_DIT)
