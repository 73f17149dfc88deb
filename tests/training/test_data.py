"""The training dataset: both folder layouts, skipped files with reasons, frame sampling at
exact source indices, resize + crop, and buckets. Tiny files written per test; no model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wanx.pipeline.conditioning.base import size_for_image as _size_for_image
from wanx.training.data import (ASPECTS, Bucket, Clip, DatasetReport, Item, SkippedItem, assign_buckets,
                                bucket_size, find_items, load_item, probe, resample_index, resize_crop,
                                sample_frames)
from wanx.video import Video, read_video


def squares(count: int, height: int = 48, width: int = 64) -> np.ndarray:
    """`count` frames of a coloured square moving left to right on grey."""
    frames = np.full((count, height, width, 3), 96, dtype=np.uint8)
    for i in range(count):
        x = i * (width - 16) // max(count - 1, 1)
        frames[i, 16:32, x:x + 16] = (200, 40 + 8 * i % 200, 60)
    return frames


def write_video(path, count: int = 20, fps: int = 16, height: int = 48, width: int = 64):
    Video(squares(count, height, width), fps=fps).save(path)
    return path


def write_image(path, height: int = 48, width: int = 64):
    Image.fromarray(squares(1, height, width)[0]).save(path)
    return path


def indexed(count: int) -> np.ndarray:
    """Frames whose every pixel holds the frame's index, so sampled frames name themselves."""
    return np.broadcast_to(np.arange(count, dtype=np.uint8)[:, None, None, None], (count, 2, 2, 3)).copy()


# ------------------------------------------------------------------------------------ layouts


