"""`wanx generate` with the memory options writes the same frames as the plain run (FP8:
close ones), and the pipeline's placement keeps its accounting."""

import numpy as np
import pytest
import torch

from wanx.cli import main
from wanx.pipeline import WanPipeline
from wanx.video import read_video

ARGS = ["--model", "tiny", "--prompt", "a cat walks on the grass", "--size", "64x48", "--frames", "5", "--steps", "3",
        "--seed", "5", "--quiet"]


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Frames per option set, made once for the module."""
    import os

    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("WANX_HOME")
    os.environ["WANX_HOME"] = str(home)
    made = {}

    def run(*extra):
        if extra not in made:
            out = home / f"{len(made)}.mp4"
            assert main(["generate", *ARGS, *extra, "-o", str(out)]) == 0
            made[extra] = read_video(out).frames.astype(np.int16)
        return made[extra]

    yield run
    if old is None:
        os.environ.pop("WANX_HOME")
    else:
        os.environ["WANX_HOME"] = old


@pytest.mark.parametrize("extra", [("--offload", "blocks", "--vram-budget", "0"), ("--offload", "model"),
                                   ("--vram-budget", "20KB"), ("--t5-device", "cpu", "--offload", "blocks")])
def test_offloaded_runs_write_the_same_frames(frames, extra):
    # Streamed weights are copies in other memory; the uint8 frames absorb any last-ulp difference.
    assert np.array_equal(frames(*extra), frames())


def test_fp8_writes_close_frames(frames):
    difference = np.abs(frames("--fp8") - frames())
    assert 0 < difference.mean() <= 8  # of 255 levels, on random tiny weights (measured 3.4)


def test_pipeline_streams_the_dit_within_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("WANX_HOME", str(tmp_path))
    pipe = WanPipeline.from_pretrained("tiny", offload="blocks", vram_budget=0)
    stats = pipe.placement.dit_stats
    assert stats.budget == 0 and stats.resident == 0 and stats.device_bytes == 0
    pipe("a cat", height=32, width=48, num_frames=5, num_inference_steps=2, seed=1, output_type="latents",
         progress=False)
    assert 0 < stats.peak_device_bytes <= stats.largest_unit  # one unit at a time on a CPU
    assert set(pipe.placement.streamers) == {"dit", "t5"}  # the VAE stays resident
    plain = WanPipeline.from_pretrained("tiny", offload="none")
    assert plain.placement.dit_stats is None
    a = pipe("a cat", height=32, width=48, num_frames=5, num_inference_steps=2, seed=1, output_type="latents", progress=False)
    b = plain("a cat", height=32, width=48, num_frames=5, num_inference_steps=2, seed=1, output_type="latents", progress=False)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())


def test_memory_flag_errors_are_one_line(capsys):
    assert main(["generate", *ARGS, "--offload", "model", "--vram-budget", "1GB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "wanx: error: a VRAM budget streams DiT blocks: it cannot go with offload 'model'"
    assert main(["generate", *ARGS, "--vram-budget", "plenty"]) == 2
    assert "not a number of bytes" in capsys.readouterr().err
