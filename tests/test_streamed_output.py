"""Outputs written as they are decoded (`output_path`, `wanx generate`): the same video as the
in-memory one, a stopped decode keeps a playable `.partial` file, memory checks count one chunk."""

import re

import numpy as np
import pytest
import torch

import wanx.memory.estimate as estimate_module
from wanx.cli import main
from wanx.memory.estimate import estimate
from wanx.pipeline import WanPipeline
from wanx.video import SavedVideo, Video, read_image, read_video

RUN = dict(seed=5, height=32, width=48, num_frames=33, steps=2, progress=False)  # 9 latent frames: 9 chunks


@pytest.fixture(scope="module")
def pipe():
    return WanPipeline.from_pretrained("tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def in_memory(pipe):
    return pipe("a cat", **RUN)


def png_frames(folder):
    return np.stack([read_image(p) for p in sorted(folder.glob("*.png"))])


def close(a, b) -> bool:
    """The same frames, to the odd rounding (different frames of random weights differ by ~40)."""
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 1


def probe_metadata(path) -> dict:
    import av

    with av.open(str(path)) as container:
        return dict(container.metadata)


def test_streamed_output_is_the_in_memory_video(pipe, in_memory, tmp_path):
    saved = pipe("a cat", output_path=tmp_path / "streamed.mp4", **RUN)
    assert isinstance(saved, SavedVideo) and saved.path == tmp_path / "streamed.mp4"
    assert (len(saved), saved.size, saved.fps, saved.metadata) == \
        (len(in_memory), in_memory.size, in_memory.fps, in_memory.metadata)
    # the same frames through the same encoder and settings (libx264 may differ by a rounding
    # between runs: tests/distributed notes it reading uninitialised memory); PNG frames: exact
    reference = read_video(in_memory.save(tmp_path / "in_memory.mp4")).frames
    assert close(read_video(saved.path).frames, reference)
    assert probe_metadata(saved.path) == probe_metadata(tmp_path / "in_memory.mp4")
    frames = pipe("a cat", output_path=tmp_path / "frames", **RUN)
    assert np.array_equal(png_frames(frames.path), in_memory.frames)
    assert np.array_equal(frames.read().frames, in_memory.frames) and len(saved.read()) == 33
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "in_memory.mp4", "streamed.mp4"]


@pytest.mark.parametrize("name, partial", [("out.mp4", "out.partial.mp4"), ("out", "out.partial")])
def test_stopped_while_decoding_keeps_the_frames_written(pipe, in_memory, tmp_path, name, partial):
    def ctrl_c_at_third_chunk(done, total):
        if done == 3:  # chunks 1 and 2 (1 + 4 frames) are written; the third is decoded, not written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe("a cat", output_path=tmp_path / name, decode_callback=ctrl_c_at_third_chunk, **RUN)
    assert pipe.last_partial == tmp_path / partial
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial]  # no temporary file, no final name
    if name == "out":
        assert np.array_equal(png_frames(tmp_path / partial), in_memory.frames[:5])
    else:  # a finished, playable mp4: the one those 5 frames make saved on their own
        back = read_video(tmp_path / partial).frames
        reference = Video(in_memory.frames[:5], metadata=in_memory.metadata).save(tmp_path / "ref" / "5.mp4")
        assert back.shape == (5, 32, 48, 3) and close(back, read_video(reference).frames)


def test_a_failure_before_any_frame_leaves_nothing(pipe, tmp_path):
    def fail(*args):
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):  # while denoising
        pipe("a cat", output_path=tmp_path / "a.mp4", callback=fail, **RUN)
    with pytest.raises(RuntimeError):  # the first chunk decoded, none written
        pipe("a cat", output_path=tmp_path / "b.mp4", decode_callback=fail, **RUN)
    assert pipe.last_partial is None and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unsupported output type"):
        pipe("a cat", output_path=tmp_path / "c.avi", **RUN)
    with pytest.raises(ValueError, match="quality must be an H.264 CRF"):
        pipe("a cat", output_path=tmp_path / "c.mp4", quality=60, **RUN)
    with pytest.raises(ValueError, match="output_type='latents'"):
        pipe("a cat", output_path=tmp_path / "d.mp4", output_type="latents", **RUN)


def test_memory_check_counts_one_chunk_of_a_streamed_video(pipe, tmp_path, monkeypatch):
    """A device with room for everything but the whole decoded video: the in-memory request is
    refused before any work, the streamed one runs (it never holds those frames)."""
    cfg, size = pipe.dit.config, (RUN["height"], RUN["width"], RUN["num_frames"])
    kwargs = dict(dtype=torch.float32, batch=1)
    streamed, whole = estimate(cfg, *size, stream=True, **kwargs), estimate(cfg, *size, **kwargs)
    assert whole.video - streamed.video == (33 - 4) * 32 * 48 * 3 * 6  # 29 of the 33 frames never held
    monkeypatch.setattr(estimate_module, "available_memory", lambda device: (streamed.total + whole.total) // 2)
    with pytest.raises(ValueError, match="needs about"):
        pipe("a cat", **RUN)

    class Denoising(Exception):
        pass

    def past_the_check(*args):
        raise Denoising

    with pytest.raises(Denoising):  # the memory check passed: the first step ran
        pipe("a cat", output_path=tmp_path / "long.mp4", callback=past_the_check, **RUN)


def test_generate_streams_and_names_the_partial_file_on_ctrl_c(tmp_path, capsys, monkeypatch):
    args = ["generate", "--model", "tiny", "--prompt", "a cat", "--size", "48x32", "--frames", "33", "--steps", "2",
            "--seed", "5", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "out.mp4")]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path / 'out.mp4'}  (seed 5, 33 frames, 48x32)"
    assert len(read_video(tmp_path / "out.mp4")) == 33

    import wanx.pipeline.pipeline as pipeline_module

    chunks = []

    def ctrl_c_at_third_chunk(chunk):  # Ctrl-C arriving while the third chunk is decoded
        chunks.append(chunk)
        if len(chunks) == 3:
            raise KeyboardInterrupt
        return to_pixels(chunk)

    to_pixels = pipeline_module.to_pixels
    monkeypatch.setattr(pipeline_module, "to_pixels", ctrl_c_at_third_chunk)
    assert main([*args, "-o", str(tmp_path / "stopped.mp4")]) == 130
    partial = tmp_path / "stopped.partial.mp4"
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"wanx: interrupted, the frames decoded so far are in {partial}"
    assert len(read_video(partial)) == 5 and not (tmp_path / "stopped.mp4").exists()


def test_generate_checks_a_streamed_output_for_one_chunk_of_frames(tmp_path, capsys, monkeypatch):
    """81 frames of 83200x480 hold 54 GiB decoded, one chunk of them 2.7 GiB: as a gif (held
    whole) the request is refused before loading; as an mp4 (streamed) it passes the check."""
    def loading(*args, **kwargs):
        raise AssertionError("loading")

    monkeypatch.setattr(WanPipeline, "from_files", loading)
    monkeypatch.setattr(estimate_module, "available_memory", lambda device: 20 * 2**30)
    args = ["generate", "--model", "tiny", "--prompt", "x", "--frames", "81", "--size", "83200x480", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "x.gif")]) == 2
    assert re.search(r"needs about 5\d\.\d GiB", capsys.readouterr().err)
    with pytest.raises(AssertionError, match="loading"):
        main([*args, "-o", str(tmp_path / "x.mp4")])
