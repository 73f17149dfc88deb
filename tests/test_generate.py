"""End to end: `wanx generate` on tiny random-weight models writes real mp4 files."""


import numpy as np
import pytest
from PIL import Image

from wanx.cli import main
from wanx.video import Video, read_video

FAST = ["--size", "64x48", "--frames", "9", "--steps", "3", "--quiet"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    first, last = folder / "first.png", folder / "last.jpg"
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(first)
    Image.fromarray(rng.integers(0, 255, (90, 100, 3), dtype=np.uint8)).save(last)
    clip = folder / "input.mp4"
    Video(rng.integers(0, 255, (20, 48, 64, 3), dtype=np.uint8), fps=16).save(clip)
    return {"first": first, "last": last, "video": clip}


def frames_of(path):
    video = read_video(path)
    return video.frames, video.fps


def generate(tmp_path, name, *args):
    out = tmp_path / name
    assert main(["generate", *FAST, *args, "--output", str(out)]) == 0
    return out


def test_t2v_same_seed_same_frames_and_metadata(tmp_path):
    a = generate(tmp_path, "a.mp4", "--model", "tiny", "--prompt", "a cat walks", "--seed", "7")
    b = generate(tmp_path, "b.mp4", "--model", "tiny", "--prompt", "a cat walks", "--seed", "7")
    c = generate(tmp_path, "c.mp4", "--model", "tiny", "--prompt", "a cat walks", "--seed", "8")
    fa, fps = frames_of(a)
    assert fa.shape == (9, 48, 64, 3) and fps == 16
    # Bit-equal on purpose: both runs memory-map the same files at the same offsets (so the
    # same alignment and kernels) and draw the same noise from the same seed.
    assert np.array_equal(fa, frames_of(b)[0])
    assert not np.array_equal(fa, frames_of(c)[0])
    import av

    with av.open(str(a)) as container:
        meta = container.metadata
    assert meta.get("prompt") == "a cat walks" and meta.get("seed") == "7" and meta.get("model") == "tiny"


def test_i2v_size_follows_the_image(tmp_path, images):
    out = generate(tmp_path, "i2v.mp4", "--model", "tiny-i2v", "--prompt", "the cat turns", "--image",
                   str(images["first"]), "--seed", "1")
    frames, fps = frames_of(out)
    # 60x80 (3:4) image within a 64x48 area: the official rounding gives 48x64 (lat 6x8).
    assert frames.shape == (9, 48, 64, 3) and fps == 16


def test_flf2v(tmp_path, images):
    out = generate(tmp_path, "flf.mp4", "--model", "tiny-flf2v", "--prompt", "from day to night", "--image",
                   str(images["first"]), "--last-image", str(images["last"]), "--seed", "1")
    assert frames_of(out)[0].shape == (9, 48, 64, 3)


def test_v2v(tmp_path, images):
    out = generate(tmp_path, "v2v.mp4", "--model", "tiny", "--prompt", "make it snow", "--video",
                   str(images["video"]), "--strength", "0.5", "--seed", "1")
    assert frames_of(out)[0].shape == (9, 48, 64, 3)


def test_batch_prompts_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a cat\n# a comment\n{"prompt": "a dog", "seed": 5, "frames": 5}\n', encoding="utf-8")
    assert main(["generate", *FAST, "--model", "tiny", "--prompts", str(prompts), "--seed", "2",
                 "--output", str(tmp_path / "batch")]) == 0
    files = sorted((tmp_path / "batch").glob("*.mp4"))
    assert [f.name for f in files] == ["000-seed2.mp4", "001-seed5.mp4"]
    assert frames_of(files[1])[0].shape[0] == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "tiny", "--prompt", "x", "--size", "100x48"], "--size width 100 is not a multiple of 16; nearest valid: 96 or 112"),
        (["--model", "tiny", "--prompt", "x", "--frames", "10"], "--frames 10 must be 4k\\+1"),
        (["--model", "tiny", "--prompt", "x", "--image", "{first}"], "this is a T2V model"),
        (["--model", "tiny-i2v", "--prompt", "x"], "this is an I2V model: give --image"),
        (["--model", "tiny-i2v", "--prompt", "x", "--image", "{bad_image}"], "not a readable image"),
        (["--model", "tiny", "--prompt", "x", "--video", "{bad_image}"], "not a readable video"),
        (["--model", "tiny-i2v", "--prompt", "x", "--image", "{missing}"], "no such image file"),
        (["--model", "{incomplete}", "--prompt", "x"], "has no VAE; expected Wan2.1_VAE.pth"),
        (["--model", "tiny", "--prompt", "x", "--output", "{unwritable}"], "cannot write there"),
        (["--model", "tiny"], "give --prompt"),
    ],
)
def test_bad_inputs(tmp_path, images, capsys, args, message):
    import shutil

    from wanx.tiny import tiny_model_dir

    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(b"not an image")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_model_dir("tiny"), incomplete)
    (incomplete / "Wan2.1_VAE.pth").unlink()
    a_file = tmp_path / "a-file"
    a_file.write_text("", encoding="utf-8")
    values = dict(first=images["first"], bad_image=bad_image, missing=tmp_path / "nope.png", incomplete=incomplete,
                  unwritable=a_file / "out.mp4")  # under a file: unwritable even for root
    args = [a.format(**values) for a in args]
    out = tmp_path / "out.mp4"
    if "--output" not in args:
        args += ["--output", str(out)]
    code = main(["generate", *FAST, *args])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("wanx: error: ") and "\n" not in err
    assert __import__("re").search(message, err), err
    assert not out.exists() and not list(tmp_path.glob(".*.partial"))


