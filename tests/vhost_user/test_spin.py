"""The adaptive busy-poll window (vhost_user.spin.SpinPolicy), sans I/O:
grow on sleeps shorter than the bound, shrink on longer ones, zero while
the CPU is contended, fixed when adaptation is off; counters asserted."""
import pytest

from vhost_user.spin import CONTENDED_HOLD, GROW_START, PREEMPTED, SpinPolicy

US = 1e-6


def _sleep(p: SpinPolicy, at: float, for_s: float) -> float:
    p.sleeping(at)
    p.woken(at + for_s)
    return at + for_s


def test_window_starts_at_the_bound_and_shrinks_to_zero_on_long_sleeps():
    p = SpinPolicy(200 * US)
    assert p.window == pytest.approx(200 * US)
    t = 1.0
    windows = []
    for _ in range(6):
        t = _sleep(p, t, 1e-3)          # 1 ms: no window within 200 us would have caught it
        windows.append(p.window)
    assert windows[:4] == pytest.approx([100 * US, 50 * US, 25 * US, 12.5 * US])
    assert windows[4:] == [0.0, 0.0]    # below GROW_START: sleep at once
    assert p.metrics.shrinks == 5 and p.metrics.sleeps == 6 and p.metrics.grows == 0


def test_short_sleeps_grow_it_back_to_the_bound():
    p = SpinPolicy(200 * US)
    p.window = 0.0
    t = 1.0
    windows = []
    for _ in range(7):
        t = _sleep(p, t, 80 * US)       # work came back within the bound: polling would have caught it
        windows.append(p.window)
    assert windows == pytest.approx([GROW_START, 20 * US, 40 * US, 80 * US, 160 * US, 200 * US,
                                     200 * US])
    assert p.metrics.grows == 6


def test_a_session_that_caught_work_keeps_its_window():
    p = SpinPolicy(50 * US)
    t = 1.0
    for _ in range(5):
        p.caught()                      # e.g. the ACK of the request just sent, caught by polling
        t = _sleep(p, t, 1e-3)          # then a long sleep until the next request
    assert p.window == pytest.approx(50 * US)
    assert p.metrics.shrinks == 0 and p.metrics.caught == 5
    t = _sleep(p, t, 1e-3)              # a session that caught nothing: shrink
    assert p.window == pytest.approx(25 * US) and p.metrics.shrinks == 1


def test_a_preempted_pass_zeroes_the_window_for_a_while():
    p = SpinPolicy(200 * US)
    p.pass_took(PREEMPTED / 2, 1.0)     # an ordinary pass
    assert p.window == pytest.approx(200 * US) and p.metrics.preempted == 0
    p.pass_took(3e-3, 1.0)              # another task held the CPU for 3 ms
    assert p.window == 0.0 and p.metrics.preempted == 1
    t = _sleep(p, 1.0, 50 * US)         # short sleeps do not grow it while contended
    assert p.window == 0.0
    _sleep(p, t + CONTENDED_HOLD, 50 * US)  # after the hold they do
    assert p.window == pytest.approx(GROW_START)


def test_fixed_window_and_zero_bound_never_move():
    f = SpinPolicy(50 * US, adaptive=False)
    _sleep(f, 1.0, 1.0)
    f.pass_took(1.0, 2.0)
    assert f.window == pytest.approx(50 * US)
    z = SpinPolicy(0.0)
    _sleep(z, 1.0, 1e-6)
    z.pass_took(1.0, 2.0)
    assert z.window == 0.0 and z.metrics.grows == z.metrics.preempted == 0
    with pytest.raises(ValueError, match="negative"):
        SpinPolicy(-1.0)
