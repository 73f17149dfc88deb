"""Runtime.check: the one table of choices that cannot go together, in the library's words
(parameters) and, through `names`, in a face's (the CLI's flags)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from wanx.cli import RUNTIME_FLAGS, main
from wanx.runtime import CONFLICTS, PARAMETERS, Runtime


def refusal(runtime: Runtime, **plan) -> str:
    with pytest.raises(ValueError) as err:
        runtime.check(**plan)
    return str(err.value)


def test_each_pair_is_refused_in_the_library_words():
    cpu = Runtime.create("cpu")
    assert refusal(cpu, cfg_parallel=True).startswith("sp, cfg_parallel and fsdp need several ranks")
    assert refusal(Runtime.create("cpu", offload="model"), world=2, fsdp=True) == (
        "fsdp shards the weights across GPUs; it does not combine with offload/vram_budget")
    assert refusal(Runtime.create("cpu", vram_budget="1GB"), world=2, fsdp=True).startswith("fsdp shards")
    assert refusal(Runtime.create("cpu", quantize="fp8"), world=2, fsdp=True) == (
        "fsdp shards bf16/fp32 weights; FP8 layers cannot be sharded yet: drop quantize or fsdp")
    assert refusal(Runtime.create("cpu", cache="magcache"), experts=2) == (
        "step caching (cache='teacache'/'magcache') does not support two experts (Wan2.2 A14B) yet")
    assert refusal(replace(cpu, offload="none", vram_budget=2**20)) == (
        "a VRAM budget streams DiT blocks: it cannot go with offload 'none'")
    with pytest.raises(ValueError, match="cannot go with offload 'model'"):  # create reads the same table
        Runtime.create("cpu", offload="model", vram_budget="auto")


def test_what_goes_together_passes():
    Runtime.create("cpu", cache="teacache").check()
    Runtime.create("cpu", vram_budget=0).check(experts=2, world=2, sp="ring", cfg_parallel=True)
    Runtime.create("cpu", quantize="fp8").check(experts=2, world=4, sp="ulysses")
    Runtime.create("cpu").check(world=2, fsdp=True)


def test_the_cli_names_its_flags_for_every_parameter():
    assert set(RUNTIME_FLAGS) == set(PARAMETERS)
    message = refusal(Runtime.create("cpu", cache="teacache"), experts=2, names=RUNTIME_FLAGS)
    assert message == "step caching (--teacache/--magcache) does not support two experts (Wan2.2 A14B) yet"
    assert len(CONFLICTS) >= 5


def test_generate_refuses_a_pair_before_loading(capsys, tmp_path):
    common = ["generate", "--model", "tiny", "--prompt", "a cat", "--device", "cpu", "-q", "-o", str(tmp_path / "x.mp4")]
    assert main([*common, "--fsdp"]) == 2
    assert capsys.readouterr().err.strip() == ("wanx: error: --sp, --cfg-parallel and --fsdp need several ranks: "
                                               "add --gpus N, or start with torchrun")
    assert main(["generate", "--model", "tiny-moe", "--prompt", "a cat", "--device", "cpu", "--teacache", "-q",
                 "-o", str(tmp_path / "x.mp4")]) == 2
    assert "step caching (--teacache/--magcache) does not support two experts" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_calibrate_cache_refuses_two_experts_before_loading(capsys):
    assert main(["calibrate-cache", "--model", "tiny-moe", "--device", "cpu", "-q"]) == 2
    assert capsys.readouterr().err.strip() == ("wanx: error: step caching (calibrate-cache) does not support two "
                                               "experts (Wan2.2 A14B) yet")
