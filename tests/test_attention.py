import pytest
import torch

from wanx import attention as attn


def reference(q, k, v, k_lens=None):
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / q.shape[-1] ** 0.5
    if k_lens is not None:
        keep = torch.arange(k.shape[1])[None, :] < k_lens[:, None]
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v)


def test_sdpa_matches_reference_with_key_lengths():
    q, k, v = (torch.randn(2, 5, 3, 16) for _ in range(3))
    lens = torch.tensor([5, 2])
    assert torch.allclose(attn.attention(q, k, v), reference(q, k, v), atol=1e-5)
    out = attn.attention(q, k, v, k_lens=lens)
    assert torch.allclose(out, reference(q, k, v, lens), atol=1e-5)
    # keys past the length do not matter
    k2, v2 = k.clone(), v.clone()
    k2[1, 2:], v2[1, 2:] = 100.0, -100.0
    assert torch.allclose(attn.attention(q, k2, v2, k_lens=lens), out, atol=1e-5)


def test_backend_choice_falls_back_to_sdpa_on_cpu(monkeypatch, caplog):
    monkeypatch.setattr(attn, "_backend", attn._backend)  # module state: restored after this test
    q = torch.randn(1, 4, 2, 8)
    for name in ("auto", "flash2", "flash3", "sage"):
        attn.set_attention_backend(name)
        assert attn._pick(q, masked=False) == "sdpa"
        assert torch.allclose(attn.attention(q, q, q), reference(q, q, q), atol=1e-5)
    attn.set_attention_backend("auto")
    monkeypatch.setattr(attn, "_backend", None)
    monkeypatch.setenv("WANX_ATTENTION", "sdpa")
    assert attn.get_attention_backend() == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn.set_attention_backend("xformers")
