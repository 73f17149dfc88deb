"""The rough edges a new user hits: every bad request fails at once, in one line that names
the flag or file to fix, before any weight is loaded, leaving nothing behind."""

import re
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch

from wanx.cli import main
from wanx.pipeline import WanPipeline
from wanx.video import Video, read_video

FAST = ["--frames", "5", "--steps", "2", "--size", "64x48", "--quiet"]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any weight is loaded: these requests must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the request was refused")

    monkeypatch.setattr(WanPipeline, "from_files", refuse)


def error_of(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("wanx: error: ") and "\n" not in err, err
    return err


def png_header_only(path, width, height):
    """A valid PNG signature + IHDR of the given size (a few dozen bytes): enough for Pillow's
    decompression-bomb guard, which fires on the header before any pixel is decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


# -- outputs ---------------------------------------------------------------------------


def test_unwritable_output_fails_before_loading_and_names_the_path(capsys, no_loading, tmp_path):
    err = error_of(capsys, ["generate", "--model", "tiny", "--prompt", "x", *FAST, "-o", "/proc/wanx-test/x.mp4"])
    assert "/proc/wanx-test/x.mp4: cannot write there" in err and "--output" in err


def test_output_folder_made_for_a_failed_run_is_removed(capsys, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError("loading failed")

    monkeypatch.setattr(WanPipeline, "from_files", fail)
    error_of(capsys, ["generate", "--model", "tiny", "--prompt", "x", *FAST, "-o", str(tmp_path / "new" / "deep" / "a.mp4")])
    assert not (tmp_path / "new").exists()


def test_existing_folder_gets_generated_names(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "004-seed1.mp4").write_bytes(b"")  # an earlier run's file is not overwritten
    assert main(["generate", "--model", "tiny", "--prompt", "x", *FAST, "--seed", "3", "-o", str(folder)]) == 0
    # the new mp4's latents beside it (for --extend)
    assert sorted(p.name for p in folder.iterdir()) == ["004-seed1.mp4", "005-seed3.latents.safetensors",
                                                        "005-seed3.mp4"]


def test_batch_outputs_resolve_inside_the_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "jobs.jsonl"
    prompts.write_text('{"prompt": "a", "output": "sub/first.mp4"}\nb\n', encoding="utf-8")
    assert main(["generate", "--model", "tiny", "--prompts", str(prompts), *FAST, "--seed", "1", "-o", "out"]) == 0
    assert (tmp_path / "out" / "sub" / "first.mp4").is_file() and (tmp_path / "out" / "001-seed1.mp4").is_file()
    assert not (tmp_path / "sub").exists()


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "x"], "give --prompt or --prompts FILE, not both"),
    (["-o", "batch.mp4"], "with --prompts, --output names a folder"),
])
def test_prompts_file_conflicts(capsys, no_loading, tmp_path, extra, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n", encoding="utf-8")
    assert message in error_of(capsys, ["generate", "--model", "tiny", "--prompts", str(prompts), *FAST, *extra])


# -- requests in CLI words ----------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny-i2v", "--prompt", "x"], r"this is an I2V model: give --image \(the first frame\)"),
    (["--model", "tiny"], r"give --prompt \(or --prompts FILE\)$"),
    (["--model", "tiny", "--prompt", "x", "--size", "0x0"], "--size width 0 must be positive"),
    (["--model", "tiny", "--prompt", "x", "--size", "100x48"], "--size width 100 is not a multiple of 16; nearest valid: 96 or 112"),
    (["--model", "tiny", "--prompt", "x", "--frames", "10"], "--frames 10 must be 4k\\+1"),
    (["--model", "tiny", "--prompt", "x", "--guidance", "100"], "--guidance must be in \\[1, 30\\]"),
    (["--model", "tiny", "--prompt", "x", "--guidance", "0"], "--guidance must be in \\[1, 30\\]"),
    (["--model", "tiny", "--prompt", "x", "--quality", "99"], "--quality must be in \\[0, 51\\]"),
    (["--model", "tiny", "--prompt", "x", "--seed", "1180591620717411303424"], "--seed must be a whole number between 0 and 18446744073709551615"),
    (["--model", "tiny", "--prompt", "x", "--seed", "-1"], "--seed must be a whole number between 0 and"),
    (["--model", "tiny", "--prompt", "x", "--timesteps", "1000,1000"], "--timesteps must be strictly decreasing"),
    (["--model", "tiny", "--prompt", "x", "--timesteps", "500,1000"], "--timesteps must be strictly decreasing .* "
                                                                       "1000 follows 500"),
    (["--model", "tiny", "--prompt", "x", "--timesteps", "2000,500"], r"--timesteps values must be in \(0, 1000\]"),
    (["--model", "tiny", "--prompt", "x", "--timesteps", "500,0"], r"--timesteps values must be in \(0, 1000\]"),
    (["--model", "tiny", "--prompt", "x", "--timesteps", ""], "--timesteps is empty"),
    (["--model", "tiny", "--prompt", "x", "--timesteps", "1000,x"], "--timesteps '1000,x': give numbers separated "
                                                                     "by commas"),
    (["--model", "tiny", "--prompt", "x", "--timesteps", "1000,500,250"], "--steps 2 disagrees with the 3 "
                                                                           "--timesteps"),
])
def test_errors_speak_in_flags(capsys, no_loading, args, message):
    err = error_of(capsys, ["generate", *FAST, *args])
    assert re.search(message, err), err
    assert "=" not in err.split("error: ", 1)[1].split("(")[0] or "--" in err  # no Python keywords like image=


def test_jsonl_errors_name_the_file_and_line(capsys, no_loading, tmp_path):
    prompts = tmp_path / "jobs.jsonl"
    prompts.write_text('a cat\n{"prompt": "b", "size": "100x48"}\n', encoding="utf-8")
    err = error_of(capsys, ["generate", "--model", "tiny", "--prompts", str(prompts), *FAST[:-3]])
    assert f"{prompts}:2: --size width 100 is not a multiple of 16" in err
    prompts.write_text('{"prompt": "b", "size": "big"}\n', encoding="utf-8")
    assert f"{prompts}:1: size must be WIDTHxHEIGHT" in error_of(capsys, ["generate", "--model", "tiny", "--prompts", str(prompts)])
    prompts.write_text('{"prompt": "b", "timesteps": "1000,500"}\n{"prompt": "b", "timesteps": [1000, "a"]}\n',
                       encoding="utf-8")
    assert f"{prompts}:1: timesteps must be a list, got '1000,500'" in error_of(
        capsys, ["generate", "--model", "tiny", "--prompts", str(prompts)])
    prompts.write_text('{"prompt": "b", "timesteps": [1000, "a"]}\n', encoding="utf-8")
    assert f"{prompts}:1: --timesteps must hold numbers such as 1000, 750, 500, 250; got 'a'" in error_of(
        capsys, ["generate", "--model", "tiny", "--prompts", str(prompts)])
    prompts.write_bytes(b"a cat\n\xff\xfe caf\xe9\n")
    assert f"{prompts}: not UTF-8 text" in error_of(capsys, ["generate", "--model", "tiny", "--prompts", str(prompts)])


@pytest.mark.parametrize("model", ["./nope", "../nope", "nope/a/b", "~/wanx-no-such-model", "outputs/nope"])
def test_a_missing_model_folder_is_called_one(capsys, no_loading, tmp_path, monkeypatch, model):
    """A path-like --model that is not there is a missing folder, not a Hub id to download;
    owner/name stays an id unless owner is a folder here."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    err = error_of(capsys, ["generate", "--model", model, "--prompt", "x"])
    assert err == f"wanx: error: {model}: no such model folder (a model id is owner/name, e.g. Wan-AI/Wan2.1-T2V-1.3B)"
    assert "did you mean tiny-i2v?" in error_of(capsys, ["generate", "--model", "tiny-i2", "--prompt", "x"])


def test_jsonl_input_paths_are_relative_to_the_prompts_file(capsys, tmp_path, monkeypatch):
    """A prompts file names its images as they lie beside it, wherever wanx is started from;
    a missing one is named with FILE:LINE and the path that was looked at."""
    from PIL import Image

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(jobs / "cat.png")
    prompts = jobs / "p.jsonl"
    prompts.write_text('{"prompt": "a cat", "image": "cat.png", "output": "cat.mp4"}\n', encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["generate", "--model", "tiny-i2v", "--prompts", str(prompts), *FAST, "--seed", "1", "-o", "out"]) == 0
    assert (elsewhere / "out" / "cat.mp4").is_file()
    capsys.readouterr()
    prompts.write_text('{"prompt": "a cat", "image": "cat.png"}\n{"prompt": "a dog", "image": "dog.png"}\n',
                       encoding="utf-8")
    err = error_of(capsys, ["generate", "--model", "tiny-i2v", "--prompts", str(prompts), *FAST])
    assert f"{prompts}:2: {jobs / 'dog.png'}: no such image file" in err


# -- memory --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["16000x16000", "83200x480"])
def test_impossible_size_is_refused_with_the_largest_that_fits(capsys, no_loading, size, tmp_path):
    # a gif holds the whole decoded video (an mp4 is written as it is decoded: one chunk held)
    err = error_of(capsys, ["generate", "--model", "tiny", "--prompt", "x", "--frames", "81", "--size", size,
                            "-o", str(tmp_path / "x.gif")])
    match = re.search(r"needs about [\d.]+ GiB .* but cpu has [\d.]+ GiB available; the largest size with this "
                      r"aspect ratio that fits is (\d+)x(\d+)", err)
    assert match, err
    w, h = map(int, match.groups())
    assert w % 16 == 0 and h % 16 == 0 and w * h < eval(size.replace("x", "*"))


def test_largest_size_that_fits_is_the_largest():
    from wanx.configs import dit_config
    from wanx.memory.estimate import check_fits, estimate

    cfg, kwargs = dit_config("t2v-1.3B"), dict(dtype=torch.bfloat16, weights=3 * 2**30)
    available = 20 * 2**30
    with pytest.raises(ValueError) as err:
        check_fits(cfg, 2400, 4160, 81, device=torch.device("cpu"), available=available, **kwargs)
    w, h = map(int, re.search(r"fits is (\d+)x(\d+)", str(err.value)).groups())
    assert estimate(cfg, h, w, 81, **kwargs).total <= available < estimate(cfg, h + 16, w + 32, 81, **kwargs).total
    assert check_fits(cfg, 480, 832, 81, device=torch.device("cpu"), available=available, **kwargs).total <= available


# -- devices and interruption -------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys, no_loading):
    err = error_of(capsys, ["generate", "--model", "tiny", "--prompt", "x", *FAST, "--device", "cuda"])
    assert "CUDA is not available" in err and "--device cpu" in err
    assert "not a device name" in error_of(capsys, ["generate", "--model", "tiny", "--prompt", "x", "--device", "gpu0"])


def test_ctrl_c_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "out.mp4"
    env_home = str(tmp_path / "home")
    cmd = [sys.executable, "-m", "wanx", "generate", "--model", "tiny", "--prompt", "x", "--size", "256x256",
           "--frames", "17", "--steps", "50", "-o", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**__import__("os").environ, "WANX_HOME": env_home})
    deadline = time.time() + 120
    seen = ""
    while "denoising" not in seen and time.time() < deadline:  # interrupt in the middle of the work
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    err = seen + proc.communicate(timeout=120)[1]
    assert proc.returncode == 130
    assert err.replace("\r", "\n").strip().splitlines()[-1] == "wanx: interrupted, nothing written"
    assert "Traceback" not in err and not (tmp_path / "new").exists()


