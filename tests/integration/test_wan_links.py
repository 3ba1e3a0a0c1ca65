"""WAN links over the real binaries: nats-server hub and leaves, each leaf reaching the hub through toxiproxy.

A request-reply across a link pays at least twice its one-way latency; ``din links cut`` disconnects the leaf and
stops messages across it; ``din links restore`` brings both back, still through the proxy. A lossy link (DIN's
``loss`` toxic) stalls the stream at each lost segment until its retransmission, but every request is answered,
byte for byte.
"""

from __future__ import annotations

import json
import time
import urllib.request

import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from din.cli import main
from din.shared.naming import Subjects
from din.stack.launcher import PortPlan, Stack
from din.stack.wan import ToxiproxyClient, toxics_for
from tests.support import wait_for

pytestmark = pytest.mark.integration

LATENCY_MS = 30
ECHO = Subjects.probe("cloud")


def leafz(monitor_port: int) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/leafz", timeout=2) as resp:
        return json.loads(resp.read()).get("leafs") or []


@pytest.fixture
def wan_stack(test_topology, tmp_path):
    stack = Stack(test_topology, ports=PortPlan.free(edge_sites=2), din_dir=tmp_path, services=(), kafka=False,
                  wan=True)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


async def answered(nc, subject: str) -> float | None:
    """Seconds one request-reply took, or None when nothing answered."""
    begun = time.perf_counter()
    try:
        await nc.request(subject, b"ping", timeout=1.0)
    except (NoRespondersError, NatsTimeout, TimeoutError):
        return None
    return time.perf_counter() - begun


async def test_link_latency_cut_and_restore(wan_stack, capsys):
    din_dir = ["--din-dir", str(wan_stack.din_dir)]
    factory_link = next(link for link in wan_stack.links if link.site == "factory")
    factory_monitor = next(spec.monitor_port for spec in wan_stack.nats if spec.site == "factory")

    # The leaf dials the proxy, not the hub's leafnode port.
    assert [leaf["port"] for leaf in leafz(factory_monitor)] == [factory_link.listen_port]
    assert factory_link.upstream_port == wan_stack.ports.leafnode

    assert main(["links", "set", "factory", "--latency", f"{LATENCY_MS}ms", "--jitter", "0ms", *din_dir]) == 0
    assert main(["links", *din_dir]) == 0
    table = capsys.readouterr().out
    factory_row = next(line for line in table.splitlines() if line.startswith("factory"))
    assert f"{LATENCY_MS} ms" in factory_row and "up" in factory_row.split()
    assert "internet" in next(line for line in table.splitlines() if line.startswith("branch"))

    hub = await nats.connect(wan_stack.hub_url, **wan_stack.nats_options())
    edge = await nats.connect(wan_stack.nats_urls["factory"], max_reconnect_attempts=-1,
                              **wan_stack.nats_options("factory"))
    try:
        async def echo(msg):
            await msg.respond(msg.data)

        # The hub's probe subject (the factory's leaf lets it out, and the answer in): no service answers it here.
        await hub.subscribe(ECHO, cb=echo)
        await hub.flush()
        await wait_for(lambda: answered(edge, ECHO), 10, "the hub's responder reachable from the factory leaf")

        rtts = [await answered(edge, ECHO) for _ in range(5)]
        assert all(rtt is not None for rtt in rtts), rtts
        assert min(rtts) >= 2 * LATENCY_MS / 1000, f"round trips {rtts} beat twice the {LATENCY_MS} ms latency"

        assert main(["links", "cut", "factory", *din_dir]) == 0
        await wait_for(lambda: not leafz(factory_monitor), 10, "the factory leaf disconnected from the hub")
        assert await answered(edge, ECHO) is None
        assert ToxiproxyClient(wan_stack.toxiproxy.api_url).proxy("factory")["enabled"] is False

        assert main(["links", "restore", "factory", *din_dir]) == 0
        await wait_for(lambda: answered(edge, ECHO), 20, "messages flowing across the restored link")
        assert [leaf["port"] for leaf in leafz(factory_monitor)] == [factory_link.listen_port]
        rtt = await answered(edge, ECHO)
        assert rtt is not None and rtt >= 2 * LATENCY_MS / 1000
    finally:
        await edge.close()
        await hub.close()


