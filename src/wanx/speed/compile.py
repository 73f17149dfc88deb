"""Regional compile: `torch.compile` the repeated DiT block once, shared by every block.

`compile_blocks(dit)` adds a wrapper at the end of `dit.block_wrappers` (the innermost: it
calls the block itself) that calls one compiled function of the block class' `forward` with
each block as `self`. Dynamo caches compiled frames per code object, and with nn.Module
inlining the block's parameters are graph inputs, so every block hits the same cache entry:
one graph for N blocks, compiled once (seconds rather than the minutes of a whole-model
compile), not N graphs that would also run into dynamo's recompile limit (8) on a 30- or
40-block model.

Only `forward` is compiled, not `Module.__call__`, and the wrapper calls it without going
through `block(...)`, so a block's own hooks do not run: what must happen around a block (the
block streamer swapping weights in and out, activation checkpointing, FSDP's gathering of the
block's shards) is a block wrapper before this one in the list, in eager Python around the
graph. Hooks on layers *inside* a block (live LoRAs) are traced into the graph; their
strengths live in tensors so a strength change needs no recompile (see `lora.layer`).

The token count (dim 1 of x, dim 0 of the RoPE tables) is marked dynamic on every call, so
a new video size reuses the graph; batch, width and text length stay static (a new batch size
compiles once more).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..attention import get_attention_backend


@dataclass(eq=False)
class CompiledBlocks:
    """The block wrapper `compile_blocks` adds (the last of `dit.block_wrappers`), with the
    means to undo it (`remove()`)."""

    dit: nn.Module
    blocks: list[nn.Module]
    compiled: object  # the one compiled function every block calls
    dynamic: bool | None
    mode: str | None
    warmup_s: float | None = None  # set by `warm_up`
    _removed: bool = field(default=False, repr=False)

    # Other block classes of the model (a VACE model's `vace_blocks`): one compiled function each.
    others: dict = field(default_factory=dict)

    def __call__(self, inner, block: nn.Module, x, e0, context, context_img, rope, *more):
        if self.dit.block_wrappers[-1] is not self:  # a wrapper inside this one would never run
            raise RuntimeError("the compiled block must be the last of dit.block_wrappers: add the other block "
                               "wrappers (streaming, checkpointing) before compile_blocks")
        if self.dynamic is None:
            # maybe_: a size of 0 or 1 is specialised by dynamo instead of failing the call.
            torch._dynamo.maybe_mark_dynamic(x, 1)
            for table in rope:
                torch._dynamo.maybe_mark_dynamic(table, 0)
            for tensor in more:  # a VACE block's video tokens
                if isinstance(tensor, torch.Tensor) and tensor.ndim == 3:
                    torch._dynamo.maybe_mark_dynamic(tensor, 1)
        compiled = self.others.get(type(block), self.compiled)
        return compiled(block, x, e0, context, context_img, rope, *more)

    def remove(self) -> None:
        """Take the wrapper off: the blocks run eagerly again (compiled code stays in dynamo's
        cache until `torch._dynamo.reset()`; it is simply no longer called)."""
        if self._removed:
            return
        self.dit.block_wrappers[:] = [w for w in self.dit.block_wrappers if w is not self]
        self._removed = True

    def warm_up(self, *inputs, **kwargs) -> float:
        """Run `dit(*inputs, **kwargs)` once without gradients, to compile ahead of the first real step;
        returns (and keeps in `warmup_s`) the seconds it took: compile time, reported apart
        from step time."""
        start = time.perf_counter()
        with torch.no_grad():
            self.dit(*inputs, **kwargs)
        self.warmup_s = time.perf_counter() - start
        return self.warmup_s


def compile_blocks(dit: nn.Module, *, dynamic: bool | None = None, mode: str | None = None,
                   fullgraph: bool = False) -> CompiledBlocks:
    """Compile `dit.blocks` in place: all blocks share one compiled graph (see module doc).

    dynamic: None (default) marks only the token dimension dynamic, so new video sizes reuse
    the graph; True makes every dimension dynamic (torch.compile's own flag); False compiles
    static shapes (one more compile per video size). mode: torch.compile's mode
    ("max-autotune", "reduce-overhead", ...). fullgraph: refuse graph breaks (for checks).
    """
    blocks = list(dit.blocks)
    if not blocks:
        raise ValueError("the model has no blocks to compile")
    if any(isinstance(w, CompiledBlocks) for w in dit.block_wrappers):
        raise ValueError("the blocks are compiled already (compiled twice?): remove() the first first")
    classes = {type(b) for b in blocks}
    if len(classes) != 1:
        raise ValueError(f"blocks of different classes cannot share a graph: {sorted(c.__name__ for c in classes)}")
    # The attention backend is read from WANX_ATTENTION on first use, setting a module global:
    # resolved inside the first traced call, it would fail that call's own `is None` guard
    # and compile the block a second time. (Choosing another backend later recompiles, as it
    # should: the graph calls the backend's kernel.)
    get_attention_backend()
    # The class' plain function, compiled once and called with each block as `self`: one
    # code object, hence one cache entry for all blocks (measured: 1 graph for N blocks).
    # `block.compile()` instead compiles `_call_impl`, pulling the streamer's weight-swapping
    # hooks into the graph, and recompiled on a new video size.
    main = classes.pop()
    compiled = torch.compile(main.forward, dynamic=dynamic, mode=mode, fullgraph=fullgraph)
    # The model's other block lists (`stream_blocks`: a VACE model's vace_blocks), one graph per class.
    others = {}
    for name in getattr(dit, "stream_blocks", ("blocks",)):
        for block in dit.get_submodule(name):
            if type(block) is not main and type(block) not in others:
                others[type(block)] = torch.compile(type(block).forward, dynamic=dynamic, mode=mode, fullgraph=fullgraph)
    handle = CompiledBlocks(dit, blocks, compiled, dynamic, mode, others=others)
    dit.block_wrappers.append(handle)
    return handle
