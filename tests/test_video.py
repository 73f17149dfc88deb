import numpy as np
import pytest

from wanx.video import Video, VideoWriter, read_image, read_video


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


def test_writer_in_pieces_writes_the_file_save_writes(tmp_path):
    """Frames given a few at a time make the file the whole video makes at once (one encoder,
    the same settings), for mp4 and gif; PNG frames are written as they come."""
    video = Video(moving_square(9, 31, 47), fps=16, metadata={"prompt": "a square", "seed": 3})
    for name in ("v.mp4", "v.gif"):
        whole = video.save(tmp_path / "whole" / name)
        with VideoWriter(tmp_path / "pieces" / name, 16, metadata=video.metadata) as out:
            for start, end in [(0, 1), (1, 5), (5, 9)]:
                out.write(video.frames[start:end])
        pieces, whole = read_video(tmp_path / "pieces" / name).frames, read_video(whole).frames
        assert pieces.shape == whole.shape and len(pieces) == 9
        assert np.abs(pieces.astype(int) - whole.astype(int)).mean() < 1  # libx264 may round a pixel otherwise
    with VideoWriter(tmp_path / "frames", 16) as out:
        out.write(video.frames[:2])
        assert len(list((tmp_path / ".frames.partial").glob("*.png"))) == 2  # on disk already
        out.write(video.frames[2:])
    pngs = sorted((tmp_path / "frames").glob("*.png"))
    assert [np.array_equal(read_image(p), f) for p, f in zip(pngs, video.frames)] == [True] * 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "pieces", "whole"]


@pytest.mark.parametrize("name, partial", [("out.mp4", "out.partial.mp4"), ("out.gif", "out.partial.gif"),
                                           ("out", "out.partial")])
def test_writer_stopped_part_way_keeps_a_playable_partial(tmp_path, name, partial):
    frames = moving_square(12)
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / name, 16, metadata={"seed": 3}) as out:
            out.write(frames[:5])
            raise KeyboardInterrupt
    assert out.kept == tmp_path / partial
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial]  # no temporary file, no final name
    back = np.stack([read_image(p) for p in sorted(out.kept.glob("*.png"))]) if name == "out" else \
        read_video(out.kept).frames
    assert back.shape == (5, 32, 48, 3)
    assert np.abs(back.astype(int) - frames[:5].astype(int)).mean() < 8


def test_writer_stopped_before_any_frame_leaves_nothing(tmp_path):
    for name in ("out.mp4", "out"):
        with pytest.raises(RuntimeError):
            with VideoWriter(tmp_path / name, 16) as out:
                raise RuntimeError("failed before decoding")
        assert out.kept is None
    with pytest.raises(KeyboardInterrupt):  # Video.save keeps no partial: the frames are in memory still
        with VideoWriter(tmp_path / "kept.mp4", 16, keep_partial=False) as out:
            out.write(moving_square(3))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="unsupported output type"):
        VideoWriter(tmp_path / "v.avi", 16)
    with pytest.raises(ValueError, match="a video has one size"):
        with VideoWriter(tmp_path / "v.mp4", 16) as out:
            out.write(moving_square(2))
            out.write(moving_square(2, 16, 16))
    with pytest.raises(ValueError, match="frames must be uint8"):
        with VideoWriter(tmp_path / "w.mp4", 16) as out:
            out.write(moving_square(2).astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.partial.mp4"]  # the 2 good frames of v.mp4
