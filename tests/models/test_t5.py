import re

import pytest
import torch

import wanx
from tests.oracles import assert_same_outputs, assert_same_tensors, official_state, randomize
from wanx.loading import inspect_checkpoint
from wanx.loading.layouts import TRANSFORMERS_T5, rename
from wanx.models.t5 import UMT5Encoder


def tiny_t5(seed=0):
    return randomize(UMT5Encoder("tiny"), seed, std=0.3)


def transformers_oracle(model):
    """transformers' UMT5EncoderModel with our weights renamed by inverting our own table."""
    from transformers import UMT5Config, UMT5EncoderModel

    c = model.config
    oracle = UMT5EncoderModel(UMT5Config(
        vocab_size=c.vocab, d_model=c.dim, d_kv=c.dim_attn // c.num_heads, d_ff=c.dim_ffn, num_layers=c.num_layers,
        num_heads=c.num_heads, relative_attention_num_buckets=c.num_buckets, relative_attention_max_distance=c.max_dist,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )).eval()
    ours = official_state(model)
    theirs = {k: ours[rename(k, TRANSFORMERS_T5)] for k in oracle.state_dict()}
    oracle.load_state_dict(theirs, strict=True)
    return oracle


def test_matches_transformers_umt5_on_a_padded_batch():
    model = tiny_t5()
    oracle = transformers_oracle(model)
    gen = torch.Generator().manual_seed(0)
    length = 160  # beyond max_dist 128: exercises the log-spaced and clamped buckets
    ids = torch.randint(3, model.config.vocab, (3, length), generator=gen)
    mask = torch.zeros(3, length, dtype=torch.long)
    for row, n in enumerate((160, 37, 5)):
        mask[row, :n] = 1
        ids[row, n:] = 0
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = oracle(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_every_transformers_key_maps():
    model = tiny_t5()
    keys = transformers_oracle(model).state_dict()
    assert {rename(k, TRANSFORMERS_T5) for k in keys} == set(official_state(model))


def test_released_size():
    with torch.device("meta"):
        assert sum(p.numel() for p in UMT5Encoder().parameters()) == 5_680_910_336


@pytest.mark.parametrize("layout", ["official", "transformers"])
def test_loads_through_load_model(tmp_path, layout):
    model = tiny_t5()
    if layout == "official":
        path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
        torch.save(official_state(model), path)
    else:
        transformers_oracle(model).save_pretrained(tmp_path / "text_encoder")
        path = next((tmp_path / "text_encoder").glob("*.safetensors"))
    info = inspect_checkpoint(path)
    assert (info.network, info.layout, info.config) == ("t5", layout, model.config)
    assert "umT5 text encoder" in info.summary() and "preset:     tiny" in info.summary()
    loaded = wanx.load_model(path)
    assert_same_tensors(loaded.state_dict(), model.state_dict(), layout)
    ids = torch.randint(3, 320, (1, 9))
    with torch.no_grad():
        assert_same_outputs(loaded(ids, torch.ones_like(ids)), model(ids, torch.ones_like(ids)), layout)


def test_comfy_fp8_scaled_umt5_file(tmp_path):
    """ComfyUI umt5 files: transformers names, fp8 weights with per-tensor scales, a marker,
    an embedded tokenizer blob. Loading dequantises each weight as weight * scale."""
    from safetensors.torch import save_file

    model = tiny_t5()
    state = {k: v.clone().contiguous() for k, v in transformers_oracle(model).state_dict().items()}
    expected = official_state(model)
    for key in [k for k in state if k.endswith("DenseReluDense.wi_1.weight")]:
        scale = state[key].abs().max() / 448.0
        state[key] = (state[key] / scale).to(torch.float8_e4m3fn)
        state[key.replace(".weight", ".scale_weight")] = scale.reshape(1)
        expected[rename(key, TRANSFORMERS_T5)] = state[key].float() * scale
    state["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    state["spiece_model"] = torch.zeros(64, dtype=torch.uint8)
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(state, str(path))
    info = inspect_checkpoint(path)
    assert info.network == "t5" and info.fp8_scaled and info.config == model.config
    loaded = wanx.load_model(path, dtype=torch.float32)
    # Tensors, not outputs: fp8 -> fp32 times the scale is one exactly rounded multiply per
    # element, bit-identical however it is vectorised.
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
