"""Rosters (``services.scheduler.rosters``): a bounded sample of a site's executors for the hub's scheduler, who
says an executor is dead, and which relayed heartbeats change anything."""

from __future__ import annotations

from din.services.scheduler.registry import ExecutorRegistry
from din.services.scheduler.rosters import PER_MODEL, HubRosters, LostExecutors, roster, sample
from din.shared.contracts.federation import SiteRosterV1
from tests.support import NOW_MS, make_heartbeat


def fleet(count: int, site: str = "factory", models: tuple[str, ...] = ("digits-small",)) -> ExecutorRegistry:
    registry = ExecutorRegistry()
    for i in range(count):
        registry.observe(make_heartbeat(f"{site}-{i}", site, list(models), inflight=i), now=0.0)
    return registry


def test_a_roster_is_bounded_by_models_not_by_executors():
    small, large = sample(fleet(10)), sample(fleet(10_000))
    assert len(large) == len(small) <= PER_MODEL * 3
    two_models = sample(fleet(10_000, models=("digits-small", "digits-large")))
    assert len(two_models) <= 2 * PER_MODEL * 3


def test_a_roster_carries_the_executors_with_the_most_room():
    registry = fleet(100)
    ids = {hb.executor for hb in sample(registry)}
    assert "factory-0" in ids and "factory-99" not in ids


def test_a_roster_names_only_its_own_sites_executors_and_the_lost_ones():
    registry = fleet(3)
    registry.observe(make_heartbeat("cloud-1", "cloud", ["digits-small"]), now=0.0)
    lost = LostExecutors(keep_ms=1500.0)
    lost.note("factory-7", NOW_MS)
    built = roster(registry, lost, site="factory", instance="factory", now_ms=NOW_MS, interval_s=0.5)
    assert {hb.site for hb in built.executors} == {"factory"}
    assert built.lost == ["factory-7"]


def test_lost_executors_are_listed_for_a_few_intervals_then_dropped():
    lost = LostExecutors(keep_ms=1500.0, limit=3)
    lost.note("a", 0.0)
    lost.note("a", 10.0)
    lost.note("b", 1000.0)
    assert lost.recent(1400.0) == ["a", "b"]
    assert lost.recent(2000.0) == ["b"]
    for name in ("c", "d", "e"):
        lost.note(name, 2000.0)
    assert lost.recent(2000.0) == ["c", "d", "e"]


def roster_of(site: str, *beats, lost=(), sent_ms=NOW_MS) -> SiteRosterV1:
    return SiteRosterV1(site=site, instance=site, sent_ms=sent_ms, interval_s=0.5, executors=list(beats),
                        lost=list(lost))


def test_the_hub_ignores_its_own_and_unknown_sites_rosters():
    hub = HubRosters("cloud")
    sites = {"cloud", "factory"}
    assert hub.accepts(roster_of("factory"), sites)
    assert not hub.accepts(roster_of("cloud"), sites)
    assert not hub.accepts(roster_of("mars"), sites)


def test_only_newer_heartbeats_of_the_rosters_own_site_are_news():
    old = make_heartbeat("factory-1", "factory", ["digits-small"], sent_ms=NOW_MS)
    new = make_heartbeat("factory-1", "factory", ["digits-small"], sent_ms=NOW_MS + 500)
    unknown = make_heartbeat("factory-2", "factory", ["digits-small"])
    foreign = make_heartbeat("branch-1", "branch", ["digits-small"])
    held = {"factory-1": old}.get
    assert HubRosters.news(roster_of("factory", old, unknown, foreign), held) == [unknown]
    assert HubRosters.news(roster_of("factory", new), held) == [new]


def test_an_executor_out_of_view_is_dead_only_once_its_sites_rosters_stop():
    hub = HubRosters("cloud")
    assert hub.expired_is_dead("factory", NOW_MS), "never heard of the site: its executors' jobs go elsewhere"
    hub.observe(roster_of("factory"), NOW_MS)
    assert not hub.expired_is_dead("factory", NOW_MS + 1000), "left the sample while its site still reports"
    assert hub.expired_is_dead("factory", NOW_MS + 1600), "the site's rosters stopped (three intervals)"
    assert hub.expired_is_dead("cloud", NOW_MS), "the hub's own executors: heartbeats decide"
