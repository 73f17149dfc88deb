"""Speed transforms applied to a built model from outside (model math stays in `models`)."""

from .compile import CompiledBlocks, compile_blocks

__all__ = ["CompiledBlocks", "compile_blocks"]
