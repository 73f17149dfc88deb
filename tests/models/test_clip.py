import pytest
import torch
import torch.nn.functional as F

import wanx
from tests.oracles import assert_same_outputs, assert_same_tensors, official_state, randomize
from wanx.loading import inspect_checkpoint
from wanx.models.clip import CLIP_MEAN, CLIP_STD, CLIPVisionEncoder


def tiny_clip(seed=0):
    return randomize(CLIPVisionEncoder("tiny"), seed, std=0.2)


def transformers_oracle(model):
    """transformers' CLIPVisionModel with our weights: fused to_qkv split into q/k/v."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    c = model.config
    oracle = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=c.dim, intermediate_size=c.dim * c.mlp_ratio, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, image_size=c.image_size, patch_size=c.patch_size, hidden_act="gelu",
        layer_norm_eps=c.eps)).eval()
    ours = official_state(model)
    prefix = next(k for k in oracle.state_dict() if k.endswith("embeddings.class_embedding"))[: -len("embeddings.class_embedding")]
    theirs = {
        "embeddings.class_embedding": ours["visual.cls_embedding"].reshape(-1),
        "embeddings.patch_embedding.weight": ours["visual.patch_embedding.weight"],
        "embeddings.position_embedding.weight": ours["visual.pos_embedding"][0],
        "pre_layrnorm.weight": ours["visual.pre_norm.weight"], "pre_layrnorm.bias": ours["visual.pre_norm.bias"],
    }
    for i in range(c.num_layers - 1):
        src, dst = f"visual.transformer.{i}.", f"encoder.layers.{i}."
        for part in ("weight", "bias"):
            q, k, v = ours[src + f"attn.to_qkv.{part}"].chunk(3)
            theirs |= {dst + f"self_attn.q_proj.{part}": q, dst + f"self_attn.k_proj.{part}": k,
                       dst + f"self_attn.v_proj.{part}": v, dst + f"self_attn.out_proj.{part}": ours[src + f"attn.proj.{part}"],
                       dst + f"layer_norm1.{part}": ours[src + f"norm1.{part}"], dst + f"layer_norm2.{part}": ours[src + f"norm2.{part}"],
                       dst + f"mlp.fc1.{part}": ours[src + f"mlp.0.{part}"], dst + f"mlp.fc2.{part}": ours[src + f"mlp.2.{part}"]}
    theirs = {prefix + k: v for k, v in theirs.items()}
    missing, unexpected = oracle.load_state_dict(theirs, strict=False)
    # Only the last block (unused by Wan) and the post-norm stay at their init.
    assert all(f"layers.{c.num_layers - 1}." in k or "post_layernorm" in k for k in missing) and not unexpected
    return oracle


def test_matches_transformers_penultimate_hidden_state():
    model = tiny_clip()
    oracle = transformers_oracle(model)
    images = torch.rand(2, 3, 40, 56) * 2 - 1  # any size: resized to the model's input size
    with torch.no_grad():
        ours = model(images)
        pixels = F.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False) * 0.5 + 0.5
        pixels = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        theirs = oracle(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert ours.shape == (2, 257, 160)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_released_visual_size():
    with torch.device("meta"):
        n = sum(p.numel() for p in CLIPVisionEncoder().parameters())
    # Official visual tower 632,076,800 minus what Wan never uses: the last block, post-norm and head.
    last_block = 4 * 1280 * 1280 + 4 * 1280 + 2 * 1280 * 5120 + 5120 + 1280 + 4 * 1280
    assert n == 632_076_800 - last_block - 2 * 1280 - 1280 * 1024


def test_official_file_loads_and_skips_the_text_tower(tmp_path):
    model = tiny_clip()
    state = official_state(model)
    c = model.config
    state |= {f"visual.transformer.{c.num_layers - 1}.norm1.weight": torch.ones(c.dim),
              "visual.post_norm.weight": torch.ones(c.dim), "visual.head": torch.zeros(c.dim, 16),
              "textual.token_embedding.weight": torch.zeros(10, 8), "log_scale": torch.zeros(())}
    path = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(state, path)
    info = inspect_checkpoint(path)
    assert (info.network, info.layout, info.config) == ("clip", "official", c)
    assert "preset:     tiny" in info.summary() and "CLIP ViT image encoder" in info.summary()
    loaded = wanx.load_model(path)
    assert not any("textual" in k for k in loaded.state_dict())
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    images = torch.rand(1, 3, 30, 30) * 2 - 1
    with torch.no_grad():
        assert_same_outputs(loaded(images), model(images))


def test_bad_images():
    with pytest.raises(ValueError, match="images must be"):
        tiny_clip()(torch.zeros(1, 4, 8, 8))


def test_every_transformers_key_maps_and_fuses_qkv():
    from wanx.loading.layouts import detect, rename

    model = tiny_clip()
    keys = list(transformers_oracle(model).state_dict())
    found = detect(keys)
    assert (found.network, found.layout) == ("clip", "transformers")
    mapped = [rename(k, found.rules) for k in keys]
    names = {m[0] if isinstance(m, tuple) else m for m in mapped if m is not None}
    assert names == set(official_state(model))
    assert sorted(m[1] for m in mapped if isinstance(m, tuple) and m[0].endswith("0.attn.to_qkv.weight")) == [0, 1, 2]


@pytest.mark.parametrize("prefix", ["vision_model.", ""])
def test_transformers_and_comfy_files_load_to_identical_outputs(tmp_path, prefix):
    """diffusers repos' image_encoder/ and ComfyUI's clip_vision_h.safetensors use the
    transformers names (with projection); newer transformers saves them without the prefix."""
    from safetensors.torch import save_file

    model = tiny_clip()
    state = transformers_oracle(model).state_dict()
    state = {prefix + k.removeprefix("vision_model."): v.contiguous() for k, v in state.items()}
    state["visual_projection.weight"] = torch.zeros(16, model.config.dim)
    path = tmp_path / "clip_vision_h.safetensors"
    save_file(state, str(path))
    info = inspect_checkpoint(path)
    assert (info.network, info.layout, info.config) == ("clip", "transformers", model.config)
    loaded = wanx.load_model(path)
    assert_same_tensors(loaded.state_dict(), model.state_dict())  # q/k/v fused back bit for bit
    images = torch.rand(2, 3, 33, 47) * 2 - 1
    with torch.no_grad():
        assert_same_outputs(loaded(images), model(images))
