"""Stream chunks put back in order (``shared.streaming.InOrder``)."""

from din.shared.contracts.inference import StreamChunkV1
from din.shared.streaming import InOrder


def chunk(seq: int, done: bool = False) -> StreamChunkV1:
    return StreamChunkV1(id="r1", seq=seq, text="" if done else "a", done=done)


def test_early_chunks_wait_for_the_gap_and_the_stream_ends_at_done():
    order = InOrder()
    assert order.add(1, chunk(1)) == []
    assert [c.seq for c in order.add(0, chunk(0))] == [0, 1]
    assert [c.seq for c in order.add(3, chunk(3))] == []
    assert [(c.seq, c.done) for c in order.add(2, chunk(2, done=True))] == [(2, True)], "nothing after the end"
    assert order.expected == 3