# -- bad files ------------------------------------------------------------------------------


def test_bad_input_files(capsys, no_loading, tmp_path):
    import av

    big = png_header_only(tmp_path / "huge.png", 30000, 30000)
    err = error_of(capsys, ["generate", "--model", "tiny-i2v", "--prompt", "x", *FAST, "--image", str(big)])
    assert f"{big}: the image is too large to read" in err
    audio = tmp_path / "voice.m4a"
    with av.open(str(audio), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    err = error_of(capsys, ["generate", "--model", "tiny", "--prompt", "x", *FAST, "--video", str(audio)])
    assert f"{audio}: has no video stream (it holds audio)" in err


def test_model_folder_problems(capsys, no_loading, tmp_path):
    import shutil

    from wanx.tiny import tiny_model_dir

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir("tiny"), truncated)
    dit = truncated / "diffusion_pytorch_model.safetensors"
    dit.write_bytes(dit.read_bytes()[: dit.stat().st_size // 2])
    err = error_of(capsys, ["generate", "--model", str(truncated), "--prompt", "x", *FAST])
    assert f"{dit}: truncated" in err and "download it again" in err

    two = tmp_path / "two"
    shutil.copytree(tiny_model_dir("tiny"), two)
    shutil.copy(two / "diffusion_pytorch_model.safetensors", two / "wan2.1_t2v_fp8_e4m3fn.safetensors")
    err = error_of(capsys, ["generate", "--model", str(two), "--prompt", "x", *FAST])
    assert "2 DiT (diffusion transformer) files (diffusion_pytorch_model.safetensors, " \
           "wan2.1_t2v_fp8_e4m3fn.safetensors); choose one with --dit FILE" in err


def test_dit_flag_chooses_among_several(tmp_path):
    import shutil

    from wanx.tiny import tiny_model_dir

    two = tmp_path / "two"
    shutil.copytree(tiny_model_dir("tiny"), two)
    shutil.copy(two / "diffusion_pytorch_model.safetensors", two / "copy.safetensors")
    out = tmp_path / "a.mp4"
    assert main(["generate", "--model", str(two), "--dit", str(two / "copy.safetensors"), "--prompt", "x", *FAST,
                 "-o", str(out)]) == 0
    assert read_video(out).frames.shape == (5, 48, 64, 3)


def test_offline_model_id_is_one_line(tmp_path):
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "wanx", "generate", "--model", "Wan-AI/Wan2.1-T2V-1.3B", "--prompt",
                             "x"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "the Hugging Face Hub cannot be reached" in result.stderr and "--model PATH" in result.stderr


# -- video-to-video follows its input --------------------------------------------------------


def test_v2v_frames_and_size_come_from_the_input(tmp_path):
    import shutil

    from wanx.tiny import tiny_model_dir

    plain = tmp_path / "plain"  # the tiny set without its own defaults: the official rule, at most 81
    shutil.copytree(tiny_model_dir("tiny"), plain)
    (plain / "wanx-defaults.json").unlink()
    clip = tmp_path / "portrait.mp4"
    rng = np.random.default_rng(0)
    Video(rng.integers(0, 255, (9, 160, 96, 3), dtype=np.uint8), fps=16).save(clip)  # 96x160 portrait, 9 frames
    out = tmp_path / "v2v.mp4"
    assert main(["generate", "--model", str(plain), "--prompt", "snow", "--video", str(clip), "--steps", "2",
                 "--size", "64x48", "--quiet", "-o", str(out)]) == 0
    frames = read_video(out).frames
    # 9 frames kept; portrait kept within the 64x48 area: the official rounding gives 32x64.
    assert frames.shape == (9, 64, 32, 3)
    # A folder's own frame count (the tiny set's 5) is the most taken from a longer input, and a
    # shorter input is no error about a --frames nobody gave.
    assert main(["generate", "--model", "tiny", "--prompt", "snow", "--video", str(clip), "--steps", "2",
                 "--size", "64x48", "--quiet", "-o", str(tmp_path / "capped.mp4")]) == 0
    assert read_video(tmp_path / "capped.mp4").frames.shape == (5, 64, 32, 3)
    Video(rng.integers(0, 255, (3, 160, 96, 3), dtype=np.uint8), fps=16).save(tmp_path / "short.mp4")
    assert main(["generate", "--model", "tiny", "--prompt", "snow", "--video", str(tmp_path / "short.mp4"), "--steps",
                 "2", "--size", "64x48", "--quiet", "-o", str(tmp_path / "short-out.mp4")]) == 0
    assert read_video(tmp_path / "short-out.mp4").frames.shape == (1, 64, 32, 3)


# -- Python API ------------------------------------------------------------------------------


def test_call_documents_every_argument():
    import inspect

    doc = WanPipeline.__call__.__doc__
    for name in inspect.signature(WanPipeline.__call__).parameters:
        if name != "self":
            assert re.search(rf"\b{name}\b", doc), f"{name} is not documented"


def test_diffusers_names_and_aliases():
    pipe = WanPipeline.from_pretrained("tiny")  # CPU: fp32 by default, as the CLI
    assert pipe.dit.blocks[0].self_attn.q.weight.dtype == torch.float32
    small = dict(height=32, width=48, num_frames=5, seed=1, output_type="latents", progress=False)
    a = pipe("a cat", num_inference_steps=2, guidance_scale=3.0, **small)
    b = pipe("a cat", steps=2, guidance=3.0, **small)
    assert torch.equal(a, b)  # the same module on the same inputs: bit-identical
    with pytest.raises(ValueError, match="give num_inference_steps or its alias steps, not both"):
        pipe("a cat", num_inference_steps=2, steps=3, **small)


def test_version_and_download_help():
    out = subprocess.run([sys.executable, "-m", "wanx", "--version"], capture_output=True, text=True, check=True).stdout
    assert re.fullmatch(r"wanx \d+\.\d+\.\d+\n", out)
    help_text = subprocess.run([sys.executable, "-m", "wanx", "download", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "Download a Wan model repository" in help_text and "Wan-AI/Wan2.2-T2V-A14B" in help_text


def test_cli_names_the_same_request_keys_as_wanx_request():
    """cli.py spells the --prompts keys out (importing wanx.request loads torch and --help must
    stay instant); they must stay the keys the shared request check accepts."""
    from wanx import cli
    from wanx.request import JOB_KEYS

    assert set(cli._JOB_KEYS) == JOB_KEYS
