"""Signed control messages (``shared.security.control``): who may sign what, freshness, claims, and the counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from din.services.telemetry.metrics import OTHER, TelemetryMetrics
from din.shared.contracts.events import CompletionV1, LoadModelV1, PressureV1, ProbeV1
from din.shared.contracts.federation import SiteSummaryV1
from din.shared.contracts.inference import SlaClass
from din.shared.envelope import Identity
from din.shared.naming import Subjects
from din.shared.security import (
    OPERATOR,
    ControlRefused,
    ControlSigner,
    ControlVerifier,
    Refusal,
    may_sign,
    verify_reply,
)
from din.shared.security.control import MAX_INTERVAL_S, MAX_SKEW_S, NONCE_HEADER, TIME_HEADER
from tests.support import make_heartbeat

NOW = 1_800_000_000.0
IDS = {name: Identity.generate(name) for name in ("site-cloud", "site-factory", OPERATOR, "site-gone")}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(clock) -> ControlVerifier:
    agent = SimpleNamespace(publics={n: i.public for n, i in IDS.items()}, revoked=frozenset({"site-gone"}))
    return ControlVerifier(agent, clock=clock)


def signer(name: str, clock) -> ControlSigner:
    return ControlSigner(IDS[name], clock=clock)


def completion(**fields) -> CompletionV1:
    defaults = dict(request_id="r1", tenant="acme", site="cloud", executor="cloud-1", model="m", model_version="1",
                    sla_class=SlaClass.BATCH, ok=True, batch_size=1, degraded=False, timings_ms={"total": 3.0},
                    at_ms=0)
    return CompletionV1(**{**defaults, **fields})


def beat_body(executor="cloud-1", site="cloud", **fields) -> bytes:
    return make_heartbeat(executor, site, ["digits-small"], **fields).model_dump_json().encode()


def refusal(verifier, channel, subject, body, headers) -> Refusal | None:
    try:
        verifier.open(channel, subject, body, headers)
    except ControlRefused as refused:
        return refused.reason
    return None


@pytest.mark.parametrize(("channel", "subject", "signer_name", "allowed"), [
    ("heartbeat", Subjects.heartbeat("cloud", "cloud-1"), "site-cloud", True),
    ("heartbeat", Subjects.heartbeat("cloud", "cloud-1"), "site-factory", False),
    ("heartbeat", Subjects.heartbeat("cloud", "cloud-1"), OPERATOR, False),
    ("pressure", Subjects.pressure("cloud"), "site-cloud", True),
    ("pressure", Subjects.pressure("cloud"), "site-factory", False),
    ("summary", Subjects.summary("factory"), "site-factory", True),
    ("summary", Subjects.summary("cloud"), "site-factory", False),
    ("roster", Subjects.roster("factory"), "site-factory", True),
    ("roster", Subjects.roster("branch"), "site-factory", False),
    ("completed", Subjects.completed("cloud"), "site-cloud", True),
    ("completed", Subjects.completed("cloud"), "site-factory", False),
    ("probe", Subjects.probe("factory"), "site-cloud", True),
    ("probe", Subjects.probe("factory"), OPERATOR, False),
    ("control", Subjects.control("executor", "cloud-2"), OPERATOR, True),
    ("control", Subjects.control("executor", "cloud-2"), "keymanager", True),
    ("control", Subjects.control("executor", "cloud-2"), "site-cloud", False),
    ("heartbeat", Subjects.pressure("cloud"), "site-cloud", False),
    ("pressure", Subjects.heartbeat("cloud", "cloud-1"), "site-cloud", False),
])
def test_who_may_sign_what(channel, subject, signer_name, allowed):
    assert may_sign(channel, subject, signer_name) is allowed


def test_a_signed_heartbeat_is_accepted_and_each_forgery_refused_by_its_reason(verifier, clock):
    subject, body = Subjects.heartbeat("cloud", "cloud-1"), beat_body()
    good = signer("site-cloud", clock).headers(subject, body)
    assert verifier.open("heartbeat", subject, body, good).executor == "cloud-1"
    assert refusal(verifier, "heartbeat", subject, body, good) == Refusal.REPLAY
    assert refusal(verifier, "heartbeat", subject, body, None) == Refusal.UNSIGNED
    assert refusal(verifier, "heartbeat", subject, body, signer("site-factory", clock).headers(subject, body)) \
        == Refusal.NOT_ALLOWED
    assert refusal(verifier, "heartbeat", subject, body, signer("site-gone", clock).headers(subject, body)) \
        == Refusal.REVOKED
    stranger = ControlSigner(Identity.generate("site-cloud"), clock=clock).headers(subject, body)
    assert refusal(verifier, "heartbeat", subject, body, stranger) == Refusal.BAD_SIGNATURE
    other = Subjects.heartbeat("cloud", "cloud-2")
    moved = signer("site-cloud", clock).headers(subject, beat_body("cloud-2"))
    assert refusal(verifier, "heartbeat", other, beat_body("cloud-2"), moved) == Refusal.BAD_SIGNATURE
    fresh = signer("site-cloud", clock).headers(subject, body)
    assert refusal(verifier, "heartbeat", subject, beat_body(capacity=999), fresh) == Refusal.BAD_SIGNATURE
    unknown = {**signer("site-cloud", clock).headers(subject, body), "Din-Ctl-Signer": "site-nowhere"}
    assert refusal(verifier, "heartbeat", subject, body, unknown) == Refusal.UNKNOWN_SIGNER
    bad_time = {**signer("site-cloud", clock).headers(subject, body), TIME_HEADER: "soon"}
    assert refusal(verifier, "heartbeat", subject, body, bad_time) == Refusal.MALFORMED
    assert verifier.detail() == {
        "control_refused": "9", "control_refused_bad_signature": "3", "control_refused_malformed": "1",
        "control_refused_not_allowed": "1", "control_refused_replay": "1", "control_refused_revoked": "1",
        "control_refused_unknown_signer": "1", "control_refused_unsigned": "1",
    }


def test_stale_and_future_messages_are_refused_within_the_skew_accepted(verifier, clock):
    subject, body = Subjects.pressure("cloud"), PressureV1(
        inflight=1, capacity=8, fastest_ms=2.0, executors=2, at_ms=NOW * 1000).model_dump_json().encode()
    cloud = signer("site-cloud", clock)
    old = cloud.headers(subject, body)
    clock.now += MAX_SKEW_S + 1
    assert refusal(verifier, "pressure", subject, body, old) == Refusal.STALE
    ahead = Clock()
    ahead.now = clock.now + MAX_SKEW_S + 1
    assert refusal(verifier, "pressure", subject, body, ControlSigner(IDS["site-cloud"], clock=ahead).headers(
        subject, body)) == Refusal.STALE
    ahead.now = clock.now + MAX_SKEW_S - 1
    assert refusal(verifier, "pressure", subject, body, ControlSigner(IDS["site-cloud"], clock=ahead).headers(
        subject, body)) is None


def test_one_site_s_flood_cannot_push_out_another_site_s_messages(clock):
    agent = SimpleNamespace(publics={n: i.public for n, i in IDS.items()}, revoked=frozenset())
    small = ControlVerifier(agent, clock=clock, max_entries=10)
    ahead = Clock()
    ahead.now = clock.now + MAX_SKEW_S - 1
    flood = ControlSigner(IDS["site-factory"], clock=ahead)
    subject, body = Subjects.heartbeat("factory", "f-1"), beat_body("f-1", "factory")
    for _ in range(50):
        refusal(small, "heartbeat", subject, body, flood.headers(subject, body))
    assert refusal(small, "heartbeat", subject, body, signer("site-factory", clock).headers(subject, body)) \
        == Refusal.STALE, "the flood spoils only the flooding site's own messages"
    cloud_subject = Subjects.heartbeat("cloud", "cloud-1")
    cloud = signer("site-cloud", clock).headers(cloud_subject, beat_body())
    assert small.open("heartbeat", cloud_subject, beat_body(), cloud).executor == "cloud-1"


def test_claims_must_fit_the_subject_and_stay_in_range(verifier, clock):
    cloud = signer("site-cloud", clock)

    def check(channel, subject, body):
        return refusal(verifier, channel, subject, body, cloud.headers(subject, body))

    beat = Subjects.heartbeat("cloud", "cloud-1")
    assert check("heartbeat", beat, beat_body(interval_s=MAX_INTERVAL_S * 10)) == Refusal.OUT_OF_RANGE
    assert check("heartbeat", beat, beat_body(interval_s=0.0)) == Refusal.OUT_OF_RANGE
    assert check("heartbeat", beat, beat_body("cloud-9")) == Refusal.OUT_OF_RANGE
    assert check("heartbeat", beat, beat_body(site="factory")) == Refusal.OUT_OF_RANGE
    huge = PressureV1(inflight=10**12, capacity=1, fastest_ms=1e15, executors=1, at_ms=0).model_dump_json().encode()
    assert check("pressure", Subjects.pressure("cloud"), huge) == Refusal.OUT_OF_RANGE
    summary = SiteSummaryV1(site="factory", instance="s", sent_ms=0, interval_s=1.0, models=[])
    assert check("summary", Subjects.summary("cloud"), summary.model_dump_json().encode()) == Refusal.OUT_OF_RANGE
    assert check("completed", Subjects.completed("cloud"), completion(site="factory").model_dump_json().encode()) \
        == Refusal.OUT_OF_RANGE
    probe = ProbeV1(from_site="factory", to_site="branch", sent_ms=0, seq=1).model_dump_json().encode()
    assert check("probe", Subjects.probe("branch"), probe) == Refusal.OUT_OF_RANGE
    assert check("heartbeat", beat, b"[]") == Refusal.MALFORMED


def test_a_completion_s_closing_header_is_covered(verifier, clock):
    subject = Subjects.completed("cloud")
    body = completion().model_dump_json().encode()
    headers = signer("site-cloud", clock).headers(subject, body, {"Din-Request-Id": "r1"})
    verifier.open("completed", subject, body, headers)
    swapped = {**signer("site-cloud", clock).headers(subject, body, {"Din-Request-Id": "r1"}),
               "Din-Request-Id": "someone-else"}
    assert refusal(verifier, "completed", subject, body, swapped) == Refusal.BAD_SIGNATURE


def test_load_commands_only_from_the_operator(verifier, clock):
    subject, body = Subjects.control("executor", "cloud-2"), LoadModelV1(model="m", version="1").model_dump_json(
    ).encode()
    assert verifier.open("control", subject, body, signer(OPERATOR, clock).headers(subject, body)).version == "1"
    assert refusal(verifier, "control", subject, body, signer("site-cloud", clock).headers(subject, body)) \
        == Refusal.NOT_ALLOWED
    assert refusal(verifier, "control", subject, body, None) == Refusal.UNSIGNED


def test_a_probe_echo_must_come_from_the_probed_site(verifier, clock):
    inbox, body = "_INBOX.x.1", b"{}"
    assert verify_reply(verifier, "site-factory", inbox, body, signer("site-factory", clock).headers(inbox, body))
    assert not verify_reply(verifier, "site-factory", inbox, body, signer("site-cloud", clock).headers(inbox, body))
    assert not verify_reply(verifier, "site-factory", inbox, body, None)
    assert verifier.refusals == {"not_allowed": 1, "unsigned": 1}


def test_with_security_off_nothing_is_signed_and_unsigned_is_accepted_in_range(clock):
    off = ControlVerifier(None, clock=clock)
    subject = Subjects.heartbeat("cloud", "cloud-1")
    assert ControlSigner(None).headers(subject, beat_body()) is None
    assert ControlSigner(None).headers(subject, beat_body(), {"Din-Request-Id": "r"}) == {"Din-Request-Id": "r"}
    assert off.open("heartbeat", subject, beat_body(), None).executor == "cloud-1"
    assert refusal(off, "heartbeat", subject, beat_body(interval_s=1e9), None) == Refusal.OUT_OF_RANGE
    assert verify_reply(off, "site-cloud", "_INBOX.x", b"", None)


def test_each_signed_message_carries_its_own_nonce(clock):
    cloud = signer("site-cloud", clock)
    subject, body = Subjects.heartbeat("cloud", "cloud-1"), beat_body()
    assert cloud.headers(subject, body)[NONCE_HEADER] != cloud.headers(subject, body)[NONCE_HEADER]


def test_telemetry_keeps_series_for_a_bounded_number_of_names():
    budgets = {"tenant": 4, "model": 4, "site": 3, "executor": 5, "route": 6}
    metrics = TelemetryMetrics({SlaClass.BATCH: 5000.0}, label_budgets=budgets)
    small = len(metrics.exposition())
    for i in range(3000):
        metrics.observe_completion(completion(request_id=f"r{i}", tenant=f"t{i}", site=f"s{i}", executor=f"e{i}",
                                              model=f"m{i}"))
        metrics.observe_heartbeat(make_heartbeat(f"e{i}", "cloud", [f"m{i}"]))
    exposition = metrics.exposition().decode()
    assert metrics.labels.kept["tenant"] == {f"t{i}" for i in range(4)}
    assert len(metrics._executors) == 5
    assert f'tenant="{OTHER}"' in exposition and 't9"' not in exposition
    assert len(exposition) < small + 60_000
    folded = {line.split('"')[1]: float(line.split()[-1]) for line in exposition.splitlines()
              if line.startswith("din_telemetry_folded_labels_total{")}
    assert folded["tenant"] == 2996 and folded["executor"] == 2995
