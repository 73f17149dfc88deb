"""Memory estimates: decoding falls back to spatial tiles only when whole frames do not fit."""

import pytest
import torch

from wanx.memory.estimate import GiB, decode_bytes, decode_tiles, estimate
from wanx.configs import dit_config


def test_decode_tiles_only_when_needed():
    assert decode_tiles(480, 832, torch.float32, 16 * GiB) is None
    tile, stride = decode_tiles(720, 1280, torch.float32, 6 * GiB)
    assert tile == (512, 512) and stride == (448, 448) and decode_bytes(*tile) <= 6 * GiB < decode_bytes(720, 1280)
    assert decode_tiles(720, 1280, torch.float32, 10) == ((256, 256), (192, 192))  # the smallest, even if short


def test_estimate_counts_tiled_decoding():
    cfg = dit_config("t2v-1.3B")
    need = estimate(cfg, 720, 1280, 81, dtype=torch.bfloat16)
    assert need.decode == decode_bytes(256, 256) < decode_bytes(720, 1280)
    assert need.total == need.weights + max(need.denoise, need.decode) + need.video


def test_pipeline_decodes_in_tiles_when_memory_is_short(tmp_path, monkeypatch):
    import wanx.pipeline.pipeline as pipeline

    monkeypatch.setenv("WANX_HOME", str(tmp_path))
    pipe = pipeline.WanPipeline.from_pretrained("tiny")
    calls = []
    decode = pipe.vae.decode_chunks  # the pipeline decodes chunk by chunk, in memory or to a file
    monkeypatch.setattr(pipe.vae, "decode_chunks", lambda x, **kw: calls.append(kw) or decode(x, **kw))
    small = dict(height=48, width=320, num_frames=1, num_inference_steps=1, seed=0, progress=False)
    whole = pipe("a cat", **small).frames
    assert calls[-1]["tile_size"] is None
    # As if the device had 280 MB free: whole 48x320 frames need 300 MB, 48x256 tiles 240 MB.
    monkeypatch.setattr(pipeline, "available_memory", lambda device: 280 * 10**6)
    tiled = pipe("a cat", **small).frames
    assert calls[-1]["tile_size"] == (48, 256) and calls[-1]["tile_stride"] == (48, 192)
    assert tiled.shape == whole.shape and abs(tiled.astype(int) - whole.astype(int)).mean() < 20


def test_guidance_falls_back_to_two_passes_when_a_batch_of_two_does_not_fit(tmp_path, monkeypatch):
    import wanx.pipeline.pipeline as pipeline

    monkeypatch.setenv("WANX_HOME", str(tmp_path))
    pipe = pipeline.WanPipeline.from_pretrained("tiny")
    small = dict(height=32, width=48, num_frames=5, num_inference_steps=2, seed=3, output_type="latents", progress=False)
    batches = []
    pipe.dit.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    batched = pipe("a cat", **small)
    assert set(batches) == {2}
    real_check = pipeline.check_fits

    def short_of_memory_for_two(*args, batch, **kwargs):  # the tiny model's work is dominated by decoding
        if batch == 2:
            raise ValueError("does not fit")
        return real_check(*args, batch=batch, **kwargs)

    monkeypatch.setattr(pipeline, "check_fits", short_of_memory_for_two)
    batches.clear()
    two_pass = pipe("a cat", **small)
    assert set(batches) == {1} and len(batches) == 4  # cond and uncond, per step
    torch.testing.assert_close(two_pass, batched, rtol=1e-5, atol=1e-5 * batched.abs().max().item())


