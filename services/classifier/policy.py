"""Workload classification: pure logic from tenant policy, request labels and the model catalog."""

from __future__ import annotations

from din.shared.catalog import ModelCatalog, ModelEntry
from din.shared.contracts.job import JobV1, WorkloadClassV1
from din.shared.topology import TenantSpec, Topology

SIZE_CLASSES = ((16 * 1024, "small"), (256 * 1024, "medium"))


def size_class(input_bytes: int) -> str:
    for limit, name in SIZE_CLASSES:
        if input_bytes < limit:
            return name
    return "large"


class WorkloadPolicy:
    """Classifies jobs of the topology's tenants against the catalog."""

    def __init__(self, topology: Topology, catalog: ModelCatalog, sensitive_labels: list[str]) -> None:
        self._topology = topology
        self._tenants = {t.name: t for t in topology.tenants}
        self._catalog = catalog
        self._sensitive = {label.lower() for label in sensitive_labels}

    def classify(self, job: JobV1, input_bytes: int) -> WorkloadClassV1:
        tenant = self._tenants[job.tenant]
        sensitive = tenant.always_sensitive or any(label.lower() in self._sensitive for label in job.labels)
        variants = self._catalog.variants(job.model)
        stages = self.cascade_stages(job)
        if stages is not None:
            candidates = [stages[0]]
        elif job.model_version is None and job.allow_degrade:
            floor = job.min_accuracy
            candidates = [
                v.name for v in variants
                if v.name == job.model or ((floor is None or (v.accuracy or 0.0) >= floor) and self.may_call(tenant, v))
            ]
        else:
            candidates = [job.model]
        return WorkloadClassV1(
            task=variants[0].task,
            sla_class=job.sla_class,
            input_bytes=input_bytes,
            size_class=size_class(input_bytes),
            sensitive=sensitive,
            allowed_sites=self._topology.allowed_sites(tenant.name, sensitive),
            candidates=candidates,
        )

    @staticmethod
    def may_call(tenant: TenantSpec, entry: ModelEntry) -> bool:
        """Whether the tenant may be served by ``entry`` (degraded to it, or cascaded to it)."""
        return not entry.internal and (tenant.models is None or entry.name in tenant.models)

    def cascade_stages(self, job: JobV1) -> tuple[str, str] | None:
        """For a cascade job, its (small, large) variants: the least and the most accurate of the model's task.

        None when the job asks for no cascade or its model has no other variant.
        """
        if job.cascade_threshold is None and job.cascade_target_rate is None:
            return None
        tenant = self._tenants[job.tenant]
        variants = [v for v in self._catalog.variants(job.model) if self.may_call(tenant, v)]
        if len(variants) < 2:
            return None
        by_accuracy = sorted(variants, key=lambda v: v.accuracy or 0.0)
        return by_accuracy[0].name, by_accuracy[-1].name
