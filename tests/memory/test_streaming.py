"""Block streaming and model offload on the CPU: the same swaps and accounting as on a GPU
(there the copies overlap with compute on a side stream)."""

import pytest
import torch

from tests.loading.test_load_model import dit_inputs
from tests.oracles import assert_same_outputs, tiny_dit
from wanx.memory.streaming import BlockStreamer, parse_bytes, stream_units
from wanx.runtime import Runtime


@pytest.fixture(scope="module")
def model_and_reference():
    model = tiny_dit("tiny-i2v")
    x, t, context, extra = dit_inputs(model.config)
    with torch.no_grad():
        reference = model(x, t, context, **extra)
    return model, (x, t, context, extra), reference


def block_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())


@pytest.mark.parametrize("budget", ["zero", "one block", "half", "all"])
def test_streamed_outputs_equal_the_plain_run_within_budget(model_and_reference, budget):
    model, (x, t, context, extra), reference = model_and_reference
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    bytes_ = {"zero": 0, "one block": block_bytes(model), "half": total // 2, "all": total}[budget]
    streamer = BlockStreamer(model, "cpu", bytes_)
    try:
        with torch.no_grad():
            for _ in range(2):  # the second forward runs on the recorded order
                streamer.stats.reset()
                out = model(x, t, context, **extra)
                # The weights are copies in other memory: equal values, possibly other kernels.
                assert_same_outputs(out, reference)
        stats = streamer.stats
        assert stats.resident <= stats.budget
        # On the device at any time: the resident part plus the one streamed unit running.
        assert stats.peak_device_bytes <= stats.budget + stats.largest_unit
        assert stats.moved_bytes == stats.streamed  # each streamed unit copied once per forward
        assert stats.resident + stats.streamed == total
        if budget == "all":
            assert stats.streamed == 0 and stats.moved_bytes == 0
        if budget == "zero":
            assert stats.resident == 0 and stats.device_bytes == 0  # nothing left on the device between forwards
    finally:
        streamer.remove()


def test_units_cover_every_parameter_once():
    model = tiny_dit("tiny-flf2v")
    units, pinned = stream_units(model)
    names = [u.name for u in units]
    assert names[:4] == ["patch_embedding", "text_embedding", "time_embedding", "time_projection"]
    assert "blocks.0" in names and "blocks.1" in names and "head" in names and "img_emb" in names
    assert not pinned
    assert sum(u.bytes for u in units) == sum(p.numel() * p.element_size() for p in model.parameters())


def test_clip_container_embeddings_stay_resident():
    from wanx.models.clip import CLIPVisionEncoder

    units, pinned = stream_units(CLIPVisionEncoder("tiny"))
    assert [u.name for u in pinned] == ["visual"]  # cls and position embeddings: no forward of their own
    assert any(u.name == "visual.transformer.0" for u in units)


def test_block_streaming_leaves_parameters_in_place(model_and_reference):
    """LoRA layers and optimizers hold Parameter objects: streaming swaps their data only."""
    model, _, _ = model_and_reference
    before = [id(p) for p in model.parameters()]
    streamer = BlockStreamer(model, "cpu", 0)
    assert [id(p) for p in model.parameters()] == before
    streamer.remove()


@pytest.mark.parametrize("text, expected", [("6GB", 6 * 10**9), ("6GiB", 6 * 2**30), ("512MB", 512 * 10**6),
                                            ("0", 0), (1.5e9, 1_500_000_000), ("2.5 gb", 2_500_000_000)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_runtime_memory_choices():
    assert Runtime.create("cpu", vram_budget="6GB").offload == "blocks"
    assert Runtime.create("cpu", num_persistent_param_in_dit=10**9).vram_budget == 4 * 10**9  # fp32 on CPU
    assert Runtime.create("cpu", num_persistent_param_in_dit=10**9, quantize="fp8").vram_budget == 10**9
    with pytest.raises(ValueError, match="not a number of bytes"):
        Runtime.create("cpu", vram_budget="lots")
    with pytest.raises(ValueError, match="cannot go with offload 'model'"):
        Runtime.create("cpu", offload="model", vram_budget=0)
    with pytest.raises(ValueError, match="offload must be one of"):
        Runtime.create("cpu", offload="disk")
    with pytest.raises(ValueError, match="not both"):
        Runtime.create("cpu", vram_budget=0, num_persistent_param_in_dit=5)
