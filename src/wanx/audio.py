"""Audio for Wan2.2-S2V: reading any file PyAV decodes as the official code reads it (mono,
16 kHz), the official wav2vec2 feature path (`wan/modules/s2v/audio_encoder.py`: every hidden
state, interpolated to 30 per second, then bucketed to the video's frames) and the number of
clips an audio's length gives (`num_repeat`).

The functions keep the official names (`extract_audio_feat`, `linear_interpolation`,
`get_sample_indices`, `get_audio_embed_bucket_fps`, `encode_audio`) so the two read side by
side. Shapes: samples `[N]` float32 at 16 kHz; features `[layers, frames, dim]` at 30 per
second; the bucketed embedding `[1, layers, dim, num_repeat * infer_frames]`, one column per
video frame at `fps`; clip r takes columns `r * infer_frames : (r + 1) * infer_frames`.

torch, transformers and av are imported where used: `wanx --help` stays instant.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

SAMPLE_RATE = 16_000  # what wav2vec2 was trained on; the official code: librosa.load(path, sr=16000)
WAV2VEC_FPS = 50  # wav2vec2's frames per second: its convolutions stride 320 samples at 16 kHz
VIDEO_RATE = 30  # the official AudioEncoder's `video_rate`: features are interpolated to 30 per second
WAV2VEC_FOLDER = "wav2vec2-large-xlsr-53-english"  # inside the S2V model folder (config `wav2vec`)
# wav2vec2's feature-encoder convolutions (the official model's and every wav2vec2's): they fix
# how many frames an audio gives, so the clip count is known before the weights load.
CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


# ---------------------------------------------------------------------------------------
# Reading


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The first audio stream of any file PyAV decodes (wav, mp3, m4a, flac, an mp4's audio)
    as mono float32 samples `[N]` at `sample_rate`.

    As the official `librosa.load(path, sr=16000)`: channels averaged (librosa's `to_mono`),
    then resampled to `ceil(N * sample_rate / source_rate)` samples, none when the rates match.
    librosa resamples with soxr (a windowed-sinc filter); here it is FFmpeg's swresample
    (also windowed sinc), through `av.AudioResampler`: the same signal below 8 kHz to within
    the filters' ripple, not bit for bit. tests/test_audio.py measures it against the exact
    signal (librosa is not a dependency): a 440 Hz tone of amplitude 0.5 from 44.1, 48, 22.05
    or 8 kHz lands within 1e-4 of the exact tone at 16 kHz, its phase kept (no delay), away
    from the first and last 4 ms, where every resampler sees the signal cut off. Lossy files
    (mp3, aac) may decode a few ms longer or shorter than librosa's reader gives: codec
    padding is handled by each decoder in its own way."""
    samples, rate = _decode(path, layout=None)
    mono = samples.mean(axis=0, dtype=np.float32) if samples.shape[0] > 1 else samples[0]
    return resample(mono, rate, sample_rate)


def resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 `[N]` at `rate` -> `[ceil(N * target_rate / rate)]` at `target_rate`
    (librosa.resample's length), by swresample; unchanged when the rates are equal."""
    import av

    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if rate == target_rate:
        return samples
    length = math.ceil(len(samples) * target_rate / rate)
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=target_rate)
    frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
    frame.sample_rate = rate
    pieces = [f.to_ndarray()[0] for f in resampler.resample(frame)]
    pieces += [f.to_ndarray()[0] for f in resampler.resample(None)]  # what the filter still holds
    out = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    # swresample ends a sample or so short of librosa's count: the missing tail is silence
    return np.pad(out[:length], (0, max(0, length - len(out)))).astype(np.float32, copy=False)


