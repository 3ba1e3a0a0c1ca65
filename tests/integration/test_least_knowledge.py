"""Least knowledge over the real brokers (issue 13, item 4): a compromised site's keys open only what it serves.

The attacker holds the factory's key file (its identity and every data key the key manager gives it) and the
operator's NATS login at every site, so it sees every message that crosses any server. Tenants' clients send
ordinary requests (served at cloud or branch) and ``pii`` ones (acme's, confined to the factory) side by side,
from the hub and from the factory. Every sealed message seen is tried with the factory's keys: only what entered
at the factory or was served there opens; no answer opens (each is sealed to its client's answer key), nor any
request, job, hand-off or hand-back of the rest. Twice: with the edges only executing (one control plane, at the
hub; the factory then holds no tenant's key at all) and with a control plane per site. Every request is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter

import nats
import pytest

from din.client import DinClient
from din.shared.bus.permissions import tenant_user
from din.shared.envelope import H_AAD, H_KEY_VERSION, H_READER, PAIR_KEY_VERSION, InvalidToken
from din.shared.security import (
    ANSWER_READER,
    KeyAgent,
    PayloadSecurity,
    PrincipalKeys,
    is_sealed,
    key_file,
    site_principal,
)
from tests.integration.network import running_network
from tests.support import three_site_topology

pytestmark = pytest.mark.integration

MODEL = "digits-small"
FACTORY = site_principal("factory")


def topology(control_plane: str) -> dict:
    spec = three_site_topology(
        f"least-knowledge-{control_plane}",
        {site: [{"id": f"{site}-1", "models": [MODEL]}] for site in ("cloud", "factory", "branch")},
        [{"name": "acme", "sensitive_sites": ["factory"], "rate_per_s": 5000, "burst": 5000},
         {"name": "globex", "rate_per_s": 5000, "burst": 5000}],
    )
    spec["control_plane"] = control_plane
    return spec


@pytest.fixture(scope="module", params=["hub", "per-site"])
def network(request, kafka_access, zoo_dir, tmp_path_factory):
    with running_network(kafka_access, zoo_dir, tmp_path_factory.mktemp("din"), "centralized",
                         topology_spec=topology(request.param)) as net:
        yield net


@contextlib.asynccontextmanager
async def at_factory(network, tenant: str):
    """A client of ``tenant`` connected at the factory's own server."""
    client = await DinClient.connect(network.stack.nats_urls["factory"], tenant, network.token(tenant),
                                     network.keys(tenant), site="factory",
                                     options=network.stack.nats_options("factory", tenant_user(tenant)))
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def everything_seen(network):
    """Every sealed message crossing any site's server, as the operator's login there sees it."""
    seen: list[tuple[str, bytes, dict[str, str]]] = []
    connections = []

    async def keep(msg) -> None:
        if is_sealed(msg.headers):
            seen.append((msg.subject, msg.data, dict(msg.headers)))

    try:
        for site, url in network.stack.nats_urls.items():
            nc = await nats.connect(url, **network.stack.nats_options(site))
            await nc.subscribe(">", cb=keep)
            await nc.flush()
            connections.append(nc)
        yield seen
    finally:
        for nc in connections:
            await nc.close()


def factory_opens(factory: PayloadSecurity, body: bytes, headers: dict[str, str]) -> bool:
    """Whether the factory's keys open this message, any way they could."""
    try:
        if headers.get(H_KEY_VERSION) == PAIR_KEY_VERSION:
            factory.open_to_me(body, headers, senders=lambda sender: True, replay=False, allow_integrity=True)
        else:
            factory.open(body, headers, reader=headers.get(H_READER, ""), replay=False, allow_integrity=True)
    except InvalidToken:
        return False
    return True


async def test_a_compromised_sites_keys_open_only_what_entered_or_was_served_there(network, digits):
    x, _ = digits
    nc = await nats.connect(network.stack.nats_urls["factory"], **network.stack.nats_options("factory"))
    factory = PayloadSecurity(KeyAgent(PrincipalKeys.load(key_file(network.stack.keys_dir, FACTORY))))
    await factory.start(nc, readers=lambda agent: [FACTORY])
    executes_only = "factory" not in network.topology.control_sites()
    try:
        if executes_only:
            assert not [r for r in factory.agent.versions() if r.startswith("tenant-")], "it holds a tenant key"
        served_at: dict[str, str] = {}
        entered_at_factory: set[str] = set()
        async with everything_seen(network) as seen, network.client("acme") as acme, \
                network.client("globex") as globex, at_factory(network, "globex") as local:
            async def ask(client, i: int, labels: list[str] | None) -> None:
                result = await client.infer(MODEL, {"input": x[i: i + 1]}, labels=labels)
                assert result.encrypted
                served_at[result.response.id] = result.response.served_by.site
                if client is local:
                    entered_at_factory.add(result.response.id)

            await asyncio.gather(*(ask(acme, i, ["pii"] if i % 2 else None) for i in range(20)),
                                 *(ask(globex, i, None) for i in range(20)),
                                 *(ask(local, i, None) for i in range(10)))
            await asyncio.sleep(0.5)
        sealed = list(seen)
    finally:
        await factory.stop()
        await nc.close()

    assert len(served_at) == 50, "every request answered"
    sites = Counter(served_at.values())
    elsewhere = {rid for rid, site in served_at.items() if site != "factory"} - entered_at_factory
    assert sites["factory"] >= 10 and len(elsewhere) >= 10, sites
    opened, closed = Counter(), Counter()
    for _, body, headers in sealed:
        rid = json.loads(headers[H_AAD]).get("rid", "")
        kind = "answer" if headers.get(H_READER) == ANSWER_READER else "request or job"
        (opened if factory_opens(factory, body, headers) else closed)[(kind, rid in elsewhere)] += 1
    assert opened[("answer", True)] == 0 and opened[("answer", False)] == 0, f"answers opened: {opened}"
    assert opened[("request or job", True)] == 0, f"the factory opened what it neither admitted nor served: {opened}"
    assert opened[("request or job", False)] >= sites["factory"], f"the factory could not open its own jobs: {opened}"
    assert closed[("answer", False)] + closed[("answer", True)] >= 50, closed
    assert closed[("request or job", True)] >= len(elsewhere), closed
