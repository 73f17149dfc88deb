"""The CLI spells its choice lists out (so that `wanx --help` never imports torch): each must
be the registry the library checks against, so a new sampler, backend or mode shows in --help."""

from __future__ import annotations

import argparse

from wanx.attention import BACKENDS
from wanx.cli import _JOB_KEYS, build_parser
from wanx.distributed.sequence import MODES
from wanx.hub import SOURCES
from wanx.request import JOB_KEYS
from wanx.runtime import DTYPES, OFFLOAD
from wanx.sampling import SAMPLERS


def choices(command: str) -> dict[str, list]:
    """--flag -> its choices, for one subcommand."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {flag: list(action.choices) for action in sub.choices[command]._actions if action.choices
            for flag in action.option_strings}


def test_choice_lists_are_the_registries():
    for command in ("generate", "serve"):
        flags = choices(command)
        assert flags["--offload"] == list(OFFLOAD)
        assert flags["--attention"] == list(BACKENDS)
    flags = choices("generate")
    assert flags["--sampler"] == list(SAMPLERS)
    assert flags["--sp"] == [*MODES, "none"]
    assert set(choices("train")["--offload"]) < set(OFFLOAD)
    for command in ("generate", "serve", "prepare", "train", "calibrate-cache"):
        assert choices(command)["--dtype"] == ["auto", *DTYPES]
    for command in ("generate", "serve", "prepare", "train", "calibrate-cache", "download"):
        assert choices(command)["--source"] == list(SOURCES)
    assert set(_JOB_KEYS) == JOB_KEYS