def _decode(path: str | Path, layout: str | None) -> tuple[np.ndarray, int]:
    """The first audio stream as float32 `[channels, N]` at its own rate (`layout`: None keeps
    the file's channels; "mono"/"stereo" mixes to them)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    chunks, rate = [], None
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
                raise ValueError(f"{path}: has no audio stream (it holds {kinds}); give a file with sound "
                                 "(wav, mp3, m4a, flac, or a video with an audio track)")
            stream = container.streams.audio[0]
            # to float planar, keeping the rate: s16 and the like scaled to [-1, 1) as librosa's readers do
            converter = av.AudioResampler(format="fltp", layout=layout)
            for frame in container.decode(stream):
                rate = rate or frame.sample_rate
                for converted in converter.resample(frame):
                    chunks.append(converted.to_ndarray())
            for converted in converter.resample(None):
                chunks.append(converted.to_ndarray())
    except av.error.FFmpegError as err:
        raise ValueError(f"{path}: not a readable audio file ({err})") from None
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise ValueError(f"{path}: the audio stream has no samples; give a file with sound")
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), rate


# ---------------------------------------------------------------------------------------
# Lengths: how many frames and clips an audio gives (no weights needed)


def wav2vec_frames(num_samples: int) -> int:
    """Frames wav2vec2's feature encoder makes of `num_samples` at 16 kHz (each convolution:
    floor((L - kernel) / stride) + 1), about 50 a second."""
    length = num_samples
    for kernel, stride in zip(CONV_KERNEL, CONV_STRIDE):
        length = (length - kernel) // stride + 1 if length >= kernel else 0
    return length


def audio_frame_num(num_samples: int) -> int:
    """Feature frames after the official `linear_interpolation(input_fps=50, output_fps=30)`:
    int(T / 50 * 30), computed in that order as the official code does."""
    seq_len = wav2vec_frames(num_samples) / float(WAV2VEC_FPS)
    return int(seq_len * VIDEO_RATE)


def num_repeat(frames: int, fps: int = 16, infer_frames: int = 80) -> int:
    """The official clip count (`get_audio_embed_bucket_fps`'s `min_batch_num`) for `frames`
    feature frames at 30 per second: int(frames / (infer_frames * 30 / fps)) + 1. It counts
    one clip more than the audio fills (a 5 s audio, 149 frames, gives 1 clip of 80 frames at
    16 fps; 10 s, 299 frames, 2); the embedding past the audio's end is zeros."""
    scale = VIDEO_RATE / fps
    return int(frames / (infer_frames * scale)) + 1


def check_audio_length(num_samples: int, path: str | Path = "audio") -> int:
    """`audio_frame_num(num_samples)`, or a ValueError when the audio is too short to give one."""
    frames = audio_frame_num(num_samples)
    if frames < 1:
        raise ValueError(f"{path}: {num_samples / SAMPLE_RATE:.3f} s of audio is too short; "
                         "speech-to-video needs at least 0.05 s")
    return frames


def num_clips(num_samples: int, fps: int = 16, infer_frames: int = 80) -> int:
    """The official `num_repeat` for an audio of `num_samples` at 16 kHz, from its length
    alone (equal to `encode_audio`'s, which runs wav2vec2): what the run can say before any
    weight loads. A `--num-clips` asks for at most this many (the official `min`)."""
    return num_repeat(check_audio_length(num_samples), fps, infer_frames)


# ---------------------------------------------------------------------------------------
# The wav2vec2 feature path (wan/modules/s2v/audio_encoder.py: AudioEncoder)


@dataclass
class AudioEncoder:
    """wav2vec2 (`Wav2Vec2ForCTC`) and the feature extractor that normalises its input, as
    loaded from the S2V folder's `wav2vec2-large-xlsr-53-english/`."""

    model: Any  # transformers.Wav2Vec2ForCTC, in eval mode
    feature_extractor: Any  # transformers.Wav2Vec2FeatureExtractor

    @property
    def device(self) -> "torch.device":
        return self.model.device


def load_audio_encoder(folder: str | Path, device: str = "cpu") -> AudioEncoder:
    """The wav2vec2 of an S2V model folder (`folder` is the model folder or its
    `wav2vec2-large-xlsr-53-english/`), from local files only: never a download. float32, as
    the official code runs it (transformers' default then)."""
    import torch
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    folder = Path(folder)
    if (folder / WAV2VEC_FOLDER).is_dir():
        folder = folder / WAV2VEC_FOLDER
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder; the S2V model folder holds the audio encoder in {WAV2VEC_FOLDER}/")
    missing = [name for name in ("config.json", "preprocessor_config.json") if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        missing.append("model.safetensors (or pytorch_model.bin)")
    if missing:
        raise ValueError(f"{folder}: the wav2vec2 audio encoder is incomplete: missing {', '.join(missing)}; "
                         "download the S2V model again")
    feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), local_files_only=True)
    with _quiet_transformers():
        model = Wav2Vec2ForCTC.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    return AudioEncoder(model.to(device).eval(), feature_extractor)


