"""Split-point choice: lowest predicted latency under sovereignty and privacy constraints, table-driven."""

from dataclasses import replace

import pytest

from din.services.scheduler.links import LinkTable
from din.services.scheduler.split_point import (
    LOCAL,
    NO_SPLIT,
    PRIVACY,
    SOVEREIGNTY,
    UNAVAILABLE,
    LinkEstimate,
    SplitCandidate,
    SplitContext,
    candidates_from_layers,
    choose_split_point,
)
from din.shared.errors import DinError, ErrorCode

# A CNN-like profile: the input is large, the deeper point is small; heads are slow at the edge.
SHALLOW = SplitCandidate("conv1", intermediate_bytes=400_000, head_ms=4.0, tail_ms=6.0, leakage=0.9)
DEEP = SplitCandidate("pool5", intermediate_bytes=20_000, head_ms=30.0, tail_ms=1.0, leakage=0.3)
CANDIDATES = [SHALLOW, DEEP]
SLOW = LinkEstimate(rtt_ms=20.0, bandwidth_mbps=10.0)
FAST = LinkEstimate(rtt_ms=1.0, bandwidth_mbps=10_000.0)
BASE = SplitContext(
    data_site="factory",
    tail_site="cloud",
    link=SLOW,
    input_bytes=600_000,
    output_bytes=40,
    full_ms_at_tail=7.0,
)


def _ms(link: LinkEstimate, bytes_out: float, head: float = 0.0, tail: float = 0.0) -> float:
    return head + link.transfer_ms(bytes_out, 40) + tail


CASES = [
    # name, context changes, expected choice, expected predicted ms, expected exclusions
    ("slow link: the small deep intermediate wins", {}, "pool5", _ms(SLOW, 20_000, 30.0, 1.0), {}),
    ("fast link, no constraint: ship the raw input", {"link": FAST}, NO_SPLIT, _ms(FAST, 600_000, tail=7.0), {}),
    (
        "fast link, raw input must stay home: the cheapest split",
        {"link": FAST, "allowed_sites": {"factory"}},
        "conv1",
        _ms(FAST, 400_000, 4.0, 6.0),
        {NO_SPLIT: SOVEREIGNTY},
    ),
    (
        "raw input allowed at the tail site",
        {"link": FAST, "allowed_sites": {"factory", "cloud"}},
        NO_SPLIT,
        _ms(FAST, 600_000, tail=7.0),
        {},
    ),
    (
        "the edge serves the whole model fast enough",
        {"full_ms_at_data": 25.0},
        LOCAL,
        25.0,
        {},
    ),
    (
        "privacy limit excludes the leaky shallow point",
        {"link": FAST, "allowed_sites": {"factory"}, "max_leakage": 0.5},
        "pool5",
        _ms(FAST, 20_000, 30.0, 1.0),
        {NO_SPLIT: SOVEREIGNTY, "conv1": PRIVACY},
    ),
    (
        "queueing at the tail site tips the choice to local",
        {"full_ms_at_data": 60.0, "tail_queue_ms": 40.0},
        LOCAL,
        60.0,
        {},
    ),
    (
        "a batch multiplies compute and bytes",
        {"batch": 4, "link": FAST, "allowed_sites": {"factory"}},
        "conv1",
        4.0 * 4 + FAST.transfer_ms(4 * 400_000, 4 * 40) + 6.0 * 4,
        {NO_SPLIT: SOVEREIGNTY},
    ),
    (
        "tail at the data's own site: nothing crosses a link, so no constraint bites",
        {"tail_site": "factory", "allowed_sites": {"factory"}, "max_leakage": 0.1},
        NO_SPLIT,
        7.0,
        {},
    ),
]


