"""Damaged weights files and folders: each is named in one line, `damaged: FILE: what`,
through the real CLI (`wanx info`, `wanx generate --model FOLDER`), never a traceback and
never taken for a model of another size. The files are hand-made from a real one: a
safetensors file is an 8-byte little-endian header length N, N bytes of JSON header, the data."""

import json
import math
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from wanx.cli import main
from wanx.loading.files import DamagedCheckpoint, read_safetensors_header
from wanx.lora import read_lora
from wanx.tiny import tiny_model_dir

FAST = ["--prompt", "x", "--frames", "5", "--steps", "2", "--size", "64x48", "--quiet"]
DIT = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def folder(tmp_path):
    """A copy of the tiny model folder, whose files each test damages."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir("tiny"), copy)
    return copy


def damaged_line(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("wanx: error: damaged: ") and "\n" not in err and "Traceback" not in err, err
    return err


def split(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write(path, header: bytes, data: bytes, length: int | None = None):
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)


def tensors(header):
    """The tensor entries in data order."""
    return sorted((e for k, e in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"])


def edit(change):
    """A case that edits the parsed header (tensors in data order), then writes it back."""
    def apply(path):
        header, data = split(path)
        change(header, tensors(header))
        write(path, json.dumps(header).encode(), data)
    return apply


def header_as_list(path):
    header, data = split(path)
    write(path, json.dumps(list(header.values())).encode(), data)


def deeply_nested(path):
    _, data = split(path)
    write(path, b"[" * 100_000 + b"]" * 100_000, data)


def header_longer_than_file(path):
    header, data = split(path)
    write(path, json.dumps(header).encode(), data, length=10 * path.stat().st_size)


def past_the_end(header, entries):
    last = entries[-1]  # consistent in itself, but 400 bytes more than the file holds
    last["shape"] = [math.prod(last["shape"]) + 100]
    last["data_offsets"][1] += 400


def overlapping(header, entries):
    entries[1]["data_offsets"] = [o - 4 for o in entries[1]["data_offsets"]]


def truncated(path):
    path.write_bytes(path.read_bytes()[:-100])


def not_utf8(path):
    header, data = split(path)
    raw = json.dumps(header).encode().replace(b'"patch_embedding.weight"', b'"patch_embedding.w\xffight"')
    write(path, raw, data)


CASES = {
    "header is a JSON list": (header_as_list, "the header is a JSON list"),
    "string offsets": (edit(lambda h, e: e[0].update(data_offsets=[str(o) for o in e[0]["data_offsets"]])), "data_offsets"),
    "string shape entries": (edit(lambda h, e: e[0].update(shape=[str(d) for d in e[0]["shape"]])), "shape"),
    "integer shape": (edit(lambda h, e: e[0].update(shape=math.prod(e[0]["shape"]))), "shape"),
    "deeply nested JSON": (deeply_nested, "nested too deeply"),
    # A 100000 x 100000 weight over the data of a 64 x 32 one: read as a 10-billion-parameter model before.
    "shape larger than its data": (edit(lambda h, e: h["blocks.0.ffn.0.weight"].update(shape=[100_000, 100_000])),
                                   "needs 40,000,000,000 bytes but its data_offsets span 8,192"),
    "header length larger than the file": (header_longer_than_file, "exceeds the file"),
    "offsets past the end of the file": (edit(past_the_end), "truncated"),
    "overlapping spans": (edit(overlapping), "overlaps the tensor before it"),
    "negative shape": (edit(lambda h, e: e[0].update(shape=[-d for d in e[0]["shape"]])), "shape"),
    "negative offsets": (edit(lambda h, e: e[0].update(data_offsets=[-8, 0])), "data_offsets"),
    "unknown dtype": (edit(lambda h, e: e[0].update(dtype="F33")), "unknown dtype 'F33'"),
    "truncated data": (truncated, "truncated"),
    "non-UTF-8 header": (not_utf8, "not UTF-8"),
    "metadata not strings": (edit(lambda h, e: h.update(__metadata__={"format": 1})), "__metadata__"),
}


@pytest.mark.parametrize("case", CASES)
def test_damaged_safetensors_is_one_line(capsys, folder, case):
    damage, what = CASES[case]
    damage(folder / DIT)
    err = damaged_line(capsys, ["info", str(folder / DIT)])
    assert f"damaged: {folder / DIT}: " in err and what in err


def test_damaged_dit_in_a_model_folder_is_named_not_sized(capsys, folder, tmp_path):
    CASES["shape larger than its data"][0](folder / DIT)
    err = damaged_line(capsys, ["generate", "--model", str(folder), *FAST, "-o", str(tmp_path / "a.mp4")])
    assert str(folder / DIT) in err and "GiB" not in err
    assert not (tmp_path / "a.mp4").exists()


def test_symlink_loop_in_a_model_folder(capsys, folder, tmp_path):
    (folder / DIT).unlink()
    (folder / DIT).symlink_to(DIT)  # a link to itself: ELOOP on open
    for argv in (["info", str(folder)], ["generate", "--model", str(folder), *FAST, "-o", str(tmp_path / "a.mp4")]):
        err = damaged_line(capsys, argv)
        assert f"{folder / DIT}: a loop of symbolic links" in err


def test_dangling_link_is_named_not_taken_for_a_missing_component(capsys, folder, tmp_path):
    (folder / "Wan2.1_VAE.pth").unlink()
    (folder / "Wan2.1_VAE.pth").symlink_to(tmp_path / "gone.pth")  # e.g. a Hugging Face cache blob removed
    err = damaged_line(capsys, ["generate", "--model", str(folder), *FAST, "-o", str(tmp_path / "a.mp4")])
    assert f"{folder / 'Wan2.1_VAE.pth'}: a symbolic link to {tmp_path / 'gone.pth'}, which does not exist" in err


@pytest.mark.parametrize("cut", [0, 4000], ids=["empty", "truncated zip"])
def test_damaged_pth(capsys, folder, tmp_path, cut):
    vae = folder / "Wan2.1_VAE.pth"
    vae.write_bytes(vae.read_bytes()[:cut])
    err = damaged_line(capsys, ["info", str(vae)])
    assert f"damaged: {vae}: unreadable or truncated" in err
    err = damaged_line(capsys, ["generate", "--model", str(folder), *FAST, "-o", str(tmp_path / "a.mp4")])
    assert str(vae) in err


def test_pth_of_random_bytes_is_damaged_not_refused(capsys, tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(bytes(range(256)) * 4)
    err = damaged_line(capsys, ["info", str(path)])
    assert "unreadable or truncated" in err and "weights_only" not in err


def test_damaged_shard_index(capsys, tmp_path):
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    for weight_map, what in (([], "weight_map"), ({"a": "../../etc/x.safetensors"}, "beside it"),
                             ({"a": 5}, "weight_map")):
        index.write_text(json.dumps({"weight_map": weight_map}))
        assert what in damaged_line(capsys, ["info", str(index)])
    index.write_text("[" * 100_000)
    assert "not a safetensors shard index" in damaged_line(capsys, ["info", str(index)])


@pytest.mark.parametrize("text, what", [("[1, 2]", "holds a JSON list"), ("{", "not valid JSON"),
                                        ('{"num_heads": 2, "num_layers": "x"}', "num_layers is 'x', not a positive integer")])
def test_damaged_config_json_is_named_not_taken_for_a_missing_dit(capsys, folder, tmp_path, text, what):
    (folder / "config.json").write_text(text)
    assert f"config.json: {what}" in damaged_line(capsys, ["info", str(folder)])
    err = damaged_line(capsys, ["generate", "--model", str(folder), *FAST, "-o", str(tmp_path / "a.mp4")])
    assert f"config.json: {what}" in err


def test_deeply_nested_model_index(capsys, folder, tmp_path):
    (folder / "model_index.json").write_text("[" * 100_000)
    err = main(["generate", "--model", str(folder), *FAST, "-o", str(tmp_path / "a.mp4")]), capsys.readouterr().err
    assert err[0] == 2 and "model_index.json: not valid JSON" in err[1] and "Traceback" not in err[1]


def test_damaged_lora_is_one_line(capsys, tmp_path):
    lora = tmp_path / "style.safetensors"
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 32),
               "blocks.0.self_attn.q.lora_B.weight": torch.zeros(32, 4)}, str(lora))
    edit(lambda h, e: e[0].update(shape=[4, 3200]))(lora)
    with pytest.raises(DamagedCheckpoint, match=r"^damaged: .*style\.safetensors: tensor .* needs"):
        read_lora(lora)
    err = damaged_line(capsys, ["generate", "--model", "tiny", *FAST, "--lora", str(lora),
                                "-o", str(tmp_path / "a.mp4")])
    assert str(lora) in err


def test_real_files_pass(tmp_path):
    """What safetensors itself writes passes, edge cases included: an empty tensor, metadata,
    every dtype wanx reads, and the header padding to 8 bytes."""
    path = tmp_path / "ok.safetensors"
    state = {"empty": torch.zeros(0, 3), "scalar": torch.tensor(1.0), "bf16": torch.ones(3, 5, dtype=torch.bfloat16),
             "fp8": torch.zeros(7, dtype=torch.float8_e4m3fn), "flag": torch.ones(3, dtype=torch.bool),
             "i64": torch.arange(5)}
    save_file(state, str(path), metadata={"format": "pt"})
    header = read_safetensors_header(path)
    assert set(header) == {*state, "__metadata__"}
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(DamagedCheckpoint, match="truncated"):
        read_safetensors_header(path)
