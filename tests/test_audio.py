"""wanx.audio against the official S2V audio path (Wan2.2 `wan/modules/s2v/audio_encoder.py`,
`wan/speech2video.py: encode_audio`), restated here from the official code on a tiny random
wav2vec2; reading audio with PyAV; the errors; and the mp4's audio track."""

from __future__ import annotations

import math
import wave

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wanx import audio
from wanx.video import Video, VideoWriter

RATE = 44_100


@pytest.fixture(scope="module")
def tiny_wav2vec(tmp_path_factory):
    return audio.write_tiny_audio_encoder(tmp_path_factory.mktemp("s2v") / audio.WAV2VEC_FOLDER, seed=0)


def _tone(seconds: float, rate: int = RATE, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def _write_audio(path, samples: np.ndarray, rate: int, codec: str, container_format: str | None = None):
    """`samples` [channels, N] float in [-1, 1] encoded with PyAV: an independent writer."""
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    with av.open(str(path), mode="w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = layout
        fmt = stream.codec_context.codec.audio_formats[0].name
        size = stream.codec_context.frame_size or 1024
        converter = av.AudioResampler(format=fmt, layout=layout, rate=rate)
        for start in range(0, samples.shape[1], size):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + size]), format="fltp",
                                               layout=layout)
            frame.sample_rate, frame.pts = rate, start
            for converted in converter.resample(frame):
                for packet in stream.encode(converted):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _tone_amplitude_and_frequency(samples: np.ndarray, rate: int) -> tuple[float, float]:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    peak = int(np.argmax(spectrum))
    return 2 * spectrum[peak] / np.hanning(len(samples)).sum(), peak * rate / len(samples)


# ---------------------------------------------------------------------------------------
# The official path, restated (transformers calls, interpolation, bucketing as written there)


def _official_linear_interpolation(features, input_fps, output_fps, output_len=None):
    features = features.transpose(1, 2)
    seq_len = features.shape[2] / float(input_fps)
    if output_len is None:
        output_len = int(seq_len * output_fps)
    output_features = F.interpolate(features, size=output_len, align_corners=True, mode="linear")
    return output_features.transpose(1, 2)


def _official_extract_audio_feat(folder, audio_input, sample_rate=16000):
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    processor = Wav2Vec2Processor.from_pretrained(folder)
    model = Wav2Vec2ForCTC.from_pretrained(folder, dtype=torch.float32)
    input_values = processor(audio_input, sampling_rate=sample_rate, return_tensors="pt").input_values
    res = model(input_values.to(model.device), output_hidden_states=True)
    feat = torch.cat(res.hidden_states)
    feat = _official_linear_interpolation(feat, input_fps=50, output_fps=30)
    return feat.to(torch.float32)


def _official_get_sample_indices(original_fps, total_frames, target_fps, num_sample, fixed_start=None):
    required_duration = num_sample / target_fps
    if required_duration > total_frames / original_fps:
        raise ValueError("required_duration must be less than video length")
    start_frame = fixed_start
    start_time = start_frame / original_fps
    end_time = start_time + required_duration
    time_points = np.linspace(start_time, end_time, num_sample, endpoint=False)
    frame_indices = np.round(np.array(time_points) * original_fps).astype(int)
    return np.clip(frame_indices, 0, total_frames - 1)


def _official_get_audio_embed_bucket_fps(audio_embed, fps=16, batch_frames=81, m=0, video_rate=30):
    num_layers, audio_frame_num, audio_dim = audio_embed.shape
    return_all_layers = num_layers > 1
    scale = video_rate / fps
    min_batch_num = int(audio_frame_num / (batch_frames * scale)) + 1
    bucket_num = min_batch_num * batch_frames
    padd_audio_num = math.ceil(min_batch_num * batch_frames / fps * video_rate) - audio_frame_num
    batch_idx = _official_get_sample_indices(original_fps=video_rate, total_frames=audio_frame_num + padd_audio_num,
                                             target_fps=fps, num_sample=bucket_num, fixed_start=0)
    batch_audio_eb = []
    audio_sample_stride = int(video_rate / fps)
    for bi in batch_idx:
        if bi < audio_frame_num:
            chosen_idx = list(range(bi - m * audio_sample_stride, bi + (m + 1) * audio_sample_stride,
                                    audio_sample_stride))
            chosen_idx = [0 if c < 0 else c for c in chosen_idx]
            chosen_idx = [audio_frame_num - 1 if c >= audio_frame_num else c for c in chosen_idx]
            if return_all_layers:
                frame_audio_embed = audio_embed[:, chosen_idx].flatten(start_dim=-2, end_dim=-1)
            else:
                frame_audio_embed = audio_embed[0][chosen_idx].flatten()
        else:
            frame_audio_embed = torch.zeros([audio_dim * (2 * m + 1)]) if not return_all_layers \
                else torch.zeros([num_layers, audio_dim * (2 * m + 1)])
        batch_audio_eb.append(frame_audio_embed)
    return torch.cat([c.unsqueeze(0) for c in batch_audio_eb], dim=0), min_batch_num


