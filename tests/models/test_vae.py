import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


def test_decode_chunks_stream_the_frames_of_decode(vae):
    """The stream yields decode's frames bit for bit, a causal chunk at a time, tiled or not."""
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for tiles in ({}, dict(tile_size=32, tile_stride=(32, 16))):  # 1 tile, 2 overlapping
            calls = []
            chunks = list(vae.decode_chunks(z, callback=lambda done, total: calls.append((done, total)), **tiles))
            assert [c.shape[2] for c in chunks] == [1, 4, 4]
            assert torch.equal(torch.cat(chunks, dim=2), vae.decode(z, **tiles))
            assert calls[-1] == (len(calls), len(calls)) == (3 * (1 + bool(tiles)),) * 2
        assert [c.shape[2] for c in vae.decode_chunks(z, chunk_latents=2)] == [1, 8]
    with pytest.raises(ValueError, match="chunk_latents"):  # at the call, before any chunk is asked for
        vae.decode_chunks(z, chunk_latents=0)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages alive at once among those the ops under it create."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, int] = {}  # storage -> tensors seen on it and still alive

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key, nbytes = t.untyped_storage()._cdata, t.untyped_storage().nbytes()
                if key not in self._refs:
                    self._refs[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self._refs[key] += 1
                weakref.finalize(t, self._release, key, nbytes)
        return out

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self.live -= nbytes


@pytest.mark.parametrize("tiles", [{}, dict(tile_size=(128, 256), tile_stride=(128, 128))])
def test_streamed_decode_memory_is_flat_in_length(tiles):
    """The released VAE on the meta device (shapes only, no arithmetic): streaming 4x more
    frames takes the same peak of live tensor bytes (only the latents grow), while `decode`
    grows by the video."""
    with torch.device("meta"):
        vae = WanVAE().eval()

    def peak(latent_frames: int, stream: bool) -> int:
        z = torch.zeros(1, 16, latent_frames, 16, 48, device="meta")  # 128x384 pixels, 2 tiles
        with torch.no_grad(), LiveBytes() as counter:
            if stream:
                for _ in vae.decode_chunks(z, **tiles):
                    pass  # each chunk dropped, as a writer does once it is encoded
            else:
                vae.decode(z, **tiles)
        return counter.peak

    short, long = peak(3, True), peak(12, True)
    video_growth = 4 * 36 * 128 * 384 * 3  # the float32 bytes of 9 latent frames' 36 frames
    assert long - short <= video_growth / 8  # the latents grow (16 channels at 1/64 the pixels), no frame held
    assert peak(12, False) - peak(3, False) >= video_growth  # the measure sees a held video