def test_auto_offload_streams_only_when_things_do_not_fit(capsys):
    from wanx.memory.placement import auto_budget, load_devices, resolve_offload

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_offload("auto", cuda, weights=20 * GiB, work=3 * GiB, available=40 * GiB) == "none"
    assert capsys.readouterr().err == ""
    assert resolve_offload("auto", cuda, weights=30 * GiB, work=3 * GiB, available=22 * GiB) == "blocks"
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and "streaming the DiT blocks" in line and "--offload none" in line
    assert resolve_offload("auto", cpu, weights=30 * GiB, work=3 * GiB, available=22 * GiB) == "none"  # nowhere to stream from
    assert resolve_offload("model", cuda, weights=1, work=1, available=10 * GiB) == "model"
    assert auto_budget(10 * GiB, 3 * GiB) == 6 * GiB and auto_budget(GiB, 3 * GiB) == 0
    where = load_devices("blocks", cuda, cpu)
    assert where == {"dit": cpu, "dit_low": cpu, "vae": cuda, "t5": cpu, "clip": cpu}  # dit_low: Wan2.2 A14B
    assert load_devices("none", cuda, cuda)["dit"] == cuda and load_devices("model", cuda, cuda)["vae"] == cpu


def test_a_dit_kept_quantized_counts_at_its_packed_size():
    """A DiT whose file holds packed GGUF blocks or int8/fp8 weights stays so on the device:
    the estimate counts those bytes, not the compute dtype's (which would over-estimate ~4x for
    Q4_0 and could stream a model that fits); the VAE and text encoder are cast as before."""
    import torch

    from wanx.memory.estimate import weight_bytes

    stored = {"dit": {"Q4_0": 3200, "float32": 100}, "t5": {"bfloat16": 50}}
    counts = [("dit", 3300), ("t5", 50), ("vae", 10)]
    packed = weight_bytes(counts, torch.bfloat16, stored=stored)
    assert packed == {"dit": 3200 * 18 // 32 + 100 * 2, "t5": 100, "vae": 40}
    assert weight_bytes(counts, torch.bfloat16, stored={"dit": {"int8": 3000, "bfloat16": 300}})["dit"] == 3000 + 600
    assert weight_bytes(counts, torch.bfloat16)["dit"] == 3300 * 2  # a float file, as before
    assert weight_bytes(counts, torch.bfloat16, fp8=True, stored=stored)["dit"] == 3300  # --fp8/--int8: one byte


def test_a_tasks_own_tokens_and_clips_count_in_the_estimate():
    """S2V's reference and motion-memory tokens, its 153 frames decoded per clip and the whole
    video held when not streamed; Animate's reference frame; the plain tasks unchanged."""
    from types import SimpleNamespace

    from wanx.pipeline.conditioning import Conditioning
    from wanx.pipeline.conditioning.animate import Animate
    from wanx.pipeline.conditioning.s2v import SpeechToVideo

    plan = SimpleNamespace(num_frames=80, lead_frames=0, s2v=SimpleNamespace(clips=3, start_from_ref=False))
    held = SpeechToVideo.held(plan)
    assert (held.extra_frames, held.decoded_frames, held.output_frames) == (2.5, 153, 237)  # 3 x 80 - 3
    assert SpeechToVideo.held(SimpleNamespace(**{**vars(plan), "s2v": SimpleNamespace(clips=1, start_from_ref=True)}
                                              )).output_frames == 80
    animate = Animate.held(SimpleNamespace(num_frames=77, lead_frames=1, animate=SimpleNamespace(length=200)))
    assert (animate.extra_frames, animate.decoded_frames, animate.output_frames) == (1, 77, 200)
    assert Conditioning.held(SimpleNamespace(lead_frames=2)).extra_frames == 2  # VACE's reference images

    cfg = dit_config("t2v-14B")
    plain = estimate(cfg, 704, 1024, 80, dtype=torch.bfloat16)
    assert plain == estimate(cfg, 704, 1024, 80, dtype=torch.bfloat16, extra_frames=0.0)
    s2v = estimate(cfg, 704, 1024, 80, dtype=torch.bfloat16, extra_frames=2.5, decoded_frames=153, output_frames=237)
    frames = (80 - 1) // 4 + 1
    assert s2v.denoise / plain.denoise == pytest.approx((frames + 2.5) / frames, rel=0.02)  # text tokens aside
    assert s2v.video == (153 + 237) * 704 * 1024 * 3 * 6  # a clip decoded whole beside the video so far
    streamed = estimate(cfg, 704, 1024, 80, dtype=torch.bfloat16, extra_frames=2.5, decoded_frames=153,
                        output_frames=237, stream=True)
    assert streamed.video == 153 * 704 * 1024 * 3 * 6 < s2v.video