def test_metadata_csv_with_commas_newlines_and_non_ascii(tmp_path):
    write_video(tmp_path / "a.mp4")
    write_image(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text(
        'file_name,text\n'
        'a.mp4,"A cat, sitting on a mat, looks up"\n'
        'b.png,"Ein Fuchs im Schnee — 雪の中の狐\nzweite Zeile"\n', encoding="utf-8")
    items = find_items(tmp_path)
    assert items == [Item(tmp_path / "a.mp4", "A cat, sitting on a mat, looks up", "video"),
                     Item(tmp_path / "b.png", "Ein Fuchs im Schnee — 雪の中の狐\nzweite Zeile", "image")]


def test_metadata_csv_in_train_subfolder_with_bom_and_extra_columns(tmp_path):
    train = tmp_path / "train"
    (train / "clips").mkdir(parents=True)
    write_video(train / "clips" / "a.mp4")
    (train / "metadata.csv").write_text("\ufefffile_name,score,text\nclips/a.mp4,5,über\n", encoding="utf-8")
    assert find_items(tmp_path) == [Item(train / "clips" / "a.mp4", "über", "video")]


def test_caption_files_layout(tmp_path):
    write_video(tmp_path / "a.mp4")
    (tmp_path / "a.txt").write_text("a red square, moving\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    write_image(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.txt").write_text("正方形", encoding="utf-8")
    write_video(tmp_path / "no_caption.mp4")
    (tmp_path / "notes.md").write_text("not data")
    report = DatasetReport()
    items = find_items(tmp_path, report)
    assert items == [Item(tmp_path / "a.mp4", "a red square, moving", "video"),
                     Item(tmp_path / "sub" / "b.jpg", "正方形", "image")]
    assert report.skipped == [(tmp_path / "no_caption.mp4", "no caption file no_caption.txt")]


def test_missing_file_row_is_skipped_with_row_and_name(tmp_path):
    write_video(tmp_path / "a.mp4")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.mp4,one\ngone.mp4,two\n", encoding="utf-8")
    report = DatasetReport()
    assert [i.path.name for i in find_items(tmp_path, report)] == ["a.mp4"]
    assert report.skipped == [(tmp_path / "gone.mp4", "metadata.csv line 3: no such file gone.mp4")]
    assert report.summary() == "1 file skipped: gone.mp4 (metadata.csv line 3: no such file gone.mp4)"
    with pytest.raises(ValueError, match="line 3: no such file gone.mp4"):  # no report: nothing left out silently
        find_items(tmp_path)


def test_an_empty_caption_is_skipped_with_file_and_row(tmp_path):
    """An empty caption is almost always a mistake (caption dropout trains the empty prompt on
    purpose): the row is skipped with its line, as a missing file is, never cached as ""."""
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        write_video(tmp_path / name)
    (tmp_path / "metadata.csv").write_text('file_name,text\na.mp4,one\nb.mp4,"  "\nc.mp4\n', encoding="utf-8")
    report = DatasetReport()
    assert [i.path.name for i in find_items(tmp_path, report)] == ["a.mp4"]
    assert report.skipped == [(tmp_path / "b.mp4", "metadata.csv line 3: no caption"),
                              (tmp_path / "c.mp4", "metadata.csv line 4: no caption")]
    with pytest.raises(ValueError, match="b.mp4: metadata.csv line 3: no caption"):
        find_items(tmp_path)
    assert len(find_items(tmp_path, captions=False)) == 3  # what trains without text (the VAE) keeps them

    (tmp_path / "metadata.csv").unlink()  # the caption-file layout: an empty .txt
    for name, text in (("a", "one"), ("b", "\n"), ("c", "three")):
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    report = DatasetReport()
    assert [i.path.name for i in find_items(tmp_path, report)] == ["a.mp4", "c.mp4"]
    assert report.skipped == [(tmp_path / "b.mp4", "no caption (b.txt is empty)")]


def test_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="no such dataset folder"):
        find_items(tmp_path / "nope")
    with pytest.raises(ValueError, match="empty dataset"):
        find_items(tmp_path)
    (tmp_path / "metadata.csv").write_text("path,caption\na.mp4,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs columns file_name,text; it has path,caption$"):
        find_items(tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,text\ngone.mp4,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no usable items; 1 file skipped: gone.mp4"):
        find_items(tmp_path, DatasetReport())


# ------------------------------------------------------------------------- skipped on loading


def test_corrupt_and_too_short_videos_are_skipped_with_reasons(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    short = write_video(tmp_path / "short.mp4", count=9)
    report = DatasetReport()
    for path in (corrupt, short):
        with pytest.raises(SkippedItem) as err:
            load_item(Item(path, "x"), height=32, width=32, num_frames=17)
        report.add(path, err.value.reason)
    assert report.skipped[0][1].startswith("not a readable video")
    assert report.skipped[1][1] == "9 frames at 16 fps, needs 17"
    assert report.summary().startswith("2 files skipped: corrupt.mp4 (not a readable video")
    with pytest.raises(SkippedItem, match="not a readable video"):
        probe(Item(corrupt, "x"))


def test_load_item_video_and_image(tmp_path):
    video = load_item(Item(write_video(tmp_path / "a.mp4", count=20), "x"), height=32, width=48, num_frames=17)
    assert video.shape == (17, 32, 48, 3) and video.dtype == np.uint8
    image = load_item(Item(write_image(tmp_path / "b.png"), "x", "image"), height=32, width=32, num_frames=1)
    assert image.shape == (1, 32, 32, 3)
    with pytest.raises(SkippedItem, match="an image is 1 frame, needs 5"):
        load_item(Item(tmp_path / "b.png", "x", "image"), height=32, width=32, num_frames=5)


def test_probe_reads_size_and_length(tmp_path):
    clip = probe(Item(write_video(tmp_path / "a.mp4", count=20, fps=24, height=48, width=64), "x"))
    assert (clip.height, clip.width, clip.frame_count, clip.fps) == (48, 64, 20, 24)
    image = probe(Item(write_image(tmp_path / "b.png", height=40, width=30), "x", "image"))
    assert (image.height, image.width, image.frame_count) == (40, 30, 1)


# ---------------------------------------------------------------------------- frame sampling


def test_resampling_picks_the_nearest_source_frames():
    # 30 -> 16 fps: output k shows source k * 1.875, rounded to the nearest (7.5 -> 7, ties earlier)
    picked = sample_frames(indexed(20), 30, num_frames=9, target_fps=16)
    assert picked[:, 0, 0, 0].tolist() == [0, 2, 4, 6, 7, 9, 11, 13, 15]
    # 8 -> 16 fps shows each frame twice (k * 0.5: 0.5 -> 0, the earlier of two equally near)
    assert sample_frames(indexed(10), 8, num_frames=5)[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 2]
    # same fps: the frames as they are; frame_stride overrides target_fps
    assert sample_frames(indexed(20), 16, num_frames=5)[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert sample_frames(indexed(20), 30, num_frames=5, frame_stride=3)[:, 0, 0, 0].tolist() == [0, 3, 6, 9, 12]


def test_resampling_agrees_with_read_video(tmp_path):
    frames = np.repeat(np.repeat((indexed(20) * 10), 8, axis=1), 8, axis=2)  # [20, 16, 16, 3], value 10 * index
    Video(frames, fps=24).save(tmp_path / "a.mp4")
    decoded = read_video(tmp_path / "a.mp4", fps=16).frames
    assert np.round(decoded.mean(axis=(1, 2, 3)) / 10).astype(int).tolist() == resample_index(20, 24).tolist()


def test_uniform_mode_spans_the_clip_and_short_clips_give_none():
    assert sample_frames(indexed(33), 16, num_frames=5, mode="uniform")[:, 0, 0, 0].tolist() == [0, 8, 16, 24, 32]
    # 60 frames at 30 fps = 32 frames at 16 fps; uniform picks from those, first and last included
    picked = sample_frames(indexed(60), 30, num_frames=5, mode="uniform")[:, 0, 0, 0].tolist()
    assert picked[0] == 0 and picked[-1] >= 57 and picked == sorted(picked)
    assert sample_frames(indexed(9), 16, num_frames=17) is None
    assert sample_frames(indexed(20), 30, num_frames=13) is None  # 20 frames at 30 fps are 11 at 16 fps
    with pytest.raises(ValueError, match="4k\\+1"):
        sample_frames(indexed(20), 16, num_frames=16)
    with pytest.raises(ValueError, match="mode must be 'start' or 'uniform'"):
        sample_frames(indexed(3), 16, num_frames=5, mode="middle")


# ------------------------------------------------------------------------------------ resizing


@pytest.mark.parametrize("height, width", [(32, 32), (32, 48), (64, 32), (48, 64), (96, 128)])
def test_resize_crop_shape_and_a_centred_feature_stays_centred(height, width):
    frames = np.zeros((3, 48, 64, 3), dtype=np.uint8)
    frames[:, 20:28, 28:36] = 255  # an 8x8 square at the centre
    out = resize_crop(frames, height, width)
    assert out.shape == (3, height, width, 3) and out.dtype == np.uint8
    ys, xs = np.nonzero(out[0, :, :, 0] > 127)
    assert abs(ys.mean() - (height - 1) / 2) <= 1 and abs(xs.mean() - (width - 1) / 2) <= 1
    assert np.array_equal(out, resize_crop(frames, height, width))  # deterministic


# ------------------------------------------------------------------------------------- buckets


def clip(name: str, height: int, width: int, frame_count: int = 20, fps: float = 16, kind: str = "video") -> Clip:
    return Clip(Item(Path(f"{name}.mp4"), name, kind), height, width, frame_count, fps)


def names(buckets: dict) -> dict:
    return {b: [c.item.caption for c in clips] for b, clips in buckets.items()}


def test_bucket_sizes_are_multiples_of_16_near_the_area():
    for area in (832 * 480, 1280 * 720):
        for w, h in ASPECTS:
            height, width = bucket_size(h / w, area)
            assert height % 16 == 0 and width % 16 == 0
            assert abs(height * width / area - 1) < 0.10
            assert abs(math.log((height / width) / (h / w))) < 0.05
            assert (height, width) == _size_for_image(torch.zeros(3, h * 16, w * 16), area)
    assert bucket_size(9 / 16) == (464, 832)


def test_portrait_landscape_square_and_frame_counts():
    clips = [clip("land", 720, 1280, 81), clip("port", 1280, 720, 40), clip("sq", 500, 512, 17),
             clip("photo", 3000, 4000, 1, kind="image"), clip("land30", 1080, 1920, 60, fps=30)]
    buckets = names(assign_buckets(clips))
    assert buckets == {Bucket(464, 832, 81): ["land"], Bucket(832, 464, 33): ["port"], Bucket(624, 624, 17): ["sq"],
                       Bucket(544, 720, 1): ["photo"], Bucket(464, 832, 17): ["land30"]}  # 60 at 30 fps: 32 at 16


def test_too_short_videos_are_reported_and_every_other_item_assigned():
    clips = [clip("a", 480, 832, 17), clip("short", 480, 832, 9), clip("b", 480, 640, 33)]
    report = DatasetReport()
    buckets = assign_buckets(clips, report=report)
    assert sorted(c.item.caption for group in buckets.values() for c in group) == ["a", "b"]
    assert report.skipped == [(clips[1].item.path, "9 frames at 16 fps, needs 17")]
    with pytest.raises(ValueError, match="short.mp4: 9 frames at 16 fps, needs 17"):
        assign_buckets(clips)


def test_a_lonely_bucket_is_merged_into_the_nearest():
    clips = [clip(f"wide{i}", 720, 1280, 20) for i in range(3)] + [clip("four_three", 480, 640, 20),
                                                                     clip("long", 720, 1280, 40)]
    buckets = names(assign_buckets(clips, min_items=2))
    # 4:3 has no 3:2 neighbour in use, so it joins 16:9; the 33-frame clip joins the 17-frame bucket
    assert buckets == {Bucket(464, 832, 17): ["wide0", "wide1", "wide2", "long", "four_three"]}
    # never into a longer frame bucket than the clips hold, and images stay with images: kept as they are
    kept = names(assign_buckets([clip("short", 720, 1280, 20), clip("long", 720, 1280, 40),
                                 clip("photo", 720, 1280, 1, kind="image")], min_items=3))
    assert kept == {Bucket(464, 832, 1): ["photo"], Bucket(464, 832, 17): ["short", "long"]}