def _official_encode_audio(folder, audio_input, infer_frames, fps=16):
    z = _official_extract_audio_feat(folder, audio_input)
    audio_embed_bucket, num_repeat = _official_get_audio_embed_bucket_fps(z, fps=fps, batch_frames=infer_frames, m=0)
    audio_embed_bucket = audio_embed_bucket.unsqueeze(0)
    if len(audio_embed_bucket.shape) == 3:
        audio_embed_bucket = audio_embed_bucket.permute(0, 2, 1)
    elif len(audio_embed_bucket.shape) == 4:
        audio_embed_bucket = audio_embed_bucket.permute(0, 2, 3, 1)
    return audio_embed_bucket, num_repeat


@pytest.mark.parametrize("seconds, infer_frames, clips", [(3.0, 80, 1), (11.3, 80, 3), (6.0, 48, 2)])
def test_encode_audio_equals_official(tiny_wav2vec, seconds, infer_frames, clips):
    """The whole feature path on the tiny random wav2vec2: `encode_audio` equals the official
    one restated, for audio giving one clip and several; each clip's slice as the official loop's."""
    rng = np.random.default_rng(int(seconds * 10))
    samples = (0.1 * rng.standard_normal(round(seconds * 16000)) + _tone(seconds, 16000)).astype(np.float32)
    expected, expected_clips = _official_encode_audio(str(tiny_wav2vec), samples, infer_frames)

    encoder = audio.load_audio_encoder(tiny_wav2vec.parent)  # the model folder: finds wav2vec2-large-xlsr-53-english/
    audio_emb, num_repeat = audio.encode_audio(encoder, samples, fps=16, infer_frames=infer_frames)

    assert num_repeat == expected_clips == clips == audio.num_clips(len(samples), 16, infer_frames)
    assert audio_emb.shape == (1, 3, 32, clips * infer_frames)  # tiny: 3 hidden states of 32
    torch.testing.assert_close(audio_emb, expected, rtol=0, atol=1e-6)
    for r in range(num_repeat):
        official_slice = expected[..., r * infer_frames:r * infer_frames + infer_frames]
        torch.testing.assert_close(audio.clip_audio(audio_emb, r, infer_frames), official_slice, rtol=0, atol=1e-6)
    # frames past the audio's end are zeros, as the official bucket pads them
    frames = audio.audio_frame_num(len(samples))
    last_inside = int(np.round(np.arange(clips * infer_frames) / 16 * 30).searchsorted(frames))
    assert torch.count_nonzero(audio_emb[..., last_inside:]) == 0
    assert torch.count_nonzero(audio_emb[..., last_inside - 1]) > 0


@pytest.mark.parametrize("m", [0, 2])
@pytest.mark.parametrize("layers", [1, 4])
def test_bucket_windows_equal_official(layers, m):
    """The bucketing alone, with neighbour windows (m) and a single layer: as the official loop."""
    embed = torch.randn(layers, 173, 6)
    bucket, clips = audio.get_audio_embed_bucket_fps(embed, fps=16, batch_frames=40, m=m)
    expected, expected_clips = _official_get_audio_embed_bucket_fps(embed, fps=16, batch_frames=40, m=m)
    assert clips == expected_clips == 3
    assert torch.equal(bucket, expected)


def test_clip_counts_from_length_equal_official(tiny_wav2vec):
    """`num_clips` from the sample count alone equals the official count from wav2vec2's
    frames, at the edges: 80079 samples give 149 frames at 30/s (1 clip of 80), 80080 give 150 (2)."""
    from transformers import Wav2Vec2ForCTC

    model = Wav2Vec2ForCTC.from_pretrained(str(tiny_wav2vec))
    for num_samples, clips in [(720, 1), (80079, 1), (80080, 2), (160_000, 2), (160_079, 2), (160_080, 3),
                               (16000 * 31 + 5, 7)]:
        frames = int(model.wav2vec2._get_feat_extract_output_lengths(num_samples))  # wav2vec2's own count
        official = int(_official_linear_interpolation(torch.zeros(1, frames, 1), 50, 30).shape[1])
        assert audio.audio_frame_num(num_samples) == official
        official_clips = int(official / (80 * (30 / 16))) + 1
        assert audio.num_clips(num_samples) == official_clips == clips, num_samples
    with pytest.raises(ValueError, match="too short"):
        audio.num_clips(719)


