"""Suite-wide fixtures: every test starts from the same state, whatever machine it runs on
and whatever ran before it (file order, or the shuffled orders of `make test-shuffled`)."""

from __future__ import annotations

import random
import signal

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_rngs():
    """Seed torch, numpy and random before each test, so unseeded draws (`torch.rand(...)`)
    give the same inputs whichever tests ran first. Code under test may reseed torch too
    (making a tiny model set does): draws that must not depend on that use their own
    `torch.Generator`."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _private_wanx_home(tmp_path_factory):
    """A fresh, empty WANX_HOME for the whole run: tiny model sets are made here on first
    use, never read from (or written to) the user's ~/.cache/wanx, whose copies may be stale."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANX_HOME", str(tmp_path_factory.mktemp("wanx-home-session")))
        yield


@pytest.fixture(scope="session", autouse=True)
def _sigint_not_ignored():
    """A suite started in the background (`cmd &` in a script, nohup, some CI runners) has
    SIGINT ignored, and so would every process a test starts: a Ctrl-C test's child would
    ignore the SIGINT and run to completion. Handle SIGINT as an interactive Python does for
    the run; exec resets a handled signal to its default in the children."""
    if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