@contextmanager
def _quiet_transformers():
    """No transformers progress bar ("Loading weights", "Writing model shards") for a network
    of one file: wanx reports its own progress."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def linear_interpolation(features: "torch.Tensor", input_fps: float, output_fps: float,
                         output_len: int | None = None) -> "torch.Tensor":
    """`[B, T, dim]` at `input_fps` -> `[B, int(T / input_fps * output_fps), dim]` (or
    `output_len`), linear with aligned corners: the official resampling of wav2vec2's frames."""
    import torch.nn.functional as F

    features = features.transpose(1, 2)  # [B, dim, T]
    if output_len is None:
        output_len = int(features.shape[2] / float(input_fps) * output_fps)
    return F.interpolate(features, size=output_len, mode="linear", align_corners=True).transpose(1, 2)


def extract_audio_feat(encoder: AudioEncoder, samples: np.ndarray, return_all_layers: bool = True) -> "torch.Tensor":
    """Mono 16 kHz samples `[N]` -> wav2vec2 features `[layers, frames, dim]` at 30 per second
    (float32): every hidden state (the CNN's projection and each transformer layer's: 25 of
    1024 for the official model) stacked, or the last one only (`[1, frames, dim]`)."""
    import torch

    check_audio_length(len(samples))
    input_values = encoder.feature_extractor(np.asarray(samples, dtype=np.float32), sampling_rate=SAMPLE_RATE,
                                             return_tensors="pt").input_values  # [1, N], zero mean, unit variance
    with torch.no_grad():
        hidden = encoder.model(input_values.to(encoder.device), output_hidden_states=True).hidden_states
    feat = torch.cat(hidden) if return_all_layers else hidden[-1]  # [layers, T, dim], T ~ 50 a second
    return linear_interpolation(feat, input_fps=WAV2VEC_FPS, output_fps=VIDEO_RATE).float()


def get_sample_indices(original_fps: float, total_frames: int, target_fps: float, num_sample: int,
                       fixed_start: int = 0) -> np.ndarray:
    """Indices of `num_sample` frames at `target_fps` picked from frames at `original_fps`,
    starting at frame `fixed_start` (the nearest frame to each time, half to even as numpy
    rounds). The official function also draws a random start for training; inference never does."""
    required_duration = num_sample / target_fps
    if required_duration > total_frames / original_fps:
        raise ValueError(f"{num_sample} frames at {target_fps} fps need {required_duration:.3f} s; "
                         f"{total_frames} frames at {original_fps} fps hold less")
    start_time = fixed_start / original_fps
    time_points = np.linspace(start_time, start_time + required_duration, num_sample, endpoint=False)
    return np.clip(np.round(time_points * original_fps).astype(int), 0, total_frames - 1)


def get_audio_embed_bucket_fps(audio_embed: "torch.Tensor", fps: int = 16, batch_frames: int = 80,
                               m: int = 0) -> tuple["torch.Tensor", int]:
    """Features `[layers, frames, dim]` at 30 per second -> one window per video frame at
    `fps`, for whole clips of `batch_frames` (the official `infer_frames`): `[num_repeat *
    batch_frames, layers, (2m + 1) * dim]` (`[..., (2m + 1) * dim]` without the layer axis
    for a single layer), and `num_repeat`.

    Frame i takes the feature nearest its time, with m neighbours each side (stride
    int(30 / fps)); frames past the audio's end get zeros. `num_repeat` counts one clip more
    than the audio fills (`num_repeat`)."""
    import torch

    num_layers, frames, dim = audio_embed.shape
    clips = num_repeat(frames, fps, batch_frames)
    bucket_num = clips * batch_frames
    padded = math.ceil(bucket_num / fps * VIDEO_RATE)  # the official total: frames + its `padd_audio_num`
    index = torch.from_numpy(get_sample_indices(VIDEO_RATE, padded, fps, bucket_num, fixed_start=0))
    stride = int(VIDEO_RATE / fps)
    window = index[:, None] + stride * torch.arange(-m, m + 1)  # [bucket_num, 2m + 1]
    picked = audio_embed[:, window.clamp(0, frames - 1).to(audio_embed.device)]  # [layers, bucket_num, 2m + 1, dim]
    inside = (index < frames).to(audio_embed.device)[None, :, None]
    picked = torch.where(inside, picked.flatten(2), 0.0)  # zeros past the audio's end
    picked = picked.transpose(0, 1)  # [bucket_num, layers, (2m + 1) * dim]
    return (picked if num_layers > 1 else picked[:, 0]), clips


