"""The separately trained Wan2.1 networks."""

from __future__ import annotations


def keeps_fp32(name: str, patterns: tuple[str, ...]) -> bool:
    """True if `name` (a dotted parameter name) is one a model keeps in float32: one of the
    dotted `patterns` of its `keep_in_fp32` is a run of whole components of the name."""
    dotted = f".{name}."
    return any(f".{p}." in dotted for p in patterns)
