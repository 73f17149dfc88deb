import subprocess
import sys

import torch
from safetensors.torch import save_file

from tests.oracles import tiny_dit, tiny_vae, write_comfy_dit, write_diffusers_dit, write_official_dit, write_official_vae
from wanx.cli import main


def test_help_does_not_import_torch():
    code = "import sys, wanx.cli; assert 'torch' not in sys.modules, 'torch imported at start-up'"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "wanx", "--help"], capture_output=True, text=True, encoding="utf-8",
                         check=True).stdout
    assert "info" in out and "demo" in out


def test_generate_and_serve_help_name_every_tiny_set():
    """The names come from wanx.tiny's table, which --help reads without importing torch."""
    from wanx.cli import build_parser
    from wanx.tiny import TINY_MODELS

    code = "import sys, wanx.cli, wanx.tiny; wanx.cli.build_parser(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("generate", "serve"):
        model = next(a for a in commands[command]._actions if a.dest == "model")
        assert all(name in model.help for name in TINY_MODELS), (command, model.help)


def test_info_on_each_layout(tmp_path, capsys):
    model = tiny_dit("tiny-i2v")
    paths = [
        write_official_dit(tmp_path / "official", model),
        write_diffusers_dit(tmp_path / "diffusers", model),
        write_comfy_dit(tmp_path / "comfy", model),
        write_official_vae(tmp_path / "Wan2.1_VAE.pth", tiny_vae()),
    ]
    assert main(["info", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    for layout in ("layout:     official", "layout:     diffusers", "layout:     comfyui"):
        assert layout in out
    assert out.count("network:    Wan2.1 DiT i2v") == 3 and "network:    Wan2.1 VAE" in out
    assert "preset:     tiny-i2v" in out and "parameters:" in out and "dtype:      float32" in out


def test_info_error_is_one_line(tmp_path, capsys):
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    assert main(["info", str(tmp_path / "other.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wanx: error: ") and "not a Wan2.1 checkpoint" in err and err.count("\n") == 1


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "latents (1, 16, 5, 8, 12)" in out and "video (1, 3, 17, 64, 96)" in out


def test_info_on_encoder_files(tmp_path, capsys):
    from tests.models.test_clip import tiny_clip
    from tests.models.test_t5 import tiny_t5, transformers_oracle
    from tests.oracles import official_state

    torch.save(official_state(tiny_t5()), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    transformers_oracle(tiny_t5()).save_pretrained(tmp_path / "text_encoder")
    torch.save(official_state(tiny_clip()), tmp_path / "models_clip.pth")
    paths = [tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", tmp_path / "text_encoder" / "model.safetensors",
             tmp_path / "models_clip.pth"]
    assert main(["info", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert out.count("umT5 text encoder") == 2 and "layout:     transformers" in out
    assert "CLIP ViT image encoder" in out


def test_package_exports():
    import wanx

    assert wanx.WanPipeline.__name__ == "WanPipeline" and wanx.Video.__name__ == "Video"


def test_info_takes_the_model_names_generate_takes(capsys):
    """demo and the tiny sets are --model names; info reads them too, and says small counts in
    words that are not zero."""
    assert main(["info", "demo", "tiny"]) == 0
    out = capsys.readouterr().out
    assert out.count("network:    Wan2.1 DiT t2v") == 2
    assert "parameters: 4,862,272 (4.86 M)" in out and "parameters: 48,032 (48 K)" in out


def test_info_on_a_folder_generate_refuses_lists_each_dit(tmp_path, capsys):
    import shutil

    from wanx.hub import find_model

    tiny = find_model("tiny").folder
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("diffusion_pytorch_model.safetensors", "config.json"):
        shutil.copy(tiny / name, folder / name)
    shutil.copy(tiny / "diffusion_pytorch_model.safetensors", folder / "finetune.safetensors")
    assert main(["info", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert f"path:       {folder / 'diffusion_pytorch_model.safetensors'}" in out
    assert f"path:       {folder / 'finetune.safetensors'}" in out
    assert "2 DiT (diffusion transformer) files" in err and "choose one with --dit FILE" in err


def test_strength_help_says_what_the_number_means():
    from wanx.cli import build_parser

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    text = next(a for a in generate._actions if a.dest == "strength").help
    from wanx.pipeline import strength_schedule
    from wanx.sampling import schedule

    sigma = {strength: float(strength_schedule(*schedule("unipc", 50, 5.0), strength)[0][0]) for strength in (0.3, 0.6, 0.8)}
    assert "share of the --steps that is run" in text
    assert f"sigma {sigma[0.3]:.2f} at 0.3, {sigma[0.6]:.2f} at 0.6 and {sigma[0.8]:.2f} at 0.8" in text  # the code's
