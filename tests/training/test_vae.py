"""Training a small Wan VAE from scratch (the demo model's recipe): the posterior the
encoder exposes is what `encode` normalises, and a few dozen steps on crops of real mp4 clips
lower the reconstruction error; the weights load back with `wanx.load_model`."""

import csv

import torch

from tests.training.test_prepare import moving_square
from wanx.configs import VAEConfig
from wanx.models.vae import WanVAE
from wanx.training.vae import VAETrainConfig, train_vae, vae_loss


def test_posterior_mean_is_what_encode_returns():
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=8)).eval()
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        mu, log_var = vae.posterior(video)
        assert mu.shape == log_var.shape == (1, 16, 2, 4, 4)
        torch.testing.assert_close(vae.normalize(mu), vae.encode(video), rtol=0, atol=0)


def test_reconstruction_error_falls(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = ["file_name,text"]
    for i, color in enumerate([(255, 64, 32), (32, 200, 64), (40, 40, 250)]):
        moving_square(9, color=color, seed=i).save(data / f"c{i}.mp4")
        rows.append(f"c{i}.mp4,square {i}")
    (data / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=8))
    path = train_vae(vae, VAETrainConfig(data=data, output=tmp_path / "out", steps=40, batch_size=2, crop=16,
                                         frames=5, lr=3e-3, warmup_steps=5), progress=False)
    with open(tmp_path / "out" / "vae-log.csv", encoding="utf-8") as fh:
        l1 = [float(r["l1"]) for r in csv.DictReader(fh)]
    assert sum(l1[-5:]) / 5 < 0.6 * sum(l1[:5]) / 5, (l1[:5], l1[-5:])  # measured ~0.5 -> ~0.15
    import wanx

    loaded = wanx.load_model(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vae.state_dict().items())


def test_standardized_latents_are_unit_variance_and_decode_the_same():
    from wanx.training.vae import standardize_latents

    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=8)).eval()
    with torch.no_grad():  # a VAE whose latents are far from unit scale, as a freshly trained one may be
        vae.conv1.weight[:16] *= 0.05
        vae.conv2.weight *= 20
    g = torch.Generator().manual_seed(1)
    videos = [torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1 for _ in range(3)]
    with torch.no_grad():
        before = [vae.decode(vae.encode(v)) for v in videos]
        standardize_latents(vae, videos)
        latents = torch.cat([vae.encode(v).transpose(0, 1).flatten(1) for v in videos], dim=1)
        after = [vae.decode(vae.encode(v)) for v in videos]
    torch.testing.assert_close(latents.mean(1), torch.zeros(16), rtol=0, atol=1e-4)
    torch.testing.assert_close(latents.std(1), torch.ones(16), rtol=0, atol=1e-4)
    for a, b in zip(after, before):  # the round trip is unchanged (folded affine maps, fp32)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_training_loss_passes_the_clamp():
    """The reconstruction loss sees the clamped output but its gradient goes straight through
    the clamp: a decoder pushed out of range everywhere must still be pulled back."""
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=8))
    with torch.no_grad():
        vae.decoder.head[-1].bias.fill_(3.0)  # every pixel out of range
    z = torch.randn(1, 16, 2, 2, 2)
    assert vae.decode(z).max() == 1.0
    raw = vae.decode(z, clamp=False)
    assert raw.min() > 1.0
    torch.testing.assert_close(vae.decode(z), raw.clamp(-1, 1), rtol=0, atol=0)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    loss, _, _ = vae_loss(vae, video, 1e-4, torch.Generator().manual_seed(0))
    loss.backward()
    assert vae.decoder.head[-1].bias.grad.abs().sum() > 0


