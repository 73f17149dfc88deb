"""`wanx calibrate-cache`: the model's own defaults, prompt lengths checked before loading,
and the calibration kept where the user's data belongs (not inside the package or a download
cache), where --teacache/--magcache find it."""

import json
import os
from pathlib import Path

from wanx.cli import main
from wanx.speed.cache import CALIBRATION_FILE, calibration_path, find_calibration


def test_calibrating_the_demo_takes_its_defaults_and_writes_under_wanx_home(capsys, monkeypatch, tmp_path):
    from wanx.hub import demo_model_dir
    from wanx.pipeline import WanPipeline

    monkeypatch.setenv("WANX_HOME", str(tmp_path / "home"))
    assert main(["calibrate-cache", "--model", "demo", "--steps", "10", "--quiet"]) == 0  # the built-in prompts
    written = Path(capsys.readouterr().out.strip())
    assert written.is_file() and written.is_relative_to(tmp_path / "home")
    assert not (demo_model_dir() / CALIBRATION_FILE).exists()  # nothing written into the installed package
    result = json.loads(written.read_text(encoding="utf-8"))
    assert (result["size"], result["frames"], result["num_steps"], result["prompts"]) == ("96x96", 17, 10, 3)
    for kind in ("teacache", "magcache"):
        pipe = WanPipeline.from_pretrained("demo", cache=kind)
        assert pipe.step_cache.calibration == result, kind


def test_calibrate_cache_checks_prompts_steps_and_output_before_loading(capsys, tmp_path):
    common = ["calibrate-cache", "--model", "demo", "--quiet"]
    long = "A red sports car drives along a coastal road at sunset, aerial shot."  # 49 demo tokens
    assert main([*common, "--prompts", f"a red circle|{long}"]) == 2
    err = capsys.readouterr().err
    assert "--prompts: prompt 2" in err and "tokens; this model reads at most 32: shorten it" in err
    assert main([*common, "--steps", "5"]) == 2
    assert "--steps 5 must be >= 10" in capsys.readouterr().err
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    assert main([*common, "--output", str(tmp_path / "notes.md" / "c.json")]) == 2
    assert "notes.md is a file, not a folder" in capsys.readouterr().err


def test_where_a_calibration_is_kept(tmp_path, monkeypatch):
    from wanx.hub import demo_model_dir

    monkeypatch.setenv("WANX_HOME", str(tmp_path / "home"))
    own = tmp_path / "my-finetune"
    own.mkdir()
    assert calibration_path(own) == own.resolve() / CALIBRATION_FILE  # the user's folder: beside the model
    snapshot = tmp_path / "hub" / "models--Wan-AI--Wan2.1-T2V-1.3B" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    cached = calibration_path(snapshot)
    assert cached.parent == tmp_path / "home" / "calibrations" and cached.name.startswith("Wan-AI--Wan2.1-T2V-1.3B-")
    assert calibration_path(demo_model_dir()).name.startswith("demo-")
    assert find_calibration(snapshot) is None
    (snapshot / CALIBRATION_FILE).write_text("{}", encoding="utf-8")  # one the folder holds itself
    assert find_calibration(snapshot) == snapshot / CALIBRATION_FILE
    cached.parent.mkdir(parents=True)
    cached.write_text("{}", encoding="utf-8")  # calibrate-cache's own comes first
    assert find_calibration(snapshot) == cached
    if os.geteuid() != 0:  # root can write anywhere
        own.chmod(0o555)
        try:
            assert calibration_path(own).parent == tmp_path / "home" / "calibrations"
        finally:
            own.chmod(0o755)
