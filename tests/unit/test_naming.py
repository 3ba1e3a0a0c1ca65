import pytest

from din.shared.naming import InvalidNameError, Subjects, Topics, token, work_stream


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: Subjects.infer("acme", "digits-small"), "din.v1.infer.acme.digits-small"),
        (lambda: Subjects.execute("factory", "factory-1"), "din.v1.exec.factory.factory-1"),
        (lambda: Subjects.work("branch", "digits-large"), "din.v1.work.branch.digits-large"),
        (lambda: Subjects.work_all("branch"), "din.v1.work.branch.>"),
        (lambda: Subjects.heartbeat("cloud", "cloud-1"), "din.v1.heartbeat.cloud.cloud-1"),
        (lambda: Subjects.health("admission"), "din.v1.health.admission"),
        (lambda: Subjects.health("executor", "cloud-1"), "din.v1.health.executor.cloud-1"),
        (lambda: Subjects.control("executor", "cloud-1"), "din.v1.control.executor.cloud-1"),
        (lambda: Subjects.probe("factory"), "din.v1.probe.factory"),
        (lambda: Subjects.completed("factory"), "din.v1.events.completed.factory"),
        (lambda: work_stream("edge-2"), "DIN_WORK_EDGE_2"),
        (lambda: Topics.scoped(Topics.COMPLETIONS, "t1234"), "din.v1.executor.completions.t1234"),
    ],
)
def test_names_are_built_from_parts(build, expected):
    assert build() == expected


@pytest.mark.parametrize("bad", ["", "a.b", "a*", ">", "a b", "tab\t", "x" * 65, "ü", None, 3])
def test_tokens_that_would_break_a_subject_are_refused(bad):
    with pytest.raises(InvalidNameError):
        token(bad)


@pytest.mark.parametrize("bad", ["acme.evil", "*", ">", " acme"])
def test_a_tenant_cannot_escape_its_subject(bad):
    with pytest.raises(InvalidNameError):
        Subjects.infer(bad, "digits-small")


def test_parse_infer_round_trips_and_rejects_other_subjects():
    assert Subjects.parse_infer(Subjects.infer("acme", "m1")) == ("acme", "m1")
    for subject in ["din.v1.infer.acme", "din.v2.infer.acme.m1", "din.v1.exec.a.b", "din.v1.infer.a.b.c"]:
        with pytest.raises(InvalidNameError):
            Subjects.parse_infer(subject)


def test_every_topic_is_versioned_and_unknown_bases_are_refused():
    assert all(t.startswith("din.v1.") for t in Topics.ALL)
    assert len(set(Topics.ALL)) == len(Topics.ALL)
    with pytest.raises(InvalidNameError):
        Topics.scoped("din.v1.nope", "x")


def test_a_subscriber_of_every_site_subscribes_site_by_site():
    sites = ["cloud", "factory"]
    assert Subjects.per_site(Subjects.HEARTBEAT_ALL, sites) == ["din.v1.heartbeat.cloud.*",
                                                               "din.v1.heartbeat.factory.*"]
    assert Subjects.per_site(Subjects.COMPLETED_ALL, sites) == ["din.v1.events.completed.cloud",
                                                               "din.v1.events.completed.factory"]
    assert Subjects.per_site(Subjects.SUMMARY_ALL, sites) == ["din.v1.summary.cloud", "din.v1.summary.factory"]
    assert Subjects.per_site(Subjects.heartbeat_site("cloud"), sites) == ["din.v1.heartbeat.cloud.*"]
    assert Subjects.per_site(Subjects.INFER_ALL, sites) == [Subjects.INFER_ALL]
    assert Subjects.per_site(Subjects.HEARTBEAT_ALL, []) == [Subjects.HEARTBEAT_ALL]
