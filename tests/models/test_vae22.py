import pytest
import torch

from tests.oracles import diffusers_vae22, latent_stats, official_state, randomize, tiny_vae22
from wanx.configs import VAE22Config, vae_config
from wanx.models.vae import WanVAE
from wanx.models.vae22 import LATENT_MEAN, LATENT_STD, WanVAE22, patchify, unpatchify


@pytest.fixture(scope="module")
def vae():
    return tiny_vae22()


@pytest.fixture(scope="module")
def video():
    gen = torch.Generator().manual_seed(3)
    return torch.rand(1, 3, 9, 32, 48, generator=gen) * 2 - 1  # chunks of 1, 4, 4 frames


def test_released_vae_shapes_and_parameter_count():
    """The official `WanVAE_(dim=160, dec_dim=256, z_dim=48)`: 196 tensors, 704,688,668 parameters."""
    with torch.device("meta"):
        model = WanVAE22()
        state = model.state_dict()
    assert len(state) == 196 and sum(v.numel() for v in state.values()) == 704_688_668
    shapes = {
        "encoder.conv1.weight": (160, 12, 3, 3, 3), "decoder.conv1.weight": (1024, 48, 3, 3, 3),
        "encoder.downsamples.1.downsamples.2.time_conv.weight": (320, 320, 3, 1, 1),
        "encoder.downsamples.3.downsamples.1.residual.6.weight": (640, 640, 3, 3, 3),
        "decoder.upsamples.0.upsamples.3.time_conv.weight": (2048, 1024, 3, 1, 1),
        "decoder.upsamples.2.upsamples.3.resample.1.weight": (512, 512, 3, 3),  # upsampling keeps the width
        "decoder.upsamples.3.upsamples.0.shortcut.weight": (256, 512, 1, 1, 1),
        "encoder.head.2.weight": (96, 640, 3, 3, 3), "decoder.head.2.weight": (12, 256, 3, 3, 3),
        "conv1.weight": (96, 96, 1, 1, 1), "conv2.weight": (48, 48, 1, 1, 1),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert "encoder.downsamples.0.downsamples.2.time_conv.weight" not in state  # stage 0 is spatial only
    assert "decoder.upsamples.2.upsamples.3.time_conv.weight" not in state
    assert model.config == vae_config("wan2.2") == VAE22Config()
    assert (VAE22Config().temporal_stride, VAE22Config().spatial_stride) == (4, 16)


def test_latent_statistics_are_the_official_ones():
    """The 48 means and stds of `Wan2_2_VAE.__init__` (= diffusers' `vae22_diffusers_config`)."""
    assert len(LATENT_MEAN) == len(LATENT_STD) == 48
    assert (LATENT_MEAN[0], LATENT_MEAN[19], LATENT_MEAN[47]) == (-0.2289, 0.5109, -0.0667)
    assert (LATENT_STD[0], LATENT_STD[39], LATENT_STD[47]) == (0.4765, 1.6887, 0.7744)
    assert round(sum(LATENT_MEAN), 4) == -0.5589 and round(sum(LATENT_STD), 4) == 32.536


def test_patchify_channel_order():
    """Channel c*4 + r*2 + q holds the pixel at row offset q, column offset r (official
    `b c f (h q) (w r) -> b (c r q) f h w`; the swapped order gives a 2-px checkerboard)."""
    rows = torch.arange(4).view(1, 1, 1, 4, 1).expand(1, 3, 1, 4, 6)
    cols = torch.arange(6).view(1, 1, 1, 1, 6).expand(1, 3, 1, 4, 6)
    colour = torch.arange(3).view(1, 3, 1, 1, 1)
    x = (100 * colour + 10 * rows + cols).float()
    p = patchify(x, 2)  # [1, 12, 1, 2, 3]
    assert p.shape == (1, 12, 1, 2, 3)
    for c in range(3):
        for r in range(2):
            for q in range(2):
                assert torch.equal(p[0, c * 4 + r * 2 + q], x[0, c, :, q::2, r::2])
    assert torch.equal(unpatchify(p, 2), x)


def test_encode_decode_match_diffusers(vae, video):
    """Every weight random (gains and biases too), official names converted to diffusers'
    by convert_vae_22's renames; diffusers returns the raw mu, wanx the normalised latents."""
    oracle = diffusers_vae22(official_state(vae), vae.config)
    mean, std = latent_stats(WanVAE22)
    with torch.no_grad():
        latents = vae.encode(video)
        expected = (oracle.encode(video).latent_dist.mode() - mean) / std
        assert latents.shape == (1, 48, 3, 2, 3)
        assert (latents - expected).abs().max() <= 1e-4 * expected.abs().max()

        decoded = vae.decode(latents)
        expected_video = oracle.decode(latents * std + mean).sample
        assert decoded.shape == video.shape
        assert (decoded - expected_video).abs().max() <= 1e-4 * expected_video.abs().max()
        assert decoded.abs().max() <= 1 and (expected_video.abs() < 0.999).any()  # clamped, not saturated


def test_streaming_equals_whole_clip(vae, video):
    """Chunked causal processing with the cache is the same math as one pass over the clip,
    parameter-free shortcuts included (AvgDown3D pads only the lone first frame)."""
    with torch.no_grad():
        streamed = vae.encode(video, chunk_frames=4)  # official: 1, 4, 4 frames
        whole = vae.encode(video, chunk_frames=8)
        assert (streamed - whole).abs().max() <= 1e-5 * whole.abs().max()

        one_at_a_time = vae.decode(streamed, chunk_latents=1)  # official schedule
        all_at_once = vae.decode(streamed, chunk_latents=2)
        assert (one_at_a_time - all_at_once).abs().max() <= 1e-5


def test_decode_is_causal(vae, video):
    with torch.no_grad():
        latents = vae.encode(video)
        full = vae.decode(latents)
        prefix = vae.decode(latents[:, :, :2])
    assert prefix.shape[2] == 5
    assert (full[:, :, :5] - prefix).abs().max() <= 1e-6


def test_tiling_at_stride_16_blends_to_the_untiled_result_for_a_local_map(vae):
    """The shared tiling machinery at Wan2.2's 16x stride, both ways: with a position-independent
    local map the blended tiles reproduce the whole exactly."""
    x = torch.randn(1, 48, 2, 10, 14)
    up = lambda z: torch.nn.functional.interpolate(z, scale_factor=(1, 16, 16), mode="nearest")  # noqa: E731
    assert torch.allclose(vae._tiled(x, (4, 6), (3, 4), 16, down=False, fn=up), up(x), atol=1e-6)
    pixels = up(x)
    down = lambda v: torch.nn.functional.avg_pool3d(v, (1, 16, 16))  # noqa: E731
    assert torch.allclose(vae._tiled(pixels, (64, 96), (48, 64), 16, down=True, fn=down), x, atol=1e-5)


def test_tiled_decode_and_encode_stay_close():
    """Tiles in pixels, multiples of 16: 128-px tiles overlapping by 64 px on a 192x256 frame.
    Stated tolerance: mean abs difference <= 0.15 on a [-1, 1] video, <= 20% of the latents'
    mean magnitude. Random weights are far less local than trained ones (each 3x3 conv spreads
    the tile border's zero padding), and Wan2.2's tiles are only 8 latents wide here, so this
    bounds a regression, not the quality on real weights. The mid-block attention projections
    are zero, as the official initialisation leaves them (else every pixel sees the whole frame)."""
    vae = randomize(WanVAE22("tiny-wan2.2"), 0, std=0.1)
    for block in (vae.encoder.middle[1], vae.decoder.middle[1]):
        torch.nn.init.zeros_(block.proj.weight)
        torch.nn.init.zeros_(block.proj.bias)
    gen = torch.Generator().manual_seed(3)
    video = torch.nn.functional.interpolate(torch.rand(1, 3, 5, 6, 8, generator=gen) * 2 - 1, size=(5, 192, 256),
                                            mode="trilinear")
    with torch.no_grad():
        latents = vae.encode(video)
        full = vae.decode(latents)
        tiled = vae.decode(latents, tile_size=128, tile_stride=64)
        assert tiled.shape == full.shape == video.shape
        assert (tiled - full).abs().mean() <= 0.15
        assert torch.equal(vae.decode(latents, tile_size=(192, 256)), full)  # one tile: the untiled path

        tiled_latents = vae.encode(video, tile_size=128, tile_stride=64)
        assert tiled_latents.shape == latents.shape == (1, 48, 2, 12, 16)
        assert (tiled_latents - latents).abs().mean() <= 0.2 * latents.abs().mean()


def test_bf16(vae, video):
    half = tiny_vae22().to(torch.bfloat16)
    clip = video[:, :, :5]
    with torch.no_grad():
        latents = half.encode(clip)
        decoded = half.decode(latents)
        reference = vae.decode(vae.encode(clip))
    assert latents.dtype == torch.float32 and decoded.dtype == torch.float32
    assert (decoded - reference).abs().mean() <= 0.05


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda v: v.encode(torch.zeros(1, 3, 6, 32, 32)), "T = 4k\\+1"),
        (lambda v: v.encode(torch.zeros(1, 3, 5, 40, 32)), "multiples of 16"),
        (lambda v: v.decode(torch.zeros(1, 16, 2, 4, 4)), "latents must be \\[B, 48,"),
        (lambda v: v.decode(torch.zeros(1, 48, 2, 4, 4), tile_size=24), "multiple of 16"),
    ],
)
def test_bad_inputs(vae, call, message):
    with pytest.raises(ValueError, match=message):
        call(vae)


def test_each_class_takes_its_own_config():
    with pytest.raises(ValueError, match="WanVAE22"):
        WanVAE("tiny-wan2.2")
    with pytest.raises(ValueError, match="VAE22Config"):
        WanVAE22("tiny")
