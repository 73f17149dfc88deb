"""`wanx prepare` on a synthetic dataset written with PyAV: good clips cached as safetensors,
corrupt and short files reported with reasons, resumable, redone when settings change."""

import numpy as np
import pytest
from safetensors import safe_open

from wanx.cli import main
from wanx.video import Video


def moving_square(frames: int, height: int = 48, width: int = 64, color=(255, 64, 32), seed: int = 0) -> Video:
    rng = np.random.default_rng(seed)
    video = np.full((frames, height, width, 3), 20, dtype=np.uint8) + rng.integers(0, 8, (1, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        x = (i * 3) % (width - 12)
        video[i, 16:28, x:x + 12] = color
    return Video(video, fps=16)


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    moving_square(20).save(folder / "red.mp4")
    moving_square(24, color=(32, 200, 64), seed=1).save(folder / "green.mp4")
    moving_square(5).save(folder / "short.mp4")  # 5 frames: fewer than 9
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(2).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    rows = ["file_name,text", 'red.mp4,"a red square, moving right"', "green.mp4,a green square", "short.mp4,too short",
            "corrupt.mp4,broken"]
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def run(dataset, capsys, *extra):
    assert main(["prepare", str(dataset), "--model", "tiny", "--size", "64x48", "--frames", "9", "--quiet", *extra]) == 0
    return capsys.readouterr().out.strip()


def test_prepare_caches_reports_and_resumes(dataset, capsys):
    out = run(dataset, capsys)
    assert out.startswith("2 encoded, 0 already cached") and "2 files skipped" in out
    cache = dataset / ".wanx-cache"
    files = sorted(f for f in cache.glob("*.safetensors") if f.name != "empty-text.safetensors")
    assert [f.name.split("-")[0] for f in files] == ["green", "red"]
    with safe_open(str(files[1]), framework="pt") as fh:
        assert tuple(fh.get_tensor("latents").shape) == (16, 3, 6, 8)  # 9 frames -> 3 latent frames, 48x64 / 8
        context = fh.get_tensor("context")
        assert context.ndim == 2 and context.shape[1] == 32 and 1 <= context.shape[0] <= 512  # the tiny umT5 width
        assert fh.metadata()["caption"] == "a red square, moving right"
    report = (cache / "prepare-report.txt").read_text(encoding="utf-8")
    assert "short.mp4\t5 frames at 16 fps, needs 9" in report and "corrupt.mp4\tnot a readable video" in report

    mtimes = [f.stat().st_mtime_ns for f in files]
    assert run(dataset, capsys).startswith("0 encoded, 2 already cached")  # resumable: nothing redone
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert run(dataset, capsys, "--frames", "5").startswith("3 encoded, 0 already cached")  # other settings: redone


def test_prepare_caches_the_empty_prompt_that_caption_dropout_trains_on(dataset, capsys, tmp_path):
    """The unconditional text of caption dropout is the umT5 embedding of "" (what the pipeline
    encodes for `--negative-prompt ""`), cached once beside the items and never taken for one."""
    import torch

    from wanx.pipeline import WanPipeline
    from wanx.training.recipe import cached_items

    run(dataset, capsys)
    empty = dataset / ".wanx-cache" / "empty-text.safetensors"
    with safe_open(str(empty), framework="pt") as fh:
        cached = fh.get_tensor("context")
    embeddings, lengths = WanPipeline.from_pretrained("tiny", device="cpu").text_encoder.encode([""])
    torch.testing.assert_close(cached, embeddings[0, : int(lengths[0])], rtol=1e-6, atol=1e-6)
    assert len(cached_items(dataset)) == 2

    empty.unlink()  # a cache made before the empty prompt was cached
    train = ["train", "--data", str(dataset), "--model", "tiny", "--output", str(tmp_path / "run"), "--steps", "1",
             "--caption-dropout", "0.5", "--quiet"]
    assert main(train) == 2 and "run `wanx prepare` again" in capsys.readouterr().err
    assert not (tmp_path / "run" / "run.safetensors").exists()
    assert run(dataset, capsys).startswith("0 encoded, 2 already cached") and empty.is_file()
    assert main(train) == 0


def test_prepare_buckets_and_errors(dataset, capsys):
    assert main(["prepare", str(dataset), "--model", "tiny", "--size", "64x48", "--buckets", "--frames", "17", "--quiet",
                 "--cache", str(dataset / "buckets")]) == 0
    out = capsys.readouterr().out
    assert "2 encoded" in out and "(buckets 64x48x17: 2)" in out  # 4:3 clips, 20 and 24 frames: the 17-frame bucket
    assert main(["prepare", str(dataset), "--model", "tiny", "--frames", "10"]) == 2
    assert "--frames 10 must be 4k+1" in capsys.readouterr().err
    assert main(["prepare", str(dataset / "nope"), "--model", "tiny"]) == 2
    assert "wanx: error: " in capsys.readouterr().err


def test_other_weights_of_the_same_size_or_another_tokenizer_are_encoded_again(dataset, capsys, tmp_path):
    """A retrained VAE has the same file size as the one the cache was made with, and a new
    tokenizer changes the text embeddings of the same umT5: both must encode again."""
    import shutil

    import torch

    from wanx.hub import find_components
    from wanx.tiny import tiny_model_dir

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("tiny"), model)
    files = find_components(model)

    def prepare():
        assert main(["prepare", str(dataset), "--model", str(model), "--size", "64x48", "--frames", "9", "--quiet"]) == 0
        return capsys.readouterr().out.strip()

    assert prepare().startswith("2 encoded")
    assert prepare().startswith("0 encoded, 2 already cached")
    vae = torch.load(files.vae, weights_only=True)  # the official layout: Wan2.1_VAE.pth
    size = files.vae.stat().st_size
    torch.save({k: v + 0.01 if k == max(vae, key=lambda n: vae[n].numel()) else v for k, v in vae.items()},
               files.vae)
    assert files.vae.stat().st_size == size
    assert prepare().startswith("2 encoded")
    tokenizer = files.tokenizer / "tokenizer.json" if files.tokenizer.is_dir() else files.tokenizer
    tokenizer.write_text(tokenizer.read_text(encoding="utf-8") + " ", encoding="utf-8")  # same JSON, other bytes
    assert prepare().startswith("2 encoded")


def test_prepare_takes_the_model_defaults_and_an_empty_result_is_an_error(dataset, capsys):
    """Without --size/--frames the model's own (the demo's 96x96, 17 frames) are used, not
    832x480x81 that every clip here is too short for; when nothing can be prepared the command
    fails and says which --frames would keep the clips. A row without a caption is skipped."""
    import shutil

    shutil.copy(dataset / "red.mp4", dataset / "nocap.mp4")
    with open(dataset / "metadata.csv", "a", encoding="utf-8") as fh:
        fh.write("nocap.mp4,\n")
    assert main(["prepare", str(dataset), "--model", "demo", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 encoded") and "(buckets 96x96x17: 2)" in out, out
    assert "nocap.mp4 (metadata.csv line 6: no caption)" in out
    assert main(["prepare", str(dataset), "--model", "tiny", "--size", "64x48", "--frames", "33", "--quiet",
                 "--cache", str(dataset / "long")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wanx: error: nothing was prepared") and "\n" not in err
    assert "the shortest clip has 5 frames at 16 fps: give --frames 5" in err and "--buckets" in err
    assert [f.name for f in (dataset / "long").glob("*.safetensors")] == ["empty-text.safetensors"]  # no item


def test_prepare_refuses_what_does_not_fit_before_encoding(dataset, capsys):
    from wanx.hub import find_model
    from wanx.memory.estimate import GiB
    from wanx.runtime import Runtime
    from wanx.training.prepare import check_memory

    assert main(["prepare", str(dataset), "--model", "tiny", "--size", "65536x65536", "--frames", "81",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--size 65536x65536 with --frames 81 needs about" in err and "the largest --size" in err
    assert not (dataset / ".wanx-cache").exists()
    files, runtime = find_model("tiny"), Runtime.create("cpu")
    check_memory(files, runtime, (832, 480), 81, available={"cpu": 8 * GiB})
    with pytest.raises(ValueError, match=r"8192x8192 with --frames 17 needs about .* the largest --size with this "
                                         r"aspect ratio that fits is (\d+)x\1 ") as info:
        check_memory(files, runtime, (8192, 8192), 17, available={"cpu": 8 * GiB})
    side = int(str(info.value).split("fits is ")[1].split("x")[0])
    assert 832 < side < 8192 and side % 16 == 0
    check_memory(files, runtime, (side, side), 17, available={"cpu": 8 * GiB})


def test_prepare_bad_flags_are_one_line_errors(dataset, capsys, tmp_path):
    common = ["prepare", str(dataset), "--model", "tiny", "--size", "64x48", "--frames", "9", "--quiet"]
    assert main([*common, "--fps", "0"]) == 2
    assert "--fps must be a positive frame rate" in capsys.readouterr().err
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    assert main([*common, "--cache", str(tmp_path / "notes.md" / "c")]) == 2
    assert "notes.md is a file, not a folder" in capsys.readouterr().err
    assert main([*common, "--cache", str(tmp_path / "notes.md")]) == 2
    assert "notes.md: " in (err := capsys.readouterr().err) and "notes.md is a file, not a folder" in err


def test_the_advice_offers_buckets_only_to_a_run_without_them(tmp_path):
    """A run already made with --buckets is not told to add --buckets."""
    from wanx.training.prepare import PrepareReport

    lines = []
    for bucketed in (False, True):
        report = PrepareReport(tmp_path, frames=33, bucketed=bucketed)
        report.skipped.add(tmp_path / "a.mp4", "too short", 21)
        lines.append(report.nothing_prepared())
    assert "give --frames 21" in lines[0] and "--buckets" in lines[0]
    assert "give --frames 21" in lines[1] and "--buckets" not in lines[1]
