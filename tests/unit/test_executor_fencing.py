"""An executor's self-fencing (services.executor.fencing over shared.lifecycle.fence): a job is answered only while
its lease cannot have lapsed."""

import pytest

from din.services.executor.fencing import Continuity
from din.shared.lifecycle import FenceReason

LIMIT = 0.5


def ticking(until: float, every: float = 0.02, start: float = 0.0) -> Continuity:
    continuity = Continuity((LIMIT, 0.2), last_tick_s=start)
    now = start
    while now < until:
        now += every
        continuity.tick(now)
    return continuity


def fence(continuity: Continuity, exposed: float, now: float, connected=True, reconnected=False):
    return continuity.fence(exposed_s=exposed, now_s=now, limit_s=LIMIT, connected=connected,
                            reconnected=reconnected)


def test_a_running_executor_answers():
    assert fence(ticking(5.0), exposed=1.0, now=5.0) is None


def test_a_pause_after_the_job_reached_the_executor_fences_it_even_once_resumed():
    continuity = ticking(2.0)
    continuity.tick(12.0)
    assert fence(continuity, exposed=1.5, now=12.01) == FenceReason.STALLED


def test_a_pause_before_the_job_reached_the_executor_does_not():
    continuity = ticking(2.0)
    continuity.tick(12.0)
    continuity.tick(12.02)
    assert fence(continuity, exposed=12.01, now=12.03) is None


def test_a_pause_not_yet_seen_by_the_ticker_fences_as_well():
    assert fence(ticking(2.0), exposed=1.0, now=2.6) == FenceReason.STALLED


def test_a_stall_shorter_than_the_lease_allows_is_no_reason():
    continuity = ticking(2.0)
    continuity.tick(2.4)
    assert fence(continuity, exposed=1.0, now=2.41) is None


def test_a_shorter_lease_fences_on_a_shorter_stall():
    continuity = ticking(2.0)
    continuity.tick(2.3)
    assert continuity.fence(exposed_s=1.0, now_s=2.31, limit_s=0.2, connected=True, reconnected=False) \
        == FenceReason.STALLED
    assert fence(continuity, exposed=1.0, now=2.31) is None


@pytest.mark.parametrize(("connected", "reconnected"), [(False, False), (True, True), (False, True)])
def test_a_dropped_connection_fences_whatever_the_loop_did(connected, reconnected):
    assert fence(ticking(5.0), 1.0, 5.0, connected, reconnected) == FenceReason.RECONNECTED


def test_fenced_answers_are_counted_by_reason():
    continuity = ticking(2.0)
    fence(continuity, exposed=1.0, now=3.0)
    fence(continuity, exposed=1.0, now=2.0, connected=False)
    fence(continuity, exposed=1.0, now=2.0)
    assert continuity.detail() == {"answers_fenced": 2, "answers_fenced_stalled": 1,
                                   "answers_fenced_reconnected": 1}
