import csv
import itertools

import numpy as np
import pytest

from wanx.demo.shapes import (
    ATTRIBUTES, BACKGROUNDS, COLORS, HELD_OUT, MOTIONS, SHAPES, Attrs, accuracy, all_combinations, caption,
    detect, parse_caption, render_clip, score, training_combinations, write_dataset,
)
from wanx.training.data import find_items
from wanx.video import read_video


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One small written dataset shared by the file-level tests: writing mp4s is the slow part."""
    folder = tmp_path_factory.mktemp("shapes")
    write_dataset(folder, count=24, seed=3)
    return folder


def test_same_seed_same_frames_other_seed_other_frames():
    attrs = Attrs("yellow", "triangle", "up", "gray")
    a, b = render_clip(attrs, seed=7), render_clip(attrs, seed=7)
    assert a.dtype == np.uint8 and a.shape == (17, 96, 96, 3)
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, render_clip(attrs, seed=8))
    assert render_clip(attrs, seed=7, size=(64, 128), frames=9).shape == (9, 64, 128, 3)


def test_shape_stays_in_frame_with_the_background_on_every_border():
    for i, attrs in enumerate(all_combinations()[::7]):
        clip = render_clip(attrs, seed=i)
        border = np.concatenate([clip[:, 0], clip[:, -1], clip[:, :, 0], clip[:, :, -1]]).reshape(-1, 3)
        assert (border == BACKGROUNDS[attrs.background]).all(), attrs


def test_every_caption_parses_back_in_both_languages():
    for attrs in all_combinations():
        for lang in ("en", "zh"):
            assert parse_caption(caption(attrs, lang)) == attrs
    assert caption(("red", "circle", "left", "black"), "zh") == "黑色背景上一个红色的圆形向左移动"
    assert parse_caption("A Red circle moving left on a grey background.") == ("red", "circle", "left", "gray")
    with pytest.raises(ValueError, match="colour"):
        parse_caption("a circle moving left on a black background")
    with pytest.raises(ValueError, match="several"):
        parse_caption("a red blue circle moving left on a black background")
    with pytest.raises(ValueError, match="language"):
        caption(HELD_OUT[0], "fr")


def test_held_out_combinations_leave_every_word_pair_and_triple_in_training():
    train = training_combinations()
    assert len(all_combinations()) == 120 and len(train) == 114 and len(set(HELD_OUT)) == 6
    assert not set(HELD_OUT) & set(train)
    for vocabulary, index in ((COLORS, 0), (SHAPES, 1), (MOTIONS, 2), (BACKGROUNDS, 3)):
        assert {h[index] for h in HELD_OUT} == set(vocabulary)  # each word held out somewhere...
    for held in HELD_OUT:  # ...yet every part of each held-out combo is still seen in training
        for keep in itertools.combinations(range(4), 3):
            assert any(all(t[i] == held[i] for i in keep) for t in train), (held, keep)


def test_written_dataset_is_readable_and_never_holds_a_held_out_combo(dataset):
    items = find_items(dataset)
    assert len(items) == 24
    seen = [parse_caption(item.caption) for item in items]
    assert not set(seen) & set(HELD_OUT)
    assert len(set(seen)) == 24  # cycles through distinct combinations
    rows = list(csv.DictReader(open(dataset / "metadata.csv", encoding="utf-8")))
    langs = ["zh" if any("\u4e00" <= ch <= "\u9fff" for ch in r["text"]) else "en" for r in rows]
    assert langs.count("en") == langs.count("zh") == 12  # the documented alternation
    video = read_video(items[0].path)
    assert video.frames.shape == (17, 96, 96, 3) and video.fps == 16


def test_every_training_clip_is_written_with_one_clip_per_combination(tmp_path):
    # Small clips keep this quick; the rows, not the pixels, are under test.
    write_dataset(tmp_path / "all", size=32, frames=5, languages=("en",))
    seen = [parse_caption(item.caption) for item in find_items(tmp_path / "all")]
    assert sorted(seen) == sorted(training_combinations())
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path / "all", count=1)


def test_detector_is_right_on_rendered_clips_over_many_seeds():
    # Every combination, each with its own seed (so sizes, speeds and positions vary), plus
    # a non-square size and more frames.
    clips = [(render_clip(a, seed=1000 + i), caption(a, "en" if i % 2 else "zh"))
             for i, a in enumerate(all_combinations())]
    clips += [(render_clip(a, seed=i, size=(64, 112), frames=33), caption(a))
              for i, a in enumerate(all_combinations()[::5])]
    assert accuracy(clips) == {name: 1.0 for name in (*ATTRIBUTES, "agrees", "all")}


def test_detector_is_right_on_decoded_mp4s(dataset):
    # H.264 (yuv420p, CRF 18) shifts colours and smears chroma at edges; the detector must not care.
    clips = [(read_video(item.path).frames, item.caption) for item in find_items(dataset)]
    assert accuracy(clips) == {name: 1.0 for name in (*ATTRIBUTES, "agrees", "all")}


def test_detector_on_nothing_and_score_reports_each_attribute():
    blank = np.full((17, 96, 96, 3), 128, dtype=np.uint8)
    found = detect(blank)
    assert found["background"] == "gray" and found["color"] is found["motion"] is found["shape"] is None
    clip = render_clip(Attrs("blue", "square", "down", "black"), seed=2)
    assert score(clip, "a blue square moving down on a black background") == dict.fromkeys(ATTRIBUTES, True)
    assert score(clip, "灰色背景上一个蓝色的圆形向上移动") == {
        "color": True, "shape": False, "motion": False, "background": False}
    assert score(clip[:1].repeat(17, axis=0), caption(Attrs("blue", "square", "down", "black")))["motion"] is False


def test_demo_tokenizer_splits_chinese_into_the_words_training_shares(tmp_path):
    """Chinese captions have no spaces: a vocabulary learnt from them as written made each whole
    caption one token, so a held-out Chinese prompt shared nothing with training."""
    from tokenizers import Tokenizer

    from wanx.demo.shapes import LANGUAGES, tokenizer_corpus
    from wanx.tiny import write_tokenizer

    write_tokenizer(tmp_path, vocab=512, corpus=tokenizer_corpus())
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    pieces = lambda attrs, lang: [t for t in tok.encode(caption(attrs, lang)).tokens if t not in ("<pad>", "</s>")]  # noqa: E731
    assert pieces(Attrs("red", "circle", "left", "black"), "zh") == \
        ["▁黑色", "背景", "上", "一个", "红色", "的", "圆形", "向左", "移动"]
    seen = {p for attrs in training_combinations() for lang in LANGUAGES for p in pieces(attrs, lang)}
    for attrs in HELD_OUT:
        for lang in LANGUAGES:
            assert len(pieces(attrs, lang)) == 9 and set(pieces(attrs, lang)) <= seen, (attrs, lang)