def test_tiny_defaults_and_quiet_still_says_where_and_which_seed(tmp_path, capsys, monkeypatch):
    """Nothing but a prompt on a tiny set: its own small defaults (64x64, 5 frames, 4 steps),
    not the official 832x480x81 at 50 steps; -q drops the progress, never the line that says
    where the video went and with which (random) seed, on stdout."""
    import re

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "tiny", "--prompt", "a cat", "-q"]) == 0
    out, err = capsys.readouterr()
    match = re.fullmatch(r"outputs/000-seed(\d+)\.mp4  \(seed (\d+), 5 frames, 64x64\)\n", out)
    assert match and match[1] == match[2], out
    assert err == ""
    import av

    with av.open(str(tmp_path / "outputs" / f"000-seed{match[1]}.mp4")) as container:
        assert container.metadata.get("steps") == "4"


@pytest.mark.parametrize("steps,shift", [(20, 3.0), (50, 5.0)])  # the demo model's, the official T2V's
def test_v2v_strength_is_diffusers_get_timesteps(steps, shift):
    """--strength means what it means in diffusers' WanVideoToVideoPipeline: the last
    int(steps x strength) steps run, from the input noised (scheduler.add_noise) to the first
    of them. 0.63 x 20 = 12.6 is 12 steps there (wanx rounded to 13 before)."""
    from types import SimpleNamespace

    import torch
    from diffusers import UniPCMultistepScheduler, WanVideoToVideoPipeline

    from wanx.pipeline import strength_schedule
    from wanx.sampling import noise_to, schedule

    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 2, 4, 4, generator=gen), torch.randn(1, 16, 2, 4, 4, generator=gen)
    for strength in (0.3, 0.5, 0.6, 0.63, 0.75, 0.8, 0.96, 1.0):
        ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                      num_train_timesteps=1000, flow_shift=shift)
        ref.set_timesteps(sigmas=np.linspace(0.999, 0, steps + 1)[:-1].copy())  # the official grid (test_sampling)
        kept, run = WanVideoToVideoPipeline.get_timesteps(SimpleNamespace(scheduler=ref), steps, ref.timesteps,
                                                          strength, "cpu")
        sigmas, timesteps = strength_schedule(*schedule("unipc", steps, shift), strength)
        assert timesteps.tolist() == kept.tolist() and len(timesteps) == run, strength
        noised = noise_to(x0, noise, float(sigmas[0]))
        assert torch.allclose(noised, ref.add_noise(x0, noise, kept[:1]), atol=1e-6), strength
    # diffusers' float artefact is not copied: 50 x 0.58 = 28.999... runs 29 steps (diffusers: 28)
    assert len(strength_schedule(*schedule("unipc", 50, 5.0), 0.58)[1]) == 29
    assert len(strength_schedule(*schedule("unipc", 50, 5.0), 0.001)[1]) == 1  # at least one step


def test_v2v_says_what_the_strength_does(images, capsys):
    from wanx.pipeline import WanPipeline

    pipe = WanPipeline.from_pretrained("tiny", device="cpu")
    pipe("make it snow", video=str(images["video"]), strength=0.6, num_inference_steps=20, num_frames=5, seed=1,
         output_type="latents")
    assert "video-to-video: strength 0.6 runs the last 12 of 20 steps, from the input noised to sigma 0.88" \
        in capsys.readouterr().err


def test_lcm_with_a_timestep_list(tmp_path):
    """The 4-step release recipe on the command line: lcm on an explicit step list (agreeing
    with --steps; the tiny folder's own 4 steps give way), same seed same video."""
    import av

    args = ["--model", "tiny", "--prompt", "a cat", "--seed", "3", "--sampler", "lcm", "--guidance", "1",
            "--timesteps", "1000,750,500"]
    a, b = generate(tmp_path, "a.mp4", *args), generate(tmp_path, "b.mp4", *args)
    assert np.array_equal(frames_of(a)[0], frames_of(b)[0])
    with av.open(str(a)) as container:
        meta = container.metadata
    assert meta.get("sampler") == "lcm" and meta.get("steps") == "3" and "750" in meta.get("timesteps", ""), meta
    out = tmp_path / "c.mp4"
    assert main(["generate", "--model", "tiny", "--prompt", "a cat", "--timesteps", "1000,500", "--quiet",
                 "--size", "64x48", "--frames", "5", "--output", str(out)]) == 0  # no --steps: the list's 2
    with av.open(str(out)) as container:
        assert container.metadata.get("steps") == "2"
