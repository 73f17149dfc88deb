import pytest
import torch

from tests.oracles import assert_same_outputs, diffusers_dit, official_state, run_diffusers_dit, tiny_dit
from wanx.configs import DIT_PRESETS, dit_config
from wanx.models.transformer import WanDiT, rope_axes, sinusoidal_embedding


def inputs(cfg, batch=2, frames=3, height=8, width=12, text=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.out_dim, frames, height, width, generator=gen)
    context = torch.randn(batch, text, cfg.text_dim, generator=gen)
    extra = {}
    if cfg.has_y:
        extra["y"] = torch.randn(batch, cfg.in_dim - cfg.out_dim, frames, height, width, generator=gen)
    if cfg.has_image_input:
        extra["clip_features"] = torch.randn(batch, cfg.image_tokens, cfg.image_dim, generator=gen)
    return x, torch.tensor([999.0, 437.5])[:batch], context, extra


def per_token(t, x, first_frame=0.0):
    """The official TI2V timestep `[B, L]`: t on every patch token, `first_frame` on frame 0's."""
    f, h, w = x.shape[2], x.shape[3] // 2, x.shape[4] // 2
    tokens = t[:, None].repeat(1, f * h * w)
    if first_frame is not None:
        tokens[:, : h * w] = first_frame
    return tokens


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v", "tiny-flf2v"])
def test_matches_diffusers(name):
    """Same weights (official layout, converted by diffusers' own converter), same numbers."""
    model = tiny_dit(name)
    cfg = model.config
    assert cfg.head_dim == 16 and rope_axes(16) == (8, 4, 4)  # uneven split, like 44/42/42
    oracle = diffusers_dit(cfg, official_state(model))
    x, t, context, extra = inputs(cfg)
    with torch.no_grad():
        ours = model(x, t, context, **extra)
    theirs = run_diffusers_dit(oracle, cfg, x, t, context, **extra)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-4 * scale


@pytest.mark.parametrize("name", ["tiny-ti2v", "tiny-i2v-A14B", "tiny"])
def test_per_token_timesteps_match_diffusers(name, tmp_path):
    """Wan2.2's per-token timestep (frame 0 at t=0, as TI2V's image frame) against diffusers'
    `WanTransformer3DModel` given the same `[B, L]` timestep (its expand_timesteps path); the
    model as built, and loaded back from official and diffusers-layout folders."""
    import wanx
    from tests.oracles import write_diffusers_dit, write_official_dit

    model = tiny_dit(name)
    cfg = model.config
    oracle = diffusers_dit(cfg, official_state(model))
    x, t, context, extra = inputs(cfg)
    timestep = per_token(t, x)
    theirs = run_diffusers_dit(oracle, cfg, x, timestep, context, **extra)
    loaded = [wanx.load_model(write_official_dit(tmp_path / "official", model)),
              wanx.load_model(write_diffusers_dit(tmp_path / "diffusers", model))]
    for dit in [model, *loaded]:
        assert dit.config == cfg
        with torch.no_grad():
            ours = dit(x, timestep, context, **extra)
        assert ours.shape == x.shape
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    # the frame-0 tokens really see another timestep than the rest
    with torch.no_grad():
        assert not torch.allclose(ours, model(x, t, context, **extra), atol=1e-3)


def test_one_timestep_per_token_is_the_per_sample_path():
    """`[B, L]` holding one value per sample gives exactly the `[B]` result (and `[1, L]`
    exactly the `[1]` one): bit for bit, the per-sample path is what runs."""
    model = tiny_dit("tiny-ti2v")
    x, t, context, _ = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model(x, per_token(t, x, first_frame=None), context), model(x, t, context))
        assert torch.equal(model(x, per_token(t[:1], x, first_frame=None), context), model(x, t[:1], context))


