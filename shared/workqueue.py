"""The JetStream work-queue stream of a site (distributed scheduling), defined once for its creators.

Both the scheduler and the site's executors create it when missing, whoever starts first.
"""

from __future__ import annotations

from nats.js.api import RetentionPolicy, StreamConfig

from din.shared.naming import Subjects, work_stream

WORK_MAX_AGE_S = 600.0
"""A job older than this is past any deadline DIN accepts; the stream drops it."""


def work_stream_config(site: str, replicas: int = 1) -> StreamConfig:
    """The stream ``DIN_WORK_<SITE>`` over every model's work subject at ``site``, one consumer per message,
    kept ``replicas`` times (``ServiceSettings.replicas_in``: more than one in a clustered hub's domain)."""
    return StreamConfig(
        name=work_stream(site),
        subjects=[Subjects.work_all(site)],
        retention=RetentionPolicy.WORK_QUEUE,
        max_age=WORK_MAX_AGE_S,
        num_replicas=replicas,
    )
