"""The 4k+1 frame-count rule, in one place (wanx.configs.frames_ok) for every face."""

from wanx.configs import frames_at_most, frames_ok


def test_frame_counts_are_4k_plus_1():
    assert [n for n in range(-3, 22) if frames_ok(n)] == [1, 5, 9, 13, 17, 21]
    assert [frames_at_most(n) for n in (0, 1, 4, 5, 8, 81, 84)] == [1, 1, 1, 5, 5, 81, 81]
