"""The demo model's build, every stage at toy size: dataset -> tokenizer + umT5 -> VAE trained
-> wanx prepare -> wanx train --full -> generation checked by the detector. (The real build
is `make demo-model`; this only proves the stages fit together.)"""

import json

from wanx.demo.build import QUICK, build, evaluation_prompts
from wanx.demo.shapes import HELD_OUT, caption, parse_caption


def test_quick_build_runs_every_stage(tmp_path):
    report = build(tmp_path / "out", QUICK, progress=False)
    model = tmp_path / "out" / "model"
    for name in ("diffusion_pytorch_model.safetensors", "Wan2.1_VAE.safetensors", "umt5-enc.safetensors",
                 "wanx-defaults.json", "config.json", "google/umt5-xxl/tokenizer.json"):
        assert (model / name).is_file(), name
    saved = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert saved["accuracy"]["prompts"] == QUICK.eval_prompts == report["accuracy"]["prompts"]
    assert set(saved["seconds"]) == {"dataset", "text encoder", "vae", "prepare", "dit", "evaluation"}
    from wanx.hub import find_components

    assert find_components(model).model_type == "t2v"
    # the DiT trains in phases, each from the last; the model folder holds the last, in bf16
    import torch
    from safetensors.torch import load_file

    assert len(QUICK.dit_phases) == 2 and (tmp_path / "out" / "run" / "model.safetensors").is_file()
    last = load_file(str(tmp_path / "out" / "run-2" / "model.safetensors"))
    shipped = load_file(str(model / "diffusion_pytorch_model.safetensors"))
    assert shipped.keys() == last.keys()
    assert all(torch.equal(shipped[k], last[k].to(torch.bfloat16)) for k in last)
    first = load_file(str(tmp_path / "out" / "run" / "model.safetensors"))
    assert any(not torch.equal(first[k], last[k]) for k in last)  # the second phase trained


def test_evaluation_prompts_cover_the_held_out_combinations_in_both_languages():
    prompts = evaluation_prompts(40, seed=0)
    assert len(prompts) == 40 and len({seed for _, seed in prompts}) == 40
    attrs = [parse_caption(p) for p, _ in prompts]
    assert all(combo in attrs for combo in HELD_OUT)
    assert sum(p == caption(a, "zh") for (p, _), a in zip(prompts, attrs)) == 20  # half Chinese
