"""Weighted fair queuing between tenants (shared.fairness): shares, bounded waits, clean-up, push-out."""

from collections import Counter

import pytest

from din.shared.fairness import FairClock, FairQueue


def flooded(queue: FairQueue, tenant: str, count: int, cost: float = 1.0) -> None:
    for i in range(count):
        queue.push(tenant, (tenant, i), cost)


@pytest.mark.parametrize("weights", [{"acme": 1.0, "globex": 1.0}, {"acme": 3.0, "globex": 1.0},
                                     {"acme": 1.0, "globex": 0.25, "initech": 2.0}])
def test_under_saturation_each_tenant_is_served_in_proportion_to_its_weight(weights):
    queue = FairQueue(FairClock(weights))
    for tenant in weights:
        flooded(queue, tenant, 1000)
    served = Counter(queue.pop()[0] for _ in range(700))
    total = sum(weights.values())
    for tenant, weight in weights.items():
        assert abs(served[tenant] - 700 * weight / total) <= 1, served


def test_shares_count_cost_not_items():
    queue = FairQueue()
    flooded(queue, "big", 100, cost=4)
    flooded(queue, "small", 400, cost=1)
    served = Counter()
    for _ in range(250):
        tenant, _ = queue.peek()
        served[tenant] += 4 if tenant == "big" else 1
        queue.pop()
    assert abs(served["big"] - served["small"]) <= 4, served


def test_a_light_tenant_is_served_within_the_current_round_and_the_next():
    """Round r serves the items tagged r; acme's item is tagged for the round after the current one."""
    queue = FairQueue(FairClock({"globex": 1.0, "initech": 1.0}))
    flooded(queue, "globex", 500)
    flooded(queue, "initech", 500)
    for _ in range(137):
        queue.pop()
    queue.push("acme", ("acme", 0))
    ahead = 0
    while queue.peek_tenant() != "acme":
        queue.pop()
        ahead += 1
    assert ahead <= 3, "initech's rest of round 69, then round 70: globex and initech arrived first"


def test_a_light_tenant_with_a_small_weight_still_waits_only_its_cost_over_its_weight():
    queue = FairQueue(FairClock({"globex": 1.0, "acme": 0.5}))
    flooded(queue, "globex", 500)
    for _ in range(50):
        queue.pop()
    queue.push("acme", ("acme", 0))
    ahead = 0
    while queue.peek_tenant() != "acme":
        queue.pop()
        ahead += 1
    assert ahead <= 2


def test_each_tenant_keeps_its_own_order_and_ties_go_by_arrival():
    queue = FairQueue()
    queue.push("a", "a0")
    queue.push("b", "b0")
    queue.push("a", "a1")
    queue.push("b", "b1")
    assert [queue.pop() for _ in range(4)] == ["a0", "b0", "a1", "b1"]


def test_a_tenant_that_was_idle_does_not_bank_credit():
    queue = FairQueue()
    flooded(queue, "globex", 100)
    for _ in range(60):
        queue.pop()
    flooded(queue, "acme", 100)
    first_twenty = Counter(queue.pop()[0] for _ in range(20))
    assert abs(first_twenty["acme"] - first_twenty["globex"]) <= 1


def test_empty_tenants_are_forgotten_and_the_clock_restarts_when_nothing_is_queued():
    clock = FairClock()
    queue = FairQueue(clock)
    for round_ in range(50):
        flooded(queue, f"t{round_}", 3)
        queue.pop()
    assert len(queue) == 100 and clock.tenants() == set(queue.tenants()) != set()
    while queue:
        queue.drop() if len(queue) % 2 else queue.pop()
    assert queue.tenants() == [] and clock.tenants() == set() and clock.virtual == 0.0
    with pytest.raises(IndexError):
        queue.peek()
    with pytest.raises(IndexError):
        queue.oldest()


def test_internal_indexes_stay_bounded_by_what_is_queued():
    queue = FairQueue()
    for i in range(5000):
        queue.push(f"t{i % 7}", i)
        queue.push("steady", -i)
        queue.pop()
        queue.evict_for("newcomer")
    assert len(queue._arrivals) <= 2 * len(queue) + 16
    assert len(queue._heads) <= 2 * len(queue.tenants()) + 16


def test_drop_removes_without_moving_virtual_time():
    clock = FairClock()
    queue = FairQueue(clock)
    flooded(queue, "a", 3)
    queue.pop()
    before = clock.virtual
    assert queue.drop() == ("a", 1)
    assert clock.virtual == before
    assert queue.pop() == ("a", 2)


def test_oldest_is_the_earliest_arrival_still_queued():
    queue = FairQueue(FairClock({"slow": 0.1}))
    queue.push("slow", "s0")
    flooded(queue, "fast", 5)
    queue.push("slow", "s1")
    assert queue.oldest() == "s0"
    assert queue.pop() == ("fast", 0)
    assert queue.oldest() == "s0"
    while queue.peek() != "s0":
        queue.pop()
    queue.pop()
    assert queue.oldest() == "s1"


def test_queues_sharing_a_clock_order_their_heads_fairly_across_queues():
    clock = FairClock()
    bulk, light = FairQueue(clock), FairQueue(clock)
    flooded(bulk, "globex", 200)
    for _ in range(30):
        bulk.pop()
    light.push("acme", "a0")
    ahead = 0
    while bulk.head_tag() <= light.head_tag():
        bulk.pop()
        ahead += 1
    assert ahead <= 1, "170 bulk items were queued before acme's, one at most goes first"


def test_push_out_takes_the_newest_item_of_the_heaviest_tenant_until_shares_are_even():
    queue = FairQueue()
    flooded(queue, "globex", 10)
    flooded(queue, "initech", 4)
    evicted = []
    while (victim := queue.evict_for("acme")) is not None:
        evicted.append(victim)
        queue.push("acme", ("acme", len(evicted)))
    assert evicted == [("globex", 9), ("globex", 8), ("globex", 7), ("globex", 6), ("globex", 5)]
    assert (queue.queued("globex"), queue.queued("initech"), queue.queued("acme")) == (5, 4, 5)
    assert queue.evict_for("globex") is None


def test_push_out_respects_weights():
    queue = FairQueue(FairClock({"heavy": 3.0, "light": 1.0}))
    flooded(queue, "heavy", 12)
    pushed = 0
    while queue.evict_for("light") is not None:
        queue.push("light", ("light", pushed))
        pushed += 1
    assert (queue.queued("heavy"), queue.queued("light")) == (9, 3)


def test_weights_and_costs_must_be_positive():
    with pytest.raises(ValueError):
        FairClock({"a": 0.0})
    with pytest.raises(ValueError):
        FairQueue().push("a", 1, cost=0)