def test_tiny_audio_encoder_is_the_official_layout_and_portable(tiny_wav2vec, tmp_path):
    from transformers import Wav2Vec2Processor

    names = {p.name for p in tiny_wav2vec.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json"} <= names
    assert Wav2Vec2Processor.from_pretrained(str(tiny_wav2vec)).feature_extractor.do_normalize
    again = audio.write_tiny_audio_encoder(tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == (tiny_wav2vec / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------
# Reading


def test_resample_keeps_a_tone():
    """swresample against the exact tone at 16 kHz (librosa's soxr is not installed; the exact
    signal is the independent reference): lengths as librosa's ceil(N * 16000 / rate), and
    within 1e-4 away from the two ends (where any resampler sees the signal cut off)."""
    for rate in (44_100, 48_000, 22_050, 8_000):
        tone = _tone(1.0, rate)[:rate - 3]
        out = audio.resample(tone, rate, 16_000)
        assert out.dtype == np.float32 and len(out) == math.ceil(len(tone) * 16_000 / rate)
        exact = _tone(len(out) / 16_000, 16_000)
        assert np.abs(out - exact)[64:-64].max() < 1e-4, rate
    same = _tone(0.5, 16_000)
    assert np.array_equal(audio.resample(same, 16_000, 16_000), same)


@pytest.mark.parametrize("suffix, codec, container_format, exact", [
    (".wav", "pcm_s16le", None, True), (".flac", "flac", None, True), (".mp3", "libmp3lame", None, False),
    (".m4a", "aac", "ipod", False)])
def test_read_audio_formats(tmp_path, suffix, codec, container_format, exact):
    """Stereo 44.1 kHz files: read as mono (the channels' mean, as librosa's to_mono; FFmpeg's
    own downmix would give 0.57 here, not 0.4) at 16 kHz."""
    left, right = _tone(1.5, amplitude=0.6), _tone(1.5, amplitude=0.2)
    path = _write_audio(tmp_path / f"speech{suffix}", np.stack([left, right]), RATE, codec, container_format)
    samples = audio.read_audio(path)
    assert samples.dtype == np.float32 and samples.ndim == 1
    expected_length = math.ceil(len(left) * 16_000 / RATE)
    if exact:  # PCM and FLAC keep every sample: librosa's length, and the tone within 16-bit rounding
        assert len(samples) == expected_length
        exact_tone = _tone(len(samples) / 16_000, 16_000, amplitude=0.4)
        assert np.abs(samples - exact_tone)[64:-64].max() < 2e-4
    else:  # lossy: codec delay and padding add up to a couple of frames
        assert abs(len(samples) - expected_length) < 2 * 1152 * 16_000 / RATE + 2
    amplitude, frequency = _tone_amplitude_and_frequency(samples, 16_000)
    assert abs(frequency - 440) < 1.0 and abs(amplitude - 0.4) < 0.02


def test_read_audio_of_an_mp4(tmp_path):
    """The audio track of a video file (written by VideoWriter's muxing, read back)."""
    video = Video(np.full((24, 16, 16, 3), 128, np.uint8), fps=16)
    path = video.save(tmp_path / "talk.mp4", audio=(_tone(2.0, amplitude=0.4), RATE))
    samples = audio.read_audio(path)
    assert abs(len(samples) - 1.5 * 16_000) < 2 * 1024 * 16_000 / RATE + 2
    amplitude, frequency = _tone_amplitude_and_frequency(samples, 16_000)
    assert abs(frequency - 440) < 1.0 and abs(amplitude - 0.4) < 0.02


def test_read_audio_errors(tmp_path):
    silent_video = Video(np.zeros((4, 16, 16, 3), np.uint8), fps=16).save(tmp_path / "silent.mp4")
    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as out:  # a valid header, no samples
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16_000)
    garbage = tmp_path / "noise.mp3"
    garbage.write_bytes(b"this is not audio at all" * 10)
    for path, message in [(silent_video, "has no audio stream (it holds video)"),
                          (empty, "the audio stream has no samples"), (garbage, "not a readable audio file")]:
        with pytest.raises(ValueError) as err:
            audio.read_audio(path)
        assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such audio file"):
        audio.read_audio(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="has no audio stream"):  # the writer reads its audio first
        VideoWriter(tmp_path / "out.mp4", 16, audio=silent_video)
    assert not (tmp_path / "out.mp4").exists()


def test_load_audio_encoder_names_what_is_missing(tmp_path, tiny_wav2vec):
    with pytest.raises(ValueError, match="no such folder"):
        audio.load_audio_encoder(tmp_path / "nowhere")
    partial = tmp_path / audio.WAV2VEC_FOLDER
    partial.mkdir()
    (partial / "config.json").write_bytes((tiny_wav2vec / "config.json").read_bytes())
    with pytest.raises(ValueError, match="missing preprocessor_config.json, model.safetensors"):
        audio.load_audio_encoder(tmp_path)


# ---------------------------------------------------------------------------------------
# The mp4's audio track


def _streams(path):
    with av.open(str(path)) as container:
        return {s.type: (float(s.duration * s.time_base), s) for s in container.streams}, \
            {s.type: s.codec_context.name for s in container.streams}


def test_mp4_carries_the_audio_cut_to_the_video(tmp_path):
    """A longer audio file ends with the video (40 frames at 16 fps: 2.5 s), written along the
    frames as they come; a shorter one ends where it ends; without audio, no audio stream."""
    speech = _write_audio(tmp_path / "speech.wav", np.stack([_tone(4.0), _tone(4.0, amplitude=0.2)]), RATE,
                          "pcm_s16le")
    frames = np.random.default_rng(0).integers(0, 255, (40, 32, 48, 3), dtype=np.uint8)
    with VideoWriter(tmp_path / "talk.mp4", 16, audio=speech) as out:
        for start in range(0, 40, 7):
            out.write(frames[start:start + 7])
    durations, codecs = _streams(tmp_path / "talk.mp4")
    assert codecs == {"video": "h264", "audio": "aac"}
    assert durations["video"][0] == pytest.approx(2.5) and durations["audio"][0] == pytest.approx(2.5, abs=1e-3)
    assert durations["audio"][1].codec_context.channels == 2 and durations["audio"][1].rate == RATE

    short = Video(frames, fps=16).save(tmp_path / "short.mp4", audio=(_tone(1.0, 16_000), 16_000))
    durations, _ = _streams(short)
    assert durations["video"][0] == pytest.approx(2.5) and durations["audio"][0] == pytest.approx(1.0, abs=1e-3)
    assert durations["audio"][1].codec_context.channels == 1 and durations["audio"][1].rate == 16_000

    odd_rate = Video(frames, fps=16).save(tmp_path / "odd.mp4", audio=(_tone(1.0, 10_000), 10_000))
    durations, _ = _streams(odd_rate)  # a rate AAC does not take: resampled to 48 kHz
    assert durations["audio"][1].rate == 48_000 and durations["audio"][0] == pytest.approx(1.0, abs=1e-3)

    plain = Video(frames, fps=16).save(tmp_path / "plain.mp4")
    assert set(_streams(plain)[1]) == {"video"}
    # (the frames are not compared byte for byte: libx264's threads make its output vary with the
    # machine's load, audio or not; tests/test_video.py holds the video path)
    with av.open(str(tmp_path / "talk.mp4")) as talk:
        assert sum(1 for _ in talk.decode(video=0)) == 40


def test_audio_track_errors(tmp_path):
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="needs an .mp4 output"):
        Video(frames).save(tmp_path / "out.gif", audio=(_tone(1.0, 16_000), 16_000))
    with pytest.raises(ValueError, match="rate must be a positive integer"):
        Video(frames).save(tmp_path / "out.mp4", audio=(_tone(1.0, 16_000), 16_000.5))
    with pytest.raises(ValueError, match="needs an .mp4 output"):  # before reading the file
        Video(frames).save(tmp_path / "frames", audio=tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="audio samples must be"):
        Video(frames).save(tmp_path / "out.mp4", audio=(np.zeros((3, 100), np.float32), 16_000))
    assert not any(tmp_path.iterdir())


def test_partial_mp4_keeps_its_audio(tmp_path):
    """Stopped part-way: the kept .partial.mp4 has its sound up to where the frames stopped."""
    frames = np.zeros((8, 16, 16, 3), np.uint8)
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / "talk.mp4", 16, audio=(_tone(3.0), RATE)) as out:
            out.write(frames)
            raise KeyboardInterrupt
    durations, _ = _streams(out.kept)
    assert durations["video"][0] == pytest.approx(0.5) and durations["audio"][0] == pytest.approx(0.5, abs=1e-3)


def test_loads_a_legacy_pytorch_model_bin(tiny_wav2vec, tmp_path):
    """wav2vec2 folders of the xlsr-53 era hold pytorch_model.bin with the positional
    convolution's weight norm as weight_g/weight_v: loaded to the same features."""
    import shutil

    from safetensors.torch import load_file

    legacy = tmp_path / audio.WAV2VEC_FOLDER
    shutil.copytree(tiny_wav2vec, legacy)
    state = load_file(str(legacy / "model.safetensors"))
    (legacy / "model.safetensors").unlink()
    renamed = {key.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): value for key, value in state.items()}
    assert any(key.endswith("weight_g") for key in renamed)
    torch.save(renamed, legacy / "pytorch_model.bin")
    samples = np.random.default_rng(1).standard_normal(16_000).astype(np.float32)
    expected, _ = audio.encode_audio(audio.load_audio_encoder(tiny_wav2vec), samples)
    loaded, _ = audio.encode_audio(audio.load_audio_encoder(tmp_path), samples)
    assert torch.equal(loaded, expected)
