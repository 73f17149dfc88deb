import numpy as np
import pytest

from wanx.video import Video, read_image, read_video


def moving_square(frames=16, h=32, w=48):
    video = np.zeros((frames, h, w, 3), dtype=np.uint8)
    for i in range(frames):
        video[i, 8:16, 2 * i: 2 * i + 8] = 255
    return video


def test_mp4_round_trip_keeps_count_size_fps(tmp_path):
    path = Video(moving_square(), fps=16, metadata={"prompt": "a square", "seed": 3}).save(tmp_path / "v.mp4")
    back = read_video(path)
    assert back.frames.shape == (16, 32, 48, 3) and back.fps == 16
    assert np.abs(back.frames.astype(int) - moving_square().astype(int)).mean() < 8  # lossy, but close


def test_odd_sizes_are_padded_for_yuv420(tmp_path):
    path = Video(moving_square(5, 31, 47)).save(tmp_path / "odd.mp4")
    assert read_video(path).frames.shape == (5, 32, 48, 3)


def test_frame_rate_resampling(tmp_path):
    path = Video(moving_square(32), fps=32).save(tmp_path / "fast.mp4")
    assert len(read_video(path, fps=16)) == 16
    assert len(read_video(path, fps=16, max_frames=9)) == 9


def test_gif_and_png_folder(tmp_path):
    video = Video(moving_square(6))
    gif = video.save(tmp_path / "v.gif")
    assert read_video(gif).frames.shape == (6, 32, 48, 3)
    folder = video.save(tmp_path / "frames")
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 6 and np.array_equal(read_image(pngs[2]), video.frames[2])
    assert len(video.to_pil()) == 6


def test_webm_is_readable(tmp_path):
    import av

    path = tmp_path / "v.webm"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=16)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for frame in moving_square(8):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert read_video(path).frames.shape == (8, 32, 48, 3)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unsupported output type"):
        Video(moving_square(2)).save(tmp_path / "v.avi")
    with pytest.raises(ValueError, match="frames must be uint8"):
        Video(moving_square(2).astype(np.float32))
    (tmp_path / "bad.mp4").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable video"):
        read_video(tmp_path / "bad.mp4")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "none.png")
