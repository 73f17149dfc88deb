"""Tiny model sets are byte-identical wherever and whenever they are made."""

import hashlib
import json

import numpy as np
import pytest
import torch

from wanx.tasks import model_tasks
from wanx.tiny import STAMP, TINY_MODELS, TINY_VERSION, make_tiny_model, tiny_model_dir


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    """Two fresh WANX_HOMEs, each holding every tiny set made through `tiny_model_dir`; the
    global RNG is seeded differently before each, which must not matter."""
    made = []
    for seed in (1, 2):
        home = tmp_path_factory.mktemp(f"wanx-home-{seed}")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("WANX_HOME", str(home))
            torch.manual_seed(seed)
            for name in TINY_MODELS:
                assert tiny_model_dir(name) == home / name
        made.append(home)
    return made


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_sets_are_byte_identical(homes, name):
    a, b = (_digests(home / name) for home in homes)
    assert a == b
    expected = {"config.json", "diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
                "google/umt5-xxl/tokenizer.json", "google/umt5-xxl/tokenizer_config.json", STAMP,
                "wanx-defaults.json"}
    if name in ("tiny-i2v", "tiny-flf2v", "tiny-animate", "tiny-animate2"):
        expected.add("models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    if name == "tiny-moe":  # Wan2.2's official layout: each expert in its folder, sharded, with its config
        expected -= {"config.json", "diffusion_pytorch_model.safetensors"}
        expected |= {f"{expert}/{file}" for expert in ("high_noise_model", "low_noise_model") for file in
                     ("config.json", "diffusion_pytorch_model-00001-of-00002.safetensors",
                      "diffusion_pytorch_model-00002-of-00002.safetensors",
                      "diffusion_pytorch_model.safetensors.index.json")}
    if name == "tiny-s2v":  # Wan2.2 S2V: the wav2vec2 audio encoder's folder, as the release keeps it
        expected |= {f"wav2vec2-large-xlsr-53-english/{file}" for file in (
            "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json", "vocab.json")}
    if name == "tiny-ti2v":  # Wan2.2 TI2V-5B: the Wan2.2 VAE, the very file make_tiny_vae22 writes
        expected = expected - {"Wan2.1_VAE.pth"} | {"Wan2.2_VAE.pth"}
    assert set(a) == expected
    assert not [p.name for p in homes[0].iterdir() if p.name not in TINY_MODELS]  # no .partial / .old left


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_sets_default_to_a_small_valid_request(homes, name):
    """A tiny set's videos are noise: a run that leaves the size, frames and steps unset takes a
    second (its wanx-defaults.json), not the official 832x480x81 at 50 steps; guidance, shift and
    negative prompt stay the official ones of the task."""
    from wanx.hub import find_components
    from wanx.pipeline import plan_request

    files = find_components(homes[0] / name)
    if not model_tasks(files.model_type, 2 if files.moe else 1):
        pytest.skip(f"{name}: no task row for a {files.model_type} model yet (its conditioning comes with the task)")
    images = {"i2v": dict(image=torch.zeros(3, 64, 64)),
              "flf2v": dict(image=torch.zeros(3, 64, 64), last_image=torch.zeros(3, 64, 64)),
              # the preprocessed inputs: the output takes the pose video's size (the folder's 64x64)
              "animate": dict(pose_video=np.zeros((5, 64, 64, 3), np.uint8), image=np.zeros((64, 64, 3), np.uint8),
                              face_video=np.zeros((5, 512, 512, 3), np.uint8)),
              # the driving video and reference image: the output takes the image's aspect (square)
              "animate2": dict(video=np.zeros((5, 64, 64, 3), np.uint8), image=np.zeros((64, 64, 3), np.uint8)),
              # S2V: a reference image and 1 s of sound; num_frames is one clip's (a multiple of 4)
              "s2v": dict(image=torch.zeros(3, 64, 64), audio=(np.zeros(16_000, np.float32), 16_000))}
    frames = 8 if files.model_type == "s2v" else 5
    common = dict(experts=2 if files.moe else 1, seed=0, **images.get(files.model_type, {}))
    plan = plan_request(files.model_type, "a cat", model_defaults=files.defaults, **common)
    assert (plan.width, plan.height, plan.num_frames, plan.steps) == (64, 64, frames, 4)
    official = plan_request(files.model_type, "a cat", width=64, height=64, num_frames=frames, num_inference_steps=4,
                            **common)
    assert plan == official  # the rest as if the folder had no defaults: the official ones


def test_pth_files_load_as_official_checkpoints_with_mmap(homes):
    import zipfile

    for file in sorted((homes[0] / "tiny-i2v").glob("*.pth")):
        with zipfile.ZipFile(file) as archive:
            assert archive.testzip() is None  # CRCs agree with the rewritten serialization_id
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        assert state and all(v.dtype == torch.float32 for v in state.values())


def test_tokenizer_has_a_fixed_vocabulary(homes):
    from wanx.models.t5 import UMT5Encoder
    from wanx.text import Tokenizer

    data = json.loads((homes[0] / "tiny" / "google" / "umt5-xxl" / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    assert len(vocab) == UMT5Encoder("tiny").config.vocab
    assert [piece for piece, _ in vocab[:3]] == ["<pad>", "</s>", "<unk>"] and data["model"]["unk_id"] == 2
    ids, mask = Tokenizer(homes[0] / "tiny" / "google" / "umt5-xxl", length=8)(["a cat walks", "Zebra"])
    assert mask[0].sum() == 4 and ids[0, 3] == 1  # ▁a ▁cat ▁walks </s>
    assert 2 in ids[1].tolist()  # Z is not in the corpus: <unk>


def test_same_prompt_and_seed_give_the_same_video_from_either_home(homes, tmp_path, monkeypatch):
    from wanx.cli import main
    from wanx.video import read_video

    frames = []
    for i, home in enumerate(homes):
        monkeypatch.setenv("WANX_HOME", str(home))
        out = tmp_path / f"{i}.mp4"
        assert main(["generate", "--model", "tiny", "--prompt", "a cat walks on the grass", "--seed", "3",
                     "--size", "64x48", "--frames", "5", "--steps", "2", "--quiet", "--output", str(out)]) == 0
        frames.append(np.asarray(read_video(out).frames))
    assert frames[0].shape[0] == 5 and np.array_equal(frames[0], frames[1])


@pytest.mark.parametrize("stamp", ["missing", "old", "other task"])
def test_a_set_made_by_another_recipe_is_made_again(homes, tmp_path, monkeypatch, stamp):
    monkeypatch.setenv("WANX_HOME", str(tmp_path))
    folder = tmp_path / "tiny"
    make_tiny_model(folder, "t2v")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"made by an older wanx")
    if stamp == "missing":
        (folder / STAMP).unlink()
    else:
        old = {"wanx_tiny_version": TINY_VERSION - 1, "task": "t2v", "seed": 0}
        (folder / STAMP).write_text(json.dumps(old if stamp == "old" else {**old, "wanx_tiny_version": TINY_VERSION,
                                                                           "task": "i2v"}), encoding="utf-8")
    assert tiny_model_dir("tiny") == folder
    assert _digests(folder) == _digests(homes[0] / "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # replaced atomically, nothing left over


def test_a_current_set_is_not_made_again(homes, monkeypatch):
    import wanx.tiny

    monkeypatch.setenv("WANX_HOME", str(homes[0]))
    monkeypatch.setattr(wanx.tiny, "make_tiny_model", lambda *a, **k: pytest.fail("remade a current set"))
    assert tiny_model_dir("tiny-flf2v") == homes[0] / "tiny-flf2v"


def _values_digest(folder):
    """SHA-256 of every tensor's name, dtype, shape and bytes: the weights, not the file format."""
    from wanx.loading.files import open_checkpoint

    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.suffix in (".pth", ".safetensors")):
        store = open_checkpoint(file)
        for key in sorted(store.keys()):
            tensor = store.get(key).contiguous()
            digest.update(f"{file.name}/{key}/{tensor.dtype}/{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        store.close()
    return digest.hexdigest()


# The weights of the tiny-flf2v set (which holds all four networks), on any machine. A change of
# the recipe changes this digest: bump wanx.tiny.TINY_VERSION then, so existing sets are remade.
FLF2V_WEIGHTS_SHA256 = "e5d8c8e28f3e9d11846cf203cdc43139ad6a708d361318d57bfb56b7b9446713"


def test_weights_are_the_same_on_every_machine(homes):
    assert _values_digest(homes[0] / "tiny-flf2v") == FLF2V_WEIGHTS_SHA256, f"bump TINY_VERSION (now {TINY_VERSION})"


def test_portable_weights_keep_constants_and_refuse_computed_buffers():
    from wanx.tiny import portable_weights

    layer = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.LayerNorm(8))
    state = portable_weights(layer, "k")
    assert torch.equal(state["1.weight"], torch.ones(8)) and torch.equal(state["1.bias"], torch.zeros(8))
    bound = 64 ** -0.5  # PyTorch's default for Linear(64, 8), its bias too
    assert 0.9 * bound < state["0.weight"].abs().max() < bound and 0 < state["0.bias"].abs().max() < bound
    # exact odd multiples of bound / 2**24 rounded once to float32: independent of the module's own init
    assert torch.equal(portable_weights(torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.LayerNorm(8)), "k")["0.weight"],
                       state["0.weight"])
    assert not torch.equal(portable_weights(layer, "other key")["0.weight"], state["0.weight"])

    layer.register_buffer("freqs", torch.cos(torch.arange(8.0)))
    with pytest.raises(ValueError, match="computed floating-point buffer"):
        portable_weights(layer, "k")
