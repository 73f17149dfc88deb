import pytest
import torch
import torch.nn.functional as F

from tests.oracles import diffusers_vae, latent_stats, official_state, randomize, tiny_vae
from wanx.models.vae import WanVAE


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def video():
    gen = torch.Generator().manual_seed(3)
    return torch.rand(1, 3, 13, 32, 48, generator=gen) * 2 - 1


def test_parameter_count_of_released_vae():
    with torch.device("meta"):
        assert sum(p.numel() for p in WanVAE().parameters()) == 126_892_531


def test_encode_decode_match_diffusers(vae, video):
    """Official-layout weights converted by diffusers' converter; diffusers normalises the
    latents outside the model, the official wrapper (and wanx) inside."""
    oracle = diffusers_vae(official_state(vae))
    mean, std = latent_stats()
    with torch.no_grad():
        latents = vae.encode(video)
        expected = (oracle.encode(video).latent_dist.mode() - mean) / std
        assert latents.shape == (1, 16, 4, 4, 6)
        assert (latents - expected).abs().max() <= 1e-4 * expected.abs().max()

        decoded = vae.decode(latents)
        expected_video = oracle.decode(latents * std + mean).sample
        assert decoded.shape == video.shape
        assert (decoded - expected_video).abs().max() <= 1e-4


def test_streaming_equals_whole_clip(vae, video):
    """Chunked causal processing with the cache is the same math as one pass over the clip."""
    with torch.no_grad():
        streamed = vae.encode(video, chunk_frames=4)  # official: 1, 4, 4, 4 frames
        whole = vae.encode(video, chunk_frames=12)  # first frame, then all 12 at once
        assert (streamed - whole).abs().max() <= 1e-5

        one_at_a_time = vae.decode(streamed, chunk_latents=1)  # official schedule
        all_at_once = vae.decode(streamed, chunk_latents=3)
        assert (one_at_a_time - all_at_once).abs().max() <= 1e-5


def test_decode_is_causal(vae, video):
    """Frames 0..4 decoded from the first two latent frames do not depend on later latents."""
    with torch.no_grad():
        latents = vae.encode(video)
        full = vae.decode(latents)
        prefix = vae.decode(latents[:, :, :2])
    assert prefix.shape[2] == 5
    assert (full[:, :, :5] - prefix).abs().max() <= 1e-6


def test_tiling_blends_to_the_untiled_result_for_a_local_map(vae):
    """With a position-independent local map the blended tiles reproduce the whole exactly,
    so seams come only from the network's receptive field, never from the blending."""
    x = torch.randn(1, 16, 3, 20, 28)
    upsample = lambda z: F.interpolate(z, scale_factor=(1, 8, 8), mode="nearest")  # noqa: E731
    tiled = vae._tiled(x, (8, 8), (5, 6), 8, down=False, fn=upsample)
    assert torch.allclose(tiled, upsample(x), atol=1e-6)


def test_tiled_decode_and_encode_stay_close():
    """Stated tolerance: mean abs difference <= 0.05 on a [-1, 1] video (latents: <= 10% of
    their mean magnitude) for 96-px tiles overlapping by 32 px on a 96x128 frame.

    Random weights are far less local than trained ones (every 3x3 conv spreads the tile
    border's zero padding), so this bounds the regression, not the quality on real weights.
    The mid-block attention projections are zero, as the official initialisation leaves
    them; with them random, attention makes every pixel depend on the whole frame."""
    vae = randomize(WanVAE("tiny"), 0, std=0.1)
    for block in (vae.encoder.middle[1], vae.decoder.middle[1]):
        torch.nn.init.zeros_(block.proj.weight)
        torch.nn.init.zeros_(block.proj.bias)
    gen = torch.Generator().manual_seed(3)
    video = F.interpolate(torch.rand(1, 3, 5, 6, 8, generator=gen) * 2 - 1, size=(5, 96, 128), mode="trilinear")
    with torch.no_grad():
        latents = vae.encode(video)
        full = vae.decode(latents)
        tiled = vae.decode(latents, tile_size=96, tile_stride=64)
        assert tiled.shape == full.shape
        assert (tiled - full).abs().mean() <= 0.05
        # A tile covering the whole frame is exactly the untiled path: one tile, so `_tiled`
        # calls the same decode on the very same latents tensor (no slice, no blend): bit-equal.
        assert torch.equal(vae.decode(latents, tile_size=(96, 128)), full)

        tiled_latents = vae.encode(video, tile_size=96, tile_stride=64)
        assert (tiled_latents - latents).abs().mean() <= 0.1 * latents.abs().mean()


def test_bf16(vae, video):
    half = tiny_vae().to(torch.bfloat16)
    with torch.no_grad():
        latents = half.encode(video)
        decoded = half.decode(latents)
        reference = vae.decode(vae.encode(video))
    assert latents.dtype == torch.float32 and decoded.dtype == torch.float32
    assert (decoded - reference).abs().mean() <= 0.05


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda v: v.encode(torch.zeros(1, 3, 6, 32, 32)), "T = 4k\\+1"),
        (lambda v: v.encode(torch.zeros(1, 3, 5, 30, 32)), "multiples of 8"),
        (lambda v: v.encode(torch.zeros(1, 3, 5, 32, 32), chunk_frames=3), "multiple of 4"),
        (lambda v: v.decode(torch.zeros(1, 4, 2, 4, 4)), "latents must be"),
        (lambda v: v.decode(torch.zeros(1, 16, 2, 4, 4), tile_size=12), "multiple of 8"),
    ],
)
def test_bad_inputs(vae, call, message):
    with pytest.raises(ValueError, match=message):
        call(vae)


def test_decode_reports_progress(vae):
    calls = []
    with torch.no_grad():
        vae.decode(torch.randn(1, 16, 4, 4, 6), callback=lambda done, total: calls.append((done, total)))
        assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
        calls.clear()
        vae.decode(torch.randn(1, 16, 3, 8, 8), tile_size=32, tile_stride=16, chunk_latents=2,
                   callback=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (len(calls), len(calls)) == (2 * 9, 18)  # 2 causal steps x 3x3 tiles


def test_causal_conv_on_cpu_takes_onednn_with_the_plain_result():
    """A small clip falls under PyTorch's size rule for oneDNN and got the naive conv3d (10x
    slower VAE on CPU); CausalConv3d calls oneDNN itself: the values and gradients of the plain
    F.conv3d on the time-padded input, to float rounding."""
    from wanx.models.vae import CausalConv3d

    gen = torch.Generator().manual_seed(5)
    conv = CausalConv3d(16, 8, 3, padding=1)
    x = torch.randn(1, 16, 4, 24, 24, generator=gen, requires_grad=True)
    out = conv(x)
    padded = F.pad(x, (0, 0, 0, 0, 2, 0))  # two zero frames in front: the start of a clip
    ref = F.conv3d(padded, conv.weight, conv.bias, padding=(0, 1, 1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, conv.weight])
    refs = torch.autograd.grad(ref.square().sum(), [x, conv.weight])
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
