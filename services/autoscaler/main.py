"""The autoscaler's front door: sizes every pool of the topology from the traffic Kafka holds, through a provider.

* **Signals**: completions, admission decisions and scheduling decisions from Kafka (one consumer group,
  records whose signature does not verify are skipped) into a ``TrafficWindow`` (``signals.py``).
* **Every ``scaling.interval_s``**: first the fleet is brought up to date (``fleet.py``): a starting executor
  that answers ready on its health subject is ready (its cold start recorded), one whose process exited or that
  was not ready within ``start_timeout_s`` failed (stopped, and the pool backs off); a ready one that died is
  replaced; a draining one that exited is gone (killed after ``drain_timeout_s``). Then ``policy.size_pools``
  gives each pool its size and the difference is asked of the provider (``providers.py``): starts, or drains
  (an executor asked to stop announces draining, takes nothing new, finishes its queue and exits, so no request
  fails on the way).
* Every change is a ``ScalingDecisionV1`` on ``Topics.SCALING_DECISIONS`` (telemetry turns them into the
  ``din_pool_*`` metrics, KEDA's scaling input on Kubernetes; ``din report`` lists them); health shows each
  pool's ready and wanted executors and the network's executor cost per hour.
* Stopping, the local provider's executors are drained and stopped with it; after a crash they run on and are
  adopted by the next autoscaler.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError

from din.services.autoscaler.fleet import Phase, PoolFleet
from din.services.autoscaler.policy import PoolView, Verdict, size_pools
from din.services.autoscaler.providers import KedaScaled, Liveness, LocalProcesses, Provider, ProviderError
from din.services.autoscaler.settings import AutoscalerSettings, ProviderKind
from din.services.autoscaler.signals import TrafficWindow
from din.shared.bus.kafka import GROUPS, kafka_client_kwargs
from din.shared.contracts.events import AdmissionDecisionV1, CompletionV1, HealthV1, SchedulingDecisionV1
from din.shared.contracts.scaling import PoolSignalsV1, ScalingAction, ScalingDecisionV1
from din.shared.naming import Subjects, Topics
from din.shared.runtime import Service
from din.shared.security import PayloadSecurity
from din.shared.security.records import ForgedRecord, RecordVerifier
from din.shared.topology import load_topology

RECONNECT_S = 2.0
POLL_MS = 500
MAX_RECORDS = 2000
STOP_WAIT_S = 15.0
"""How long a stopping autoscaler waits for its executors to drain and exit."""

FEED = {Topics.COMPLETIONS: CompletionV1, Topics.ADMISSION_DECISIONS: AdmissionDecisionV1,
        Topics.SCHEDULING_DECISIONS: SchedulingDecisionV1}
"""The topics the autoscaler reads, with their contracts."""


def _now_ms() -> float:
    return time.time() * 1000.0


class Autoscaler(Service):
    """Starts and stops pool executors between each pool's min and max, bursting to rented sites when on-prem
    capacity runs out."""

    name = "autoscaler"
    publishes = (Topics.SCALING_DECISIONS,)
    consumes = tuple(FEED)

    def __init__(self, settings: AutoscalerSettings) -> None:
        super().__init__(settings)
        self.topology = load_topology(settings.topology)
        self.spec = self.topology.scaling
        self.security = PayloadSecurity.from_settings(settings)
        self.runtime.sign_with(self.security)
        self.verifier = RecordVerifier.of_agent(self.security.agent) if self.security.enabled else None
        self.window = TrafficWindow(self.spec.window_s)
        self.provider = self._provider(settings)
        self.fleets = {(site.name, pool.name): PoolFleet(site.name, pool, site.burst is not None)
                       for site in self.topology.sites for pool in site.pools}
        self.fixed = {key: sum(1 for e in self.topology.site(key[0]).executors if set(e.models) & set(f.pool.models))
                      for key, f in self.fleets.items()}
        self.topics = {self._scoped(base): model for base, model in FEED.items()}
        self.counts = {"records": 0, "invalid": 0, "decisions": 0, "starts_failed": 0}
        self.consumer_state = "waiting"
        self.last_signals: dict[tuple[str, str], PoolSignalsV1] = {}
        self.scaling: asyncio.Task | None = None
        self.runtime.on_start(self._start_keys)
        self.runtime.on_start(self._start)
        self.runtime.on_drain(self._stop_fleet)
        self.runtime.on_drain(self.security.stop)

    def _provider(self, settings: AutoscalerSettings) -> Provider:
        if settings.provider is ProviderKind.KUBERNETES:
            return KedaScaled()
        if settings.pool_environments is None or settings.state_dir is None:
            raise ValueError("the local provider needs DIN_AUTOSCALER_POOL_ENVIRONMENTS and DIN_AUTOSCALER_STATE_DIR")
        return LocalProcesses.from_file(settings.pool_environments, settings.state_dir, settings.log_dir)

    def _scoped(self, base: str) -> str:
        scope = self.settings.topic_scope
        return Topics.scoped(base, scope) if scope else base

    def detail(self) -> dict[str, object]:
        pools = ",".join(f"{site}/{pool}:{len(f.in_phase(Phase.READY))}/{f.wanted}"
                         for (site, pool), f in sorted(self.fleets.items()))
        seen = ",".join(f"{site}/{pool}:busy={s.busy:g}:wait={s.queue_wait_ms:g}:done={s.completions_per_s:g}"
                        f":refused={s.refused_per_s:g}" for (site, pool), s in sorted(self.last_signals.items()))
        return {**self.counts, "pools": pools, "signals": seen, "provider": self.provider.name,
                "consumer": self.consumer_state,
                "cost_per_hour": round(self.cost_per_hour(), 3), **self.security.detail()}

    def cost_per_hour(self) -> float:
        """Each site's executor_hour_cost times the executors running there (fixed and pool ones)."""
        running = {site.name: len(site.executors) for site in self.topology.sites}
        for fleet in self.fleets.values():
            running[fleet.site] += fleet.running
        return sum(self.topology.site(site).executor_hour_cost * n for site, n in running.items())

    async def _start_keys(self) -> None:
        await self.security.start(self.nc, timeout_s=self.settings.keys_wait_s)

    async def _start(self) -> None:
        now = time.monotonic()
        for executor_id in self.provider.adopted():
            placed = self.topology.pool_of(executor_id)
            if placed is not None:
                self.fleets[(placed[0].name, placed[1].name)].hold(executor_id, Phase.STARTING, now)
                self.log.info("adopted executor %s, still running from before", executor_id)
        self.runtime.spawn(self.follow(), name="follow_traffic")
        self.scaling = self.runtime.spawn(self.scale(), name="scale")

    # ------------------------------------------------------------------ traffic

    async def follow(self) -> None:
        """Consume the traffic topics for ever, reconnecting after a Kafka failure."""
        while True:
            consumer = AIOKafkaConsumer(
                *self.topics, bootstrap_servers=self.settings.kafka_bootstrap,
                group_id=GROUPS["autoscaler"] + (f"-{self.settings.topic_scope}" if self.settings.topic_scope else ""),
                client_id=f"din-autoscaler-{self.runtime.instance}", auto_offset_reset=self.settings.decisions_from,
                enable_auto_commit=True, **kafka_client_kwargs(self.settings))
            try:
                await consumer.start()
                while True:
                    batches = await consumer.getmany(timeout_ms=POLL_MS, max_records=MAX_RECORDS)
                    self.consumer_state = "assigned" if consumer.assignment() else "waiting"
                    for records in batches.values():
                        for record in records:
                            self.take(record.topic, record.value, record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.consumer_state = "reconnecting"
                self.log.warning("traffic consumer stopped (%s); reconnecting", exc)
                await asyncio.sleep(RECONNECT_S)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    def take(self, topic: str, value: bytes | None, record=None) -> None:
        """Feed one record to the window, unless it does not decode or (security on) is not signed by its
        producer."""
        if self.verifier is not None and record is not None:
            try:
                self.verifier.check(record)
            except ForgedRecord:
                self.counts["invalid"] += 1
                return
        try:
            event = self.topics[topic].model_validate_json(value or b"")
        except ValidationError:
            self.counts["invalid"] += 1
            return
        self.counts["records"] += 1
        now = time.monotonic()
        at = now - max(0.0, _now_ms() - event.at_ms) / 1000.0
        if isinstance(event, CompletionV1):
            self.window.completion(event, at)
        elif isinstance(event, AdmissionDecisionV1):
            self.window.admission(event, at)
        else:
            self.window.scheduling(event, at)

    # ------------------------------------------------------------------ scaling

    async def scale(self) -> None:
        """Every interval: bring the fleet up to date, size the pools, ask the provider for the difference."""
        while True:
            try:
                await self.look()
            except Exception:
                self.log.exception("scaling look failed")
            await asyncio.sleep(self.spec.interval_s)

    async def look(self) -> None:
        now = time.monotonic()
        await self.observe_fleet(now)
        views = []
        for key, fleet in self.fleets.items():
            others = [f for k, f in self.fleets.items() if k != key and f.site == fleet.site
                      and set(f.pool.models) & set(fleet.pool.models)]
            beside = self.fixed[key] + sum(f.wanted for f in others)
            ready = self.fixed[key] + sum(len(f.in_phase(Phase.READY)) for f in (fleet, *others))
            signals = self.window.signals(fleet.site, fleet.pool.models, ready, now)
            self.last_signals[key] = signals
            views.append(PoolView(fleet.site, fleet.pool, fleet.burst, fleet.wanted, beside, signals,
                                  fleet.last_out_s, fleet.last_change_s))
        for key, verdict in size_pools(views, self.topology, now).items():
            self.resize(self.fleets[key], verdict, now)

    def resize(self, fleet: PoolFleet, verdict: Verdict, now: float) -> None:
        before = fleet.wanted
        if verdict.size > before and fleet.may_start(now):
            reason = verdict.reason or f"below the pool's min {fleet.pool.min}"
            for _ in range(verdict.size - before):
                executor_id = fleet.free_slot()
                if executor_id is None:
                    break
                try:
                    self.provider.start(executor_id)
                except ProviderError as exc:
                    self.start_failed(fleet, executor_id, str(exc), now)
                    break
                fleet.hold(executor_id, Phase.STARTING, now)
                fleet.last_out_s = fleet.last_change_s = now
                self.record(fleet, ScalingAction.SCALE_OUT, before, reason, executor=executor_id)
                before = fleet.wanted
        elif verdict.size < before:
            reason = verdict.reason or f"above the pool's max {fleet.pool.max}"
            for _ in range(before - verdict.size):
                slot = fleet.to_drain()
                if slot is None:
                    break
                self.provider.stop(slot.executor_id)
                fleet.hold(slot.executor_id, Phase.DRAINING, now)
                fleet.last_change_s = now
                self.record(fleet, ScalingAction.SCALE_IN, before, reason, executor=slot.executor_id)
                before = fleet.wanted

    async def observe_fleet(self, now: float) -> None:
        """Move every held executor on: ready, failed, lost, or gone."""
        held = [(fleet, slot) for fleet in self.fleets.values() for slot in list(fleet.slots.values())]
        liveness = {slot.executor_id: self.provider.liveness(slot.executor_id) for _, slot in held}
        asking = [s.executor_id for _, s in held if s.phase is Phase.STARTING
                  or liveness[s.executor_id] is Liveness.UNKNOWN]
        answers = await asyncio.gather(*(self.ready(executor_id) for executor_id in asking))
        ready = {executor_id for executor_id, ok in zip(asking, answers, strict=True) if ok}
        for fleet, slot in held:
            alive = liveness[slot.executor_id]
            if slot.phase is Phase.STARTING:
                if alive is Liveness.EXITED:
                    self.start_failed(fleet, slot.executor_id, "its process exited before it was ready", now)
                elif slot.executor_id in ready:
                    fleet.hold(slot.executor_id, Phase.READY, now)
                    fleet.failures = 0
                    self.record(fleet, ScalingAction.STARTED, fleet.wanted, "ready",
                                executor=slot.executor_id, cold_start_ms=round((now - slot.since_s) * 1000.0, 1))
                elif now - slot.since_s > self.spec.start_timeout_s:
                    self.provider.kill(slot.executor_id)
                    self.start_failed(fleet, slot.executor_id,
                                      f"not ready within start_timeout_s {self.spec.start_timeout_s:g}", now)
            elif slot.phase is Phase.READY and (alive is Liveness.EXITED or (alive is Liveness.UNKNOWN
                                                                           and slot.executor_id not in ready)):
                fleet.release(slot.executor_id)
                self.record(fleet, ScalingAction.REPLACED, fleet.wanted + 1,
                            "it died without being asked; the next look starts another", executor=slot.executor_id)
            elif slot.phase is Phase.DRAINING:
                overdue = now - slot.since_s > self.settings.drain_timeout_s
                if alive is Liveness.EXITED or alive is Liveness.UNKNOWN or overdue:
                    if overdue and alive is Liveness.RUNNING:
                        self.provider.kill(slot.executor_id)
                    fleet.release(slot.executor_id)
                    self.record(fleet, ScalingAction.STOPPED, fleet.wanted,
                                "killed: still running after drain_timeout_s" if overdue else "drained and exited",
                                executor=slot.executor_id)

    async def ready(self, executor_id: str) -> bool:
        """Whether ``executor_id`` answers its health subject ready."""
        try:
            reply = await self.nc.request(Subjects.health("executor", executor_id), b"",
                                          timeout=self.settings.health_timeout_s)
            return HealthV1.model_validate_json(reply.data).ready
        except Exception:
            return False

    def start_failed(self, fleet: PoolFleet, executor_id: str, why: str, now: float) -> None:
        fleet.release(executor_id)
        fleet.start_failed(now, self.spec.scale_out_cooldown_s)
        self.counts["starts_failed"] += 1
        self.record(fleet, ScalingAction.START_FAILED, fleet.wanted + 1,
                    f"{why}; next try in {fleet.retry_at_s - now:.0f} s", executor=executor_id)

    def record(self, fleet: PoolFleet, action: ScalingAction, before: int, reason: str, *,
               executor: str | None = None, cold_start_ms: float | None = None) -> None:
        decision = ScalingDecisionV1(
            site=fleet.site, pool=fleet.pool.name, models=list(fleet.pool.models), action=action, executor=executor,
            executors_before=before, executors_after=fleet.wanted, burst=fleet.burst, reason=reason,
            signals=self.last_signals.get(fleet.key), cost_per_hour=round(self.cost_per_hour(), 3),
            cold_start_ms=cold_start_ms, provider=self.provider.name, at_ms=_now_ms())
        self.counts["decisions"] += 1
        self.log.info("%s/%s %s %s: %s (%d -> %d)", fleet.site, fleet.pool.name, action.value, executor or "",
                      reason, before, fleet.wanted)
        self.runtime.events.emit(Topics.SCALING_DECISIONS, decision, key=fleet.site)

    async def _stop_fleet(self) -> None:
        """Stop sizing, then drain and stop the executors this autoscaler runs (local provider), waiting up to
        ``STOP_WAIT_S``."""
        if self.scaling is not None:
            self.scaling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.scaling
        if not isinstance(self.provider, LocalProcesses):
            return
        running = self.provider.running()
        self.provider.stop_all()
        deadline = time.monotonic() + STOP_WAIT_S
        while running and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            running = [e for e in running if self.provider.liveness(e) is Liveness.RUNNING]
        for executor_id in running:
            self.provider.kill(executor_id)