def test_per_token_timestep_broadcasts_over_the_batch():
    model = tiny_dit("tiny-ti2v")
    x, t, context, _ = inputs(model.config)
    one = per_token(t[:1], x)  # [1, L]: one token pattern for both rows (batched guidance)
    with torch.no_grad():
        both = model(x, one, context)
        rows = [model(x[i:i + 1], one, context[i:i + 1]) for i in range(2)]
    assert_same_outputs(both, torch.cat(rows))
    with pytest.raises(ValueError, match=r"per-token timestep must be \[2, 72\]"):
        model(x, one[:, :-1], context)


def test_text_is_padded_to_text_len_before_embedding():
    """Padding rows become text_embedding(0) and are attended: a shorter context must equal
    the same context zero-padded by the caller. The two inputs differ in shape before the
    padding, so kernels may differ: equal to fp32 rounding, not bit for bit."""
    model = tiny_dit()
    x, t, context, _ = inputs(model.config)
    padded = torch.nn.functional.pad(context, (0, 0, 0, 100))
    with torch.no_grad():
        assert_same_outputs(model(x, t, context), model(x, t, padded))


def test_timestep_embedding_is_float64_cos_first():
    emb = sinusoidal_embedding(256, torch.tensor([998.39], dtype=torch.float64))
    assert emb.dtype == torch.float64
    assert torch.allclose(emb[0, 0], torch.cos(torch.tensor(998.39, dtype=torch.float64)))
    # A bf16 timestep would round 998.39 to 1000 (a known bug elsewhere); we keep it exact.
    assert not torch.allclose(emb, sinusoidal_embedding(256, torch.tensor([1000.0])))


def test_rope_split_formula():
    assert rope_axes(128) == (44, 42, 42)
    assert rope_axes(16) == (8, 4, 4)


def test_presets_have_released_sizes():
    with torch.device("meta"):
        models = {name: WanDiT(DIT_PRESETS[name]) for name in
                  ("t2v-1.3B", "t2v-14B", "i2v-14B", "flf2v-14B", "t2v-A14B", "i2v-A14B", "ti2v-5B")}
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert counts == {"t2v-1.3B": 1_418_996_800, "t2v-14B": 14_288_491_584,
                      "i2v-14B": 16_394_878_784, "flf2v-14B": 16_395_536_704,
                      # Wan2.2 (reference §1/§6: the official WanModel on the meta device)
                      "t2v-A14B": 14_288_491_584, "i2v-A14B": 14_288_901_184, "ti2v-5B": 4_999_787_712}
    keys = {name: len(model.state_dict()) for name, model in models.items()}
    assert keys["t2v-A14B"] == keys["i2v-A14B"] == 1095 and keys["ti2v-5B"] == 825  # the T2V key set, no img_emb
    assert models["ti2v-5B"].head.head.weight.shape == (192, 3072)


