"""Replay, what-if and reports over what DIN recorded in Kafka.

* ``reader``: reading a time or offset range of a topic, with clear errors.
* ``recorded``: a window of recorded requests and the events about them.
* ``driver``: re-driving recorded requests against a running stack.
* ``outcomes``: how each request ended, once per request (stage hand-offs apart), and which traffic was replayed.
* ``compare``: a replay against its recording.
* ``whatif``: the scheduler's logic offline, over the facts the live scheduler decided on, under another policy or
  topology.
* ``report``: a recorded window as a self-contained HTML file (``svg`` draws its plots).
"""