def test_links_refuse_an_unknown_site_and_impossible_conditions(wan_stack, capsys):
    din_dir = ["--din-dir", str(wan_stack.din_dir)]
    assert main(["links", "cut", "mars", *din_dir]) == 2
    assert "no link 'mars': the running stack's links are branch, factory" in capsys.readouterr().err
    assert main(["links", "set", "factory", "--latency", "5ms", "--jitter", "9ms", *din_dir]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "jitter_ms 9 exceeds latency_ms 5" in err


def test_plain_loopback_stack_has_no_links(test_topology, tmp_path, capsys):
    stack = Stack(test_topology, ports=PortPlan.free(edge_sites=2), din_dir=tmp_path, services=(), kafka=False)
    with stack:
        assert not stack.links and stack.toxiproxy is None
        assert main(["links", "--din-dir", str(tmp_path)]) == 2
    assert "started with --no-wan" in capsys.readouterr().err


def loss_toxics(client: ToxiproxyClient, site: str) -> dict[str, dict]:
    return {t["name"]: t for t in client.proxy(site).get("toxics") or [] if t["type"] == "loss"}


async def test_lossy_link_stalls_but_answers_every_request(wan_stack, test_topology, capsys):
    din_dir = ["--din-dir", str(wan_stack.din_dir)]
    client = ToxiproxyClient(wan_stack.toxiproxy.api_url)

    # The internet link loses 0.1 % each way by default: the toxic carries the topology's figures and timers.
    internet = test_topology.hub_link("branch").conditions()
    assert internet.loss_percent > 0
    assert loss_toxics(client, "branch") == {
        name: toxic for name, toxic in toxics_for(internet).items() if name.startswith("loss_")
    }
    assert {t["attributes"]["rto"] for t in loss_toxics(client, "branch").values()} == {internet.retransmit_timeout_ms}
    assert loss_toxics(client, "factory") == {}

    assert main(["links", "set", "factory", "--loss", "10%", *din_dir]) == 0
    assert "10 % loss" in capsys.readouterr().out
    factory = loss_toxics(client, "factory")
    assert set(factory) == {"loss_upstream", "loss_downstream"}
    assert {t["attributes"]["percent"] for t in factory.values()} == {10.0}
    assert client.conditions("factory").latency_ms == test_topology.hub_link("factory").conditions().latency_ms
    assert main(["links", *din_dir]) == 0
    assert "10 %" in next(line for line in capsys.readouterr().out.splitlines() if line.startswith("factory"))

    hub = await nats.connect(wan_stack.hub_url, **wan_stack.nats_options())
    edge = await nats.connect(wan_stack.nats_urls["factory"], max_reconnect_attempts=-1,
                              **wan_stack.nats_options("factory"))
    try:
        async def echo(msg):
            await msg.respond(msg.data[::-1])

        await hub.subscribe(ECHO, cb=echo)
        await hub.flush()
        await wait_for(lambda: answered(edge, ECHO), 10, "the hub's responder reachable from the factory leaf")
        # Several segments each way (8 KB), one request at a time: each crosses the lossy link twice.
        sent, correct = 40, 0
        for i in range(sent):
            payload = f"{i:04d}".encode() * 2048
            reply = await edge.request(ECHO, payload, timeout=10)
            correct += reply.data == payload[::-1]
        assert correct == sent
    finally:
        await edge.close()
        await hub.close()

    assert main(["links", "set", "factory", "--loss", "0", *din_dir]) == 0
    assert loss_toxics(client, "factory") == {}