def test_bf16_keeps_fp32_islands_and_stays_close():
    model = tiny_dit()
    x, t, context, _ = inputs(model.config)
    with torch.no_grad():
        ref = model(x, t, context)
        half = tiny_dit()
        for name, p in half.named_parameters():
            if not any(f".{k}." in f".{name}." for k in WanDiT.keep_in_fp32):
                p.data = p.data.bfloat16()
        out = half(x, t, context)
    assert out.dtype == torch.float32
    assert half.blocks[0].modulation.dtype == torch.float32 and half.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, c, e: (x[:, :, :, :7], c, e), "divisible by patch size"),
        (lambda x, c, e: (x, torch.zeros(2, 513, 32), e), "context must be"),
        (lambda x, c, e: (x[:, :15], c, e), "input channels"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    model = tiny_dit()
    x, t, context, extra = inputs(model.config)
    x, context, extra = change(x, context, extra)
    with pytest.raises(ValueError, match=message):
        model(x, t, context, **extra)


def test_wan22_i2v_takes_y_but_no_clip_features():
    model = tiny_dit("tiny-i2v-A14B")
    x, t, context, extra = inputs(model.config)
    assert set(extra) == {"y"} and not hasattr(model, "img_emb")
    with pytest.raises(ValueError, match="no CLIP"):
        model(x, t, context, clip_features=torch.zeros(2, 257, 1280), **extra)


def test_i2v_requires_image_inputs():
    model = tiny_dit("tiny-i2v")
    x, t, context, extra = inputs(model.config)
    with pytest.raises(ValueError, match="36 input channels"):
        model(x, t, context)
    with pytest.raises(ValueError, match="needs clip_features"):
        model(x, t, context, y=extra["y"])


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown DiT preset"):
        dit_config("t2v-7B")


# -- the seams (issue 27): ordered wrapper lists, each transform adds and takes off its own ----


def test_wrappers_compose_in_list_order_first_outermost():
    dit = tiny_dit()
    x, t, context, _ = inputs(dit.config)
    with torch.no_grad():
        plain = dit(x, t, context)
        calls = []

        def loop(tag):
            def wrapper(inner, state):
                calls.append(f"{tag}>")
                out = inner(state)
                calls.append(f"<{tag}")
                return out
            return wrapper

        def block(tag):
            def wrapper(inner, blk, *inputs):
                calls.append(f"{tag}{list(dit.blocks).index(blk)}")
                return inner(blk, *inputs)
            return wrapper

        dit.loop_wrappers += [loop("a"), loop("b")]
        dit.block_wrappers += [block("p"), block("q")]
        assert torch.equal(dit(x, t, context), plain)  # wrappers that change nothing change no bit
        assert calls == ["a>", "b>", "p0", "q0", "p1", "q1", "<b", "<a"]
        # the same as forward, seam by seam
        state = dit.embed(x, t, context)
        assert state.x.shape == (2, 3 * 4 * 6, dit.config.dim) and state.grid == (3, 4, 6)
        assert torch.equal(dit.run_head(state, dit.run_blocks(state)), plain)


def test_each_transform_takes_off_only_its_own_wrapper():
    """Streaming, sequence parallel, the step cache and compile put themselves at their place in
    the lists (cache first, sequence parallel last; compile after streaming) and `remove()` leaves
    the lists as they were, whatever the order of removal."""
    import torch.distributed as dist

    from wanx.distributed.sequence import SequenceParallel
    from wanx.memory.streaming import BlockStreamer, compute_device, streamer_of
    from wanx.speed.cache import StepCache
    from wanx.speed.compile import compile_blocks

    dit = tiny_dit()
    x, t, context, _ = inputs(dit.config)

    def mine_loop(inner, state):
        return inner(state)

    def mine_block(inner, blk, *inputs):
        return inner(blk, *inputs)

    dit.loop_wrappers.append(mine_loop)
    dit.block_wrappers.append(mine_block)
    with torch.no_grad():
        plain = dit(x, t, context)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        streamer = BlockStreamer(dit, "cpu", 0)
        sequence = SequenceParallel(dit, mode="ulysses")
        cache = StepCache("teacache", quiet=True).add_to(dit)
        assert dit.loop_wrappers == [cache, mine_loop, sequence]
        assert dit.block_wrappers == [mine_block, streamer]
        assert streamer_of(dit) is streamer and compute_device(dit) == torch.device("cpu")
        with torch.no_grad():  # one rank, a cache not started, every block streamed: the same bits
            assert torch.equal(dit(x, t, context), plain)
        assert streamer.stats.moved_bytes > 0
        compiled = compile_blocks(dit)  # torch.compile compiles on the first call: none here
        assert dit.block_wrappers == [mine_block, streamer, compiled]
        dit.block_wrappers.append(mine_block)  # after the compiled block: it would never run
        with pytest.raises(RuntimeError, match="last of dit.block_wrappers"), torch.no_grad():
            dit(x, t, context)
        dit.block_wrappers.pop()
        sequence.remove()
        compiled.remove()
        cache.remove()
        streamer.remove()
    finally:
        dist.destroy_process_group()
    assert dit.loop_wrappers == [mine_loop] and dit.block_wrappers == [mine_block]
    assert streamer_of(dit) is None and all(b.self_attn.attention_fn is None for b in dit.blocks)
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in dit.modules())
    with torch.no_grad():
        assert torch.equal(dit(x, t, context), plain)
