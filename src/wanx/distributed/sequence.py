"""Sequence parallelism for the DiT: every rank holds a slice of the video tokens.

Applied from outside at two seams of `WanDiT`: the block loop (the last of `loop_wrappers`:
the tokens are padded to a multiple of the group size, each rank keeps its slice and the
matching RoPE rows, and the slices are gathered again before the head; a step cache before it
in the list sees whole tensors) and `SelfAttention.attention_fn` (the only place a
token looks at other tokens; cross-attention reads the replicated text, norms, modulation and
the FFN act per token). Unlike the official xDiT path, the padding is masked out of the keys, so
the result equals one device's.

Two ways to attend across ranks:
- Ulysses: an all-to-all turns "my tokens, all heads" into "all tokens, my heads", attention
  runs locally, a second all-to-all turns it back. Needs the head count divisible by the group.
- Ring: queries stay; key/value slices travel around the ring, one hop per step (sent while
  the current slice is computed), merged with a running log-sum-exp. Any group size.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import attention

MODES = ("auto", "ulysses", "ring")


class SequenceParallel:
    """The plan for one DiT over one process group; `remove()` undoes it."""

    def __init__(self, dit: nn.Module, group: dist.ProcessGroup | None = None, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"sequence parallel mode must be one of {', '.join(MODES)}, got {mode!r}")
        if getattr(getattr(dit, "config", None), "model_type", None) == "animate":
            # A face block attends from all of a frame's tokens at once: not split across ranks yet.
            raise ValueError("sequence parallelism does not cover Wan2.2 Animate's face blocks yet: run it without --sp")
        if getattr(getattr(dit, "config", None), "model_type", None) == "s2v":
            # An audio injection attends from all of a latent frame's tokens at once, as a face block.
            raise ValueError("sequence parallelism does not cover Wan2.2 S2V's audio injection yet: run it without --sp")
        self.dit, self.group = dit, group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        heads = dit.config.num_heads
        if mode == "auto":
            mode = "ulysses" if heads % self.size == 0 else "ring"
        if mode == "ulysses" and heads % self.size:
            raise ValueError(f"Ulysses splits the {heads} heads across {self.size} ranks, which does not divide; "
                             "use --sp ring (or a rank count that divides the head count)")
        self.mode = mode
        self.length = 0  # the real token count of the current forward (keys beyond it are padding)
        attend = self._ulysses if mode == "ulysses" else self._ring
        self._attention = [block.self_attn for name in getattr(dit, "stream_blocks", ("blocks",))
                           for block in dit.get_submodule(name)]  # the VACE blocks' too
        for module in self._attention:
            module.attention_fn = attend
        dit.loop_wrappers.append(self)  # innermost: split after everything else, gather first

    def remove(self) -> None:
        for module in self._attention:
            module.attention_fn = None
        self.dit.loop_wrappers[:] = [w for w in self.dit.loop_wrappers if w is not self]

    # -- the block-loop seam -----------------------------------------------------------------

    def __call__(self, inner, state) -> Tensor:
        """The loop wrapper: `inner` (the blocks) on this rank's slice of the tokens, then every
        rank's slices gathered."""
        x, e0, rope = state.x, state.e0, state.rope
        tokens = {name: getattr(state, name) for name in state.token_fields}  # [B, L, D] like x (VACE)
        length = x.shape[1]
        chunk = math.ceil(length / self.size)
        padded = chunk * self.size
        if padded != length:  # padding rows: never attended to as keys, dropped after the gather
            x = F.pad(x, (0, 0, 0, padded - length))
            tokens = {name: F.pad(t, (0, 0, 0, padded - length)) for name, t in tokens.items()}
            rope = tuple(F.pad(r, (0, 0, 0, padded - length)) for r in rope)
            if e0.ndim == 4:  # a per-token timestep (Wan2.2): its modulation rows go with the tokens
                e0 = F.pad(e0, (0, 0, 0, 0, 0, padded - length))
        mine = slice(self.rank * chunk, (self.rank + 1) * chunk)
        self.length = length
        if e0.ndim == 4:
            e0 = e0[:, mine]
        local = inner(replace(state, x=x[:, mine].contiguous(), e0=e0, rope=tuple(r[mine] for r in rope),
                              **{name: t[:, mine].contiguous() for name, t in tokens.items()}))
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, :length]

    # -- attention across ranks ------------------------------------------------------------

    def _ulysses(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """[B, c, H, D] per rank -> all-to-all -> [B, P*c, H/P, D] -> attention -> back."""
        b, c, h, d = q.shape
        p = self.size

        def to_heads(t: Tensor) -> Tensor:
            # send head group j to rank j; receive every rank's tokens of my head group
            send = t.reshape(b, c, p, h // p, d).permute(2, 0, 1, 3, 4).contiguous()  # [P, B, c, H/P, D]
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.group)
            return recv.permute(1, 0, 2, 3, 4).reshape(b, p * c, h // p, d)  # tokens in rank order

        qf, kf, vf = to_heads(q), to_heads(k), to_heads(v)
        lens = torch.full((b,), self.length, device=q.device) if self.length < p * c else None
        out = attention(qf, kf, vf, k_lens=lens)  # [B, P*c, H/P, D]
        send = out.reshape(b, p, c, h // p, d).permute(1, 0, 2, 3, 4).contiguous()  # token slice j -> rank j
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, c, h, d)  # my tokens, head groups in rank order

    def _ring(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Queries stay; (k, v) slices go round the ring. Exact softmax by running
        max / sum, in float32."""
        b, c, h, d = q.shape
        p, rank = self.size, self.rank
        scale = 1 / math.sqrt(d)
        qf = q.float().permute(0, 2, 1, 3) * scale  # [B, H, c, D]
        out = torch.zeros(b, h, c, d, dtype=torch.float32, device=q.device)
        top = torch.full((b, h, c, 1), float("-inf"), device=q.device)
        total = torch.zeros(b, h, c, 1, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        for step in range(p):
            source = (rank - step) % p  # whose slice `kv` holds now
            if step < p - 1:  # pass it on while this one is computed
                incoming = torch.empty_like(kv)
                ops = [dist.P2POp(dist.isend, kv, self._peer(rank + 1), self.group),
                       dist.P2POp(dist.irecv, incoming, self._peer(rank - 1), self.group)]
                requests = dist.batch_isend_irecv(ops)
            valid = min(c, self.length - source * c)  # the last slices may be (partly) padding
            if valid > 0:
                kk = kv[0, :, :valid].float().permute(0, 2, 1, 3)
                vv = kv[1, :, :valid].float().permute(0, 2, 1, 3)
                scores = qf @ kk.transpose(-1, -2)  # [B, H, c, valid]
                new_top = torch.maximum(top, scores.amax(-1, keepdim=True))
                weights = torch.exp(scores - new_top)
                correction = torch.exp(top - new_top)
                out = out * correction + weights @ vv
                total = total * correction + weights.sum(-1, keepdim=True)
                top = new_top
            if step < p - 1:
                for request in requests:
                    request.wait()
                kv = incoming
        return (out / total).permute(0, 2, 1, 3).to(q.dtype)

    def _peer(self, rank: int) -> int:
        """A rank of this group as a global rank (P2P ops take global ranks)."""
        rank %= self.size
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank
