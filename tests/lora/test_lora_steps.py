"""Per-step LoRA strength (a list, one per step, or a Ramp): equal to runs that change the
strength step by step; live on a resident model; no more bytes streamed than a fixed strength;
a count that differs from the steps is one line before any work. And the CLI's forms,
--lora-partial and the defaults a LoRA brings."""

import pytest
import torch
from safetensors.torch import save_file

from tests.lora.test_lora import factors, write
from wanx.lora import LoraError, Ramp
from wanx.pipeline import WanPipeline

RUN = dict(height=32, width=48, num_frames=5, seed=1, output_type="latents", progress=False)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    import os

    os.environ.setdefault("WANX_HOME", str(tmp_path_factory.mktemp("home")))
    return WanPipeline.from_pretrained("tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def lora_path(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("loras") / "style.safetensors"
    save_file(write("official", factors(pipe.dit)), str(path))
    return path


def stepped(pipe, path, values):
    """The reference: a fixed-strength live LoRA whose strength the callback changes after each step."""
    pipe.load_lora(path, values[0], name="ref", fuse=False)

    def callback(step, total, latents):
        if step < total:
            pipe.set_lora_strength("ref", values[step])
    try:
        return pipe("a cat", num_inference_steps=len(values), callback=callback, **RUN)
    finally:
        pipe.unload_lora("ref")


def test_per_step_strengths_equal_runs_changed_step_by_step(pipe, lora_path):
    values = [1.0, 0.5, -0.25]
    expected = stepped(pipe, lora_path, values)
    assert not torch.equal(stepped(pipe, lora_path, [1.0, 1.0, 1.0]), expected)  # the schedule really acts
    report = pipe.load_lora(lora_path, values)
    try:
        assert not report.fused  # a schedule loads live even on a resident model
        assert "strength per step 1,0.5,-0.25, live" in str(report)
        assert torch.equal(pipe("a cat", num_inference_steps=3, **RUN), expected)
        with pytest.raises(LoraError, match=r"LoRA 'style' has 3 per-step strengths for 4 steps: give one per step"):
            pipe("a cat", num_inference_steps=4, **RUN)
    finally:
        pipe.unload_lora()
    expected = stepped(pipe, lora_path, [1.0, 0.5, 0.0])
    pipe.load_lora(lora_path, Ramp(1.0, 0.0))
    try:
        assert torch.equal(pipe("a cat", num_inference_steps=3, **RUN), expected)
        video = pipe("a cat", num_inference_steps=3, **{**RUN, "output_type": "video"})
        assert video.metadata["loras"][0]["strength"] == [1.0, 0.5, 0.0]
    finally:
        pipe.unload_lora()
    with pytest.raises(LoraError, match="per-step LoRA strength changes between steps on the live adapters"):
        pipe.load_lora(lora_path, [1.0, 0.5], fuse=True)


def test_a_streamed_schedule_moves_no_more_bytes_than_a_fixed_strength(tmp_path, monkeypatch, lora_path):
    monkeypatch.setenv("WANX_HOME", str(tmp_path))
    streamed = WanPipeline.from_pretrained("tiny", offload="blocks", vram_budget=0, device="cpu", dtype=torch.float32)
    stats = streamed.placement.dit_stats

    def moved(strength):
        streamed.load_lora(lora_path, strength)
        try:
            stats.reset() if hasattr(stats, "reset") else None
            before = stats.moved_bytes
            out = streamed("a cat", num_inference_steps=4, **RUN)
            return stats.moved_bytes - before, out
        finally:
            streamed.unload_lora()

    fixed, _ = moved(1.0)
    scheduled, out = moved([1.0, 0.7, 0.4, 0.1])
    assert fixed > 0 and scheduled == fixed
    assert torch.isfinite(out).all()


def test_cli_strength_forms(tmp_path, monkeypatch):
    from wanx.cli import _lora_arg

    monkeypatch.chdir(tmp_path)
    assert _lora_arg("--lora", "a.safetensors:1,0.5,0") == ("a.safetensors", [1.0, 0.5, 0.0], None)
    assert _lora_arg("--lora", "a.safetensors:1.0-0.5") == ("a.safetensors", Ramp(1.0, 0.5), None)
    assert _lora_arg("--lora", "a.safetensors:-1-0.5:neg") == ("a.safetensors", Ramp(-1.0, 0.5), "neg")
    assert _lora_arg("--lora", "a.safetensors:1e-3") == ("a.safetensors", 1e-3, None)
    for text, message in [("a.safetensors:1,x", r"bad strength '1,x'"), ("a.safetensors:1,nan", "finite")]:
        with pytest.raises(ValueError, match=message):
            _lora_arg("--lora", text)


def test_cli_per_step_partial_and_defaults(tmp_path, capsys, monkeypatch, lora_path):
    import av

    from tests.lora.test_releases import extractor_keys, filled, tiny
    from wanx.cli import main

    monkeypatch.setenv("WANX_HOME", str(tmp_path / "home"))
    args = ["generate", "--model", "tiny", "--prompt", "a cat", "--size", "48x32", "--frames", "5", "--seed", "1",
            "--quiet"]
    out = tmp_path / "ramp.mp4"
    assert main([*args, "--steps", "3", "--lora", f"{lora_path}:1-0", "-o", str(out)]) == 0
    assert "strength 1-0 over the steps, live" in capsys.readouterr().err
    with av.open(str(out)) as container:
        assert '"strength": [1.0, 0.5, 0.0]' in container.metadata["loras"]

    from wanx.pipeline import WanPipeline

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the LoRA was refused")

    with monkeypatch.context() as m:
        m.setattr(WanPipeline, "from_files", refuse)
        assert main([*args, "--steps", "3", "--lora", f"{lora_path}:1,0.5", "-o", str(tmp_path / "x.mp4")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"wanx: error: --lora {lora_path}:1,0.5: 2 strengths for 3 steps: give one per step, or a "
                       "range START-END (linear over the steps)")
        i2v = tmp_path / "lightx2v_I2V_14B_cfg_step_distill_rank4.safetensors"
        # an I2V LoRA (its patch embedding left out, so the rest fits a T2V model) on T2V
        keys = {k: v for k, v in extractor_keys(tiny("tiny-i2v"), "i2v-14B", 4, True).items() if "patch_embedding" not in k}
        save_file(filled(keys), str(i2v))
        assert main([*args, "--steps", "2", "--lora", str(i2v), "-o", str(tmp_path / "y.mp4")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "this is a T2V model" in err and "--lora-partial applies the rest" in err

    assert main([*args, "--lora", str(i2v), "--lora-partial", "--steps", "2", "-o", str(tmp_path / "p.mp4")]) == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("LoRA "))
    assert "partial:" in line and "cross_attn.k_img" in line and "img_emb.proj" in line
    assert "hint:" not in err  # --steps 2: already few steps

    with monkeypatch.context() as m:  # no metadata, a distilled name, the model's own steps: a hint, in one line
        m.setattr(WanPipeline, "from_files", refuse)
        with pytest.raises(AssertionError, match="weights were loaded"):
            main([*args, "--lora", str(i2v), "--lora-partial", "-o", str(tmp_path / "h.mp4")])
        assert "hint: LoRA lightx2v_I2V_14B_cfg_step_distill_rank4 looks like a 4-step distilled LoRA: try --steps 4 " \
               "--guidance 1 --shift 5\n" in capsys.readouterr().err

    # metadata settings fill what the user left unset, and say so
    meta = tmp_path / "fast.safetensors"
    save_file(write("official", factors(tiny("tiny"))), str(meta),
              metadata={"infer_steps": "2", "sample_guide_scale": "1.0", "sample_shift": "5"})
    out = tmp_path / "meta.mp4"
    assert main([*args, "--lora", str(meta), "--shift", "3", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "LoRA fast: its metadata sets --steps 2, --guidance 1 (options you give win)" in err
    with av.open(str(out)) as container:
        assert container.metadata["steps"] == "2" and container.metadata["shift"] == "3.0"
    assert main(["info", str(meta), str(i2v)]) == 0
    out = capsys.readouterr().out
    assert "settings:   steps 2, guidance 1, shift 5 (its metadata)" in out
    assert "settings:   looks 4-step distilled: try --steps 4 --guidance 1 --shift 5" in out