def test_crops_mark_the_pixels_away_from_the_background():
    """The foreground mask the loss up-weights: exactly the shape's pixels (antialiased edges
    aside), on a black and on a gray background."""
    import numpy as np

    from wanx.demo.shapes import render_clip
    from wanx.training.vae import random_crops

    for background in ("black", "gray"):
        clip = render_clip(("red", "square", "right", background), seed=1, size=32, frames=5)
        video, mask = random_crops([clip], 1, 32, 5, torch.Generator().manual_seed(0))
        assert video.shape == (1, 3, 5, 32, 32) and mask.shape == (1, 1, 5, 32, 32)
        red = torch.from_numpy((clip[..., 0].astype(int) - clip[..., 1]) > 100)  # the shape's solid pixels
        assert mask[0, 0][red].all() and 0 < mask.mean() < 0.3
        corner = np.s_[:, :2, :2]  # background
        assert not mask[0, 0][corner].any()
    # on_foreground: the crops land on the shape (a 16-pixel crop of 64 pixels mostly misses it)
    clips = [render_clip(("white", "circle", "up", "gray"), seed=s, size=64, frames=5) for s in range(4)]
    g = torch.Generator().manual_seed(0)
    hits = [random_crops(clips, 1, 16, 5, g, on_foreground=1.0)[1][0, 0, 0].any() for _ in range(20)]
    misses = [not random_crops(clips, 1, 16, 5, g)[1][0, 0, 0].any() for _ in range(20)]
    assert all(hits) and any(misses)


def test_init_for_training_lets_the_input_through(tmp_path):
    """With PyTorch's default initialisation a small Wan VAE passes almost nothing of its input
    (training sat at a flat output); `init_for_training` (what `from_scratch` runs) lets it
    through and starts the posterior narrow."""
    from wanx.training.vae import INITIAL_LOG_VAR, init_for_training

    g = torch.Generator().manual_seed(1)
    videos = torch.rand(6, 3, 5, 32, 32, generator=g) * 2 - 1

    def spreads(vae):
        with torch.no_grad():
            mu, log_var = vae.posterior(videos)
            out = vae.decode(vae.normalize(mu), clamp=False)
        return mu.std(0).mean(), out.std(0).mean(), log_var.mean()

    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=16))
    mu_before, out_before, log_var_before = spreads(vae)
    init_for_training(vae)
    mu_after, out_after, log_var_after = spreads(vae)
    assert log_var_before.abs() < 1 and (log_var_after - INITIAL_LOG_VAR).abs() < 1
    assert mu_after > 5 * mu_before and out_after > 5 * out_before, (mu_before, mu_after, out_before, out_after)
    # from_scratch in the recipe applies it
    data = tmp_path / "data"
    data.mkdir()
    moving_square(5, seed=0).save(data / "c.mp4")
    (data / "metadata.csv").write_text("file_name,text\nc.mp4,a square\n", encoding="utf-8")
    torch.manual_seed(0)
    fresh = WanVAE(VAEConfig(dim=16))
    train_vae(fresh, VAETrainConfig(data=data, output=tmp_path / "out", steps=1, batch_size=1, crop=16, frames=5,
                                    lr=1e-9, warmup_steps=1, from_scratch=True), progress=False)
    assert (spreads(fresh)[2] - INITIAL_LOG_VAR).abs() < 1


def test_still_weight_keeps_a_still_clips_latent_frames_alike(tmp_path):
    """`still_drift` is the mean square move of a still clip's latent frames from its first;
    training with `still_weight` lowers it where reconstruction alone leaves it free."""
    from wanx.training.vae import still_drift

    data = tmp_path / "data"
    data.mkdir()
    rows = ["file_name,text"]
    for i, color in enumerate([(255, 64, 32), (32, 200, 64)]):
        moving_square(9, color=color, seed=i).save(data / f"c{i}.mp4")
        rows.append(f"c{i}.mp4,square {i}")
    (data / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    still = torch.full((1, 3, 5, 16, 16), -0.5)
    drifts = {}
    for weight in (0.0, 10.0):
        torch.manual_seed(0)
        vae = WanVAE(VAEConfig(dim=8))
        train_vae(vae, VAETrainConfig(data=data, output=tmp_path / f"w{weight}", steps=15, batch_size=2, crop=16,
                                      frames=5, lr=3e-3, warmup_steps=5, from_scratch=True, still_weight=weight),
                  progress=False)
        with torch.no_grad():
            drifts[weight] = float(still_drift(vae, still))
    assert drifts[10.0] < 0.5 * drifts[0.0], drifts
