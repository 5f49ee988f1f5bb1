"""Settings every test under tests/ shares.

Hypothesis: no per-example deadline and no slow-generation health check. Both
time the machine, not the code: CI runs the whole suite once on a 2-vCPU
machine that is sometimes noisy, and a single example stalled past the default
200 ms deadline (a preemption, a page-fault storm) fails its test as
``DeadlineExceeded`` or ``Flaky``. On a shared 2-vCPU machine under load the
roce codec round trips took up to 990 ms for one example. What the properties
assert is unchanged; pytest-timeout still bounds a test that hangs.
Loaded here, before the test modules import, so that their own
``@settings(...)`` inherit it.
"""
from hypothesis import HealthCheck, settings

settings.register_profile("vrdma", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vrdma")
