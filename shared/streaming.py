"""A token stream's chunks put back in order: they may arrive out of order (each hop is its own NATS message)."""

from __future__ import annotations

from din.shared.contracts.inference import StreamChunkV1


class InOrder:
    """Releases stream chunks by sequence number, holding early ones until the gap before them fills."""

    def __init__(self) -> None:
        self.expected = 0
        """The sequence number of the next chunk to release (also: how many were released)."""
        self._early: dict[int, StreamChunkV1] = {}

    def add(self, seq: int, chunk: StreamChunkV1) -> list[StreamChunkV1]:
        """Take chunk number ``seq``; return every chunk that can now go out, in order, ending at a ``done`` one."""
        self._early[seq] = chunk
        ready = []
        while self.expected in self._early:
            released = self._early.pop(self.expected)
            self.expected += 1
            ready.append(released)
            if released.done:
                break
        return ready
