"""The autoscaler's contracts: what it saw of a pool and what it did about it.

Every change to a pool (an executor asked for, ready, failed to start, drained away, replaced) is one
``ScalingDecisionV1`` on ``Topics.SCALING_DECISIONS``, with the reason in words and the signals it acted on, so an
SRE reads the fleet's history next to the traffic that drove it (``din report``) and Prometheus shows each pool's
desired size (``din_pool_desired_executors``, which KEDA scales Kubernetes pools on).
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

AWAITING_EXECUTOR = "awaiting_executor"
"""The reason of a scheduling decision that holds a job while a pool scales from zero (no placement yet): the
autoscaler's cue to start an executor of the job's model."""


class ScalingAction(StrEnum):
    """What the autoscaler did to a pool."""

    SCALE_OUT = "scale_out"
    """It asked its provider for one more executor."""
    STARTED = "started"
    """An executor it asked for reported ready (``cold_start_ms`` says after how long)."""
    START_FAILED = "start_failed"
    """An executor it asked for failed to start, or was not ready in time; it was stopped."""
    SCALE_IN = "scale_in"
    """It asked an executor to drain (finish what it holds, take nothing new) and stop."""
    STOPPED = "stopped"
    """An executor it drained has exited."""
    REPLACED = "replaced"
    """An executor of the pool died unasked; another is asked for in its place."""


class PoolSignalsV1(BaseModel):
    """What the autoscaler saw of a pool's models at its site over its window."""

    completions_per_s: float = Field(description="Jobs of the pool's models completed at the site, per second.")
    busy: float = Field(description="Executors' worth of compute those jobs took (1.0: one executor busy all "
                        "the time), summed over the site's executors of the models.")
    executors: int = Field(description="Executors serving the models at the site (fixed ones and the pool's "
                           "ready ones).")
    queue_wait_ms: float = Field(description="Mean time those jobs waited in an executor's queue, ms.")
    refused_per_s: float = Field(default=0.0, description="Requests for the models refused for want of capacity "
                                 "(overloaded, no eligible executor) anywhere, per second.")
    idle_s: float | None = Field(default=None, description="Seconds since the last job of the models ran at the "
                                 "site or was refused anywhere; None: none seen since the autoscaler started.")


class ScalingDecisionV1(BaseModel):
    """One change to a pool's size, or to one of its executors, and why."""

    site: str = Field(description="Site of the pool.")
    pool: str = Field(description="Pool name.")
    models: list[str] = Field(description="Models the pool's executors serve.")
    action: ScalingAction = Field(description="What was done.")
    executor: str | None = Field(default=None, description="The executor started, stopped or lost, if one.")
    executors_before: int = Field(description="Executors the pool wanted before the change.")
    executors_after: int = Field(description="Executors the pool wants after it (its desired size).")
    burst: bool = Field(default=False, description="True at a burst site (rented capacity).")
    reason: str = Field(description="Why, in words: the rule that fired and the figures it compared.")
    signals: PoolSignalsV1 | None = Field(default=None, description="What the autoscaler saw when it decided.")
    cost_per_hour: float = Field(description="What the network's executors cost per hour after the change "
                                 "(each site's executor_hour_cost times its running executors).")
    cold_start_ms: float | None = Field(default=None, description="``started``: from the request to the provider "
                                        "to the executor answering ready, ms.")
    provider: str = Field(description="The provider that acts on it: local (processes) or kubernetes (KEDA).")
    at_ms: float = Field(description="Epoch ms of the decision.")