def encode_audio(encoder: AudioEncoder, samples: np.ndarray, fps: int = 16, infer_frames: int = 80,
                 m: int = 0) -> tuple["torch.Tensor", int]:
    """The official `WanS2V.encode_audio` on mono 16 kHz samples: (`audio_emb` `[1, layers,
    dim, num_repeat * infer_frames]` float32, one column per video frame, `num_repeat`).
    Clip r's `audio_input` is `audio_emb[..., r * infer_frames:(r + 1) * infer_frames]`
    (`clip_audio`); the official code casts it to the DiT's dtype."""
    feat = extract_audio_feat(encoder, samples, return_all_layers=True)
    bucket, clips = get_audio_embed_bucket_fps(feat, fps=fps, batch_frames=infer_frames, m=m)
    bucket = bucket.unsqueeze(0)
    # [1, bucket, dim] -> [1, dim, bucket]; [1, bucket, layers, dim] -> [1, layers, dim, bucket]
    return (bucket.permute(0, 2, 1) if bucket.ndim == 3 else bucket.permute(0, 2, 3, 1)), clips


def clip_audio(audio_emb: "torch.Tensor", r: int, infer_frames: int = 80) -> "torch.Tensor":
    """Clip r's slice of `encode_audio`'s embedding: its `infer_frames` video frames."""
    return audio_emb[..., r * infer_frames:(r + 1) * infer_frames]


# ---------------------------------------------------------------------------------------
# A tiny wav2vec2 for the tiny S2V set


def write_tiny_audio_encoder(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random `Wav2Vec2ForCTC` (hidden 32, 2 layers: 3 hidden states) in the
    official folder's layout (config.json, model.safetensors, preprocessor_config.json,
    vocab.json and the tokenizer files) into `folder` (the `wav2vec2-large-xlsr-53-english/`
    of a tiny S2V set). The convolutions are the official ones (narrow), so the frame rate
    (50 a second) and every length are the real model's. Weights from `tiny.portable_weights`:
    the same bytes on every machine."""
    import json

    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    from .tiny import portable_weights

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # the official config's structure (xlsr-53: layer-norm feature encoder, stable layer norm), narrow
    config = Wav2Vec2Config(
        vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(8,) * len(CONV_KERNEL), conv_kernel=CONV_KERNEL, conv_stride=CONV_STRIDE, conv_bias=True,
        feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, pad_token_id=0, architectures=["Wav2Vec2ForCTC"])
    with torch.random.fork_rng(devices=[]):  # module init draws from the global RNG: leave the caller's alone
        model = Wav2Vec2ForCTC(config).eval()
    model.load_state_dict(portable_weights(model, f"{seed}/{WAV2VEC_FOLDER}"))
    with _quiet_transformers():
        model.save_pretrained(str(folder), safe_serialization=True)
    # the official folder's tokenizer (an English CTC alphabet): unused here, but Wav2Vec2Processor needs it
    letters = ["<pad>", "<s>", "</s>", "<unk>", "|", "'", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    vocab = {token: i for i, token in enumerate(letters)}
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=2) + "\n", encoding="utf-8")
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"))
    feature_extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                                 do_normalize=True, return_attention_mask=True)
    # each on its own, as the official folder holds them (a Processor's save writes processor_config.json instead)
    feature_extractor.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