@pytest.mark.parametrize(("name", "changes", "chosen", "predicted", "excluded"), CASES, ids=[c[0] for c in CASES])
def test_choice(name, changes, chosen, predicted, excluded):
    decision = choose_split_point(CANDIDATES, replace(BASE, **changes))
    assert decision.point == chosen
    assert decision.predicted_ms == pytest.approx(predicted)
    assert decision.chosen.predicted_ms == pytest.approx(predicted)
    assert [a.point for a in decision.alternatives] == [LOCAL, "conv1", "pool5", NO_SPLIT]
    found = {a.point: a.excluded_by for a in decision.alternatives if a.excluded_by not in (None, UNAVAILABLE)}
    assert found == excluded
    feasible = [a.predicted_ms for a in decision.alternatives if a.excluded_by is None]
    assert decision.predicted_ms == min(feasible)
    assert chosen in decision.reason
    for point, why in excluded.items():
        assert f"{point} ({why}" in decision.reason


def test_predicted_parts_add_up_to_the_prediction():
    decision = choose_split_point(CANDIDATES, BASE)
    for option in decision.alternatives:
        if option.predicted_ms is not None:
            assert option.head_ms + option.transfer_ms + option.tail_ms == pytest.approx(option.predicted_ms)
    assert decision.chosen.bytes_sent == DEEP.intermediate_bytes


def test_unmeasured_leakage_is_refused_when_a_limit_is_set():
    unmeasured = replace(DEEP, leakage=None)
    decision = choose_split_point([unmeasured], replace(BASE, link=FAST, max_leakage=0.5))
    assert {a.point: a.excluded_by for a in decision.alternatives}["pool5"] == PRIVACY
    assert decision.point == NO_SPLIT


def test_ties_keep_the_raw_input_home():
    twin = SplitCandidate("mid", intermediate_bytes=600_000, head_ms=0.0, tail_ms=7.0)
    decision = choose_split_point([twin], BASE)
    assert decision.point == "mid"


def test_no_feasible_option_is_refused_with_every_reason():
    context = replace(BASE, allowed_sites={"factory"}, max_leakage=0.1)
    with pytest.raises(DinError) as refused:
        choose_split_point(CANDIDATES, context)
    assert refused.value.code is ErrorCode.NO_ELIGIBLE_EXECUTOR
    for part in ("local: unavailable", "conv1: privacy", "pool5: privacy", f"{NO_SPLIT}: sovereignty"):
        assert part in refused.value.message


def test_whole_model_missing_at_the_tail_site_leaves_only_splits():
    decision = choose_split_point(CANDIDATES, replace(BASE, link=FAST, full_ms_at_tail=None))
    assert {a.point: a.excluded_by for a in decision.alternatives}[NO_SPLIT] == UNAVAILABLE
    assert decision.point == "conv1"


def test_batch_below_one_is_a_bad_request():
    with pytest.raises(DinError) as refused:
        choose_split_point(CANDIDATES, replace(BASE, batch=0))
    assert refused.value.code is ErrorCode.BAD_REQUEST


def test_transfer_is_a_round_trip_plus_bytes_over_bandwidth():
    link = LinkEstimate(rtt_ms=10.0, bandwidth_mbps=8.0)
    assert link.transfer_ms(1000) == pytest.approx(11.0)
    assert link.transfer_ms(1000, 1000) == pytest.approx(12.0)


def test_link_estimate_from_a_link_table_uses_its_priced_rtt(test_topology):
    links = LinkTable(test_topology, home="factory")
    links.observe_rtt("cloud", 30.0)
    estimate = LinkEstimate.from_links(links, "cloud", bandwidth_mbps=100.0)
    assert estimate.rtt_ms == pytest.approx(links.rtt_ms("cloud"))
    assert estimate.bandwidth_mbps == 100.0


def test_candidates_from_layer_profiles_split_prefix_and_suffix_sums():
    candidates = candidates_from_layers(
        ["a", "b"], [100, 10], data_layer_ms=[1, 2, 3], tail_layer_ms=[0.5, 0.25, 0.125]
    )
    assert [(c.point, c.intermediate_bytes, c.head_ms, c.tail_ms) for c in candidates] == [
        ("a", 100, 1.0, 0.375),
        ("b", 10, 3.0, 0.125),
    ]
    with pytest.raises(ValueError):
        candidates_from_layers(["a"], [100], data_layer_ms=[1], tail_layer_ms=[1])
