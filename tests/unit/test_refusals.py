from din.services.admission.refusals import RefusalTally
from din.shared.errors import DinError, ErrorCode

OVERLOADED = DinError(ErrorCode.OVERLOADED, "past capacity", retry_after_ms=100)


def test_shed_requests_are_recorded_together_once_their_window_closes():
    tally = RefusalTally(window_ms=1000)
    for i in range(5):
        tally.add("globex", "digits-small", OVERLOADED, f"r{i}", 10, 100.0 + i)
    tally.add("acme", "digits-small", OVERLOADED, "a0", 7, 150.0)
    assert tally.due(900.0) == []
    records = {r.tenant: r for r in tally.due(1100.0)}
    assert records["globex"].count == 5 and records["globex"].request_id == "r0"
    assert records["globex"].input_bytes == 50 and records["globex"].at_ms == 104.0
    assert records["acme"].count == 1 and not records["acme"].admitted
    assert records["acme"].reason == "overloaded"
    assert tally.due(5000.0) == [] and tally.shed == 6


def test_shutdown_records_an_open_window():
    tally = RefusalTally()
    tally.add("globex", "m", OVERLOADED, "r", 1, 10.0)
    assert [r.count for r in tally.due(11.0, force=True)] == [1]
