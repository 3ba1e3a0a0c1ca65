"""Real WAN links on one machine: one ``toxiproxy-server``, one proxy per edge site's leaf connection to the hub.

Each edge site's leaf server dials the hub's leafnode port through its own
proxy (named after the site), whose toxics delay each direction by the link's
latency ± jitter, cap its bandwidth and lose its packets
(``shared.topology.LinkConditions``).

Loss is the ``loss`` toxic of DIN's own Toxiproxy server (``ops/toxiproxy``):
Toxiproxy proxies TCP, where a lost segment is retransmitted, not lost. Each
1460-byte segment is lost with the link's probability; the stream stalls at it
(head-of-line blocking) for one round trip when more data follows it (fast
retransmit) or for the retransmission timeout when it was the last sent (Linux:
round trip + max(4 x variation, 200 ms)), doubling for each lost retransmission.
Cutting a link disables its proxy: the leaf connection closes and cannot
reconnect until the link is restored. The hub must not advertise its leafnode
URLs, or leaves would reconnect around the proxy (``NatsServerSpec``).

``toxiproxy-server`` is ``ops/toxiproxy``: the Go module ``github.com/Shopify/toxiproxy/v2``
at ``TOXIPROXY_VERSION`` with the loss toxic, built by ``ops/setup.sh`` into ``.din/bin``.
Toxiproxy itself is the record of each link's current conditions: ``din links``
reads them back from its HTTP API.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from din.shared.topology import LinkConditions, Topology
from din.stack.processes import LOCAL_BIN, ManagedProcess, StackError, local_tool

TOXIPROXY_VERSION = "v2.12.0"
"""Pinned Toxiproxy release; ``ops/setup.sh`` installs this one."""

DEFAULT_TOXIPROXY = LOCAL_BIN / "toxiproxy-server"
STREAMS = ("upstream", "downstream")
LOOPBACK = "127.0.0.1"
LOSS_TOXIC = "loss"
"""The toxic type ``ops/toxiproxy`` registers; a stock ``toxiproxy-server`` refuses it."""


def toxiproxy_binary() -> str:
    """Path of ``toxiproxy-server``: ``.din/bin`` first, then ``PATH``."""
    return local_tool(DEFAULT_TOXIPROXY.name, f"run `bash ops/setup.sh` (it builds Toxiproxy {TOXIPROXY_VERSION} with "
                      "the loss toxic from ops/toxiproxy), or pass --no-wan for plain loopback links")


@dataclass(frozen=True)
class WanLink:
    """The proxy an edge site's leaf server reaches the hub (server ``server`` of a clustered hub) through."""

    site: str
    hub: str
    path: str
    listen_port: int
    upstream_port: int
    conditions: LinkConditions
    server: int = 1
    listen_host: str = LOOPBACK
    upstream_host: str = LOOPBACK

    @property
    def name(self) -> str:
        """The proxy's name: the site, ``<site>.<server>`` for a clustered hub's later servers (``link_proxies``)."""
        return self.site if self.server == 1 else f"{self.site}.{self.server}"

    @property
    def proxy(self) -> dict[str, Any]:
        """The proxy as Toxiproxy's API takes it."""
        return {
            "name": self.name,
            "listen": f"{self.listen_host}:{self.listen_port}",
            "upstream": f"{self.upstream_host}:{self.upstream_port}",
            "enabled": True,
        }


def wan_links(topology: Topology, listen_ports: list[int], hub_leaf_port: int) -> list[WanLink]:
    """One link per edge site in topology order, the ``i``-th listening on ``listen_ports[i]``."""
    edges = [s for s in topology.sites if s.role == "edge"]
    hub = topology.hub.name
    out = []
    for site, port in zip(edges, listen_ports, strict=True):
        link = topology.hub_link(site.name)
        out.append(WanLink(site.name, hub, link.path.value, port, hub_leaf_port, link.conditions()))
    return out


def toxics_for(conditions: LinkConditions) -> dict[str, dict[str, Any]]:
    """The toxics that give a proxy ``conditions``, by toxic name, applied to both directions."""
    toxics: dict[str, dict[str, Any]] = {}
    for stream in STREAMS:
        if conditions.latency_ms or conditions.jitter_ms:
            toxics[f"latency_{stream}"] = {
                "type": "latency",
                "attributes": {"latency": conditions.latency_ms, "jitter": conditions.jitter_ms},
            }
        if conditions.bandwidth_kb_s is not None:
            toxics[f"bandwidth_{stream}"] = {"type": "bandwidth", "attributes": {"rate": conditions.bandwidth_kb_s}}
        if conditions.loss_percent:
            toxics[f"loss_{stream}"] = {"type": LOSS_TOXIC, "attributes": {
                "percent": conditions.loss_percent, "rtt": conditions.round_trip_ms,
                "rto": conditions.retransmit_timeout_ms,
            }}
    for name, toxic in toxics.items():
        toxic.update(name=name, stream=name.rsplit("_", 1)[1], toxicity=1.0)
    return toxics


def conditions_of(toxics: list[dict[str, Any]]) -> LinkConditions:
    """Read a proxy's conditions back from its toxics (the upstream direction's)."""
    by_name = {t["name"]: t for t in toxics}
    latency = by_name.get("latency_upstream", {}).get("attributes", {})
    bandwidth = by_name.get("bandwidth_upstream", {}).get("attributes", {})
    loss = by_name.get("loss_upstream", {}).get("attributes", {})
    return LinkConditions(
        latency_ms=int(latency.get("latency", 0)),
        jitter_ms=int(latency.get("jitter", 0)),
        bandwidth_kb_s=bandwidth.get("rate"),
        loss_percent=float(loss.get("percent", 0.0)),
    )


class ToxiproxyClient:
    """Toxiproxy's HTTP API: proxies, their toxics, enabling and disabling them."""

    def __init__(self, api_url: str, timeout_s: float = 5.0) -> None:
        self.api_url = api_url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.api_url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            if "invalid toxic type" in detail and LOSS_TOXIC in json.dumps(body):
                raise StackError(
                    f"toxiproxy at {self.api_url} has no {LOSS_TOXIC!r} toxic: it is not DIN's build; run `bash "
                    f"ops/setup.sh` (it builds ops/toxiproxy into {DEFAULT_TOXIPROXY.parent})"
                ) from None
            raise StackError(f"toxiproxy refused {method} {path}: HTTP {exc.code} {detail}") from None
        except OSError as exc:
            raise StackError(
                f"toxiproxy at {self.api_url} does not answer ({exc}): is a stack with WAN links up? (`din status`)"
            ) from None
        return json.loads(raw) if raw.strip() else None

    def version(self) -> str:
        """The server's version; raises ``StackError`` while it does not answer."""
        return str(self._call("GET", "/version"))

    def wait_ready(self, timeout_s: float) -> str:
        """Wait until the server answers (a container just started); its version, or the last ``StackError``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.version()
            except StackError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def proxies(self) -> dict[str, dict[str, Any]]:
        """Every proxy with its toxics, by name."""
        return self._call("GET", "/proxies") or {}

    def proxy(self, name: str) -> dict[str, Any]:
        """One proxy with its toxics; a clear error names the links there are when it is unknown."""
        proxies = self.proxies()
        if name not in proxies:
            known = ", ".join(sorted(proxies)) or "none"
            raise StackError(f"no link {name!r}: the running stack's links are {known}")
        return proxies[name]

    def populate(self, links: list[WanLink]) -> None:
        """Create every link's proxy (replacing any of the same name) and give it the link's conditions."""
        self._call("POST", "/populate", [link.proxy for link in links])
        for link in links:
            self._set_proxy_conditions(link.name, link.conditions)

    def link_proxies(self, name: str) -> list[str]:
        """The proxies of link ``name``: the site's own, and ``<site>.<n>`` to each further hub server."""
        self.proxy(name)
        return [p for p in self.proxies() if p == name or p.startswith(f"{name}.")]

    def set_conditions(self, name: str, conditions: LinkConditions) -> None:
        """Give every proxy of link ``name`` ``conditions``."""
        for proxy in self.link_proxies(name):
            self._set_proxy_conditions(proxy, conditions)

    def _set_proxy_conditions(self, name: str, conditions: LinkConditions) -> None:
        """Make proxy ``name``'s toxics match ``conditions``: update those it keeps, add new, remove the rest."""
        current = {t["name"] for t in self.proxy(name).get("toxics") or []}
        wanted = toxics_for(conditions)
        for toxic_name, toxic in wanted.items():
            if toxic_name in current:
                self._call("PATCH", f"/proxies/{name}/toxics/{toxic_name}", toxic)
            else:
                self._call("POST", f"/proxies/{name}/toxics", toxic)
        for toxic_name in current - set(wanted):
            self._call("DELETE", f"/proxies/{name}/toxics/{toxic_name}")

    def conditions(self, name: str) -> LinkConditions:
        """Proxy ``name``'s current conditions."""
        return conditions_of(self.proxy(name).get("toxics") or [])

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Restore (``True``) or cut (``False``) a link (each of its proxies); cutting closes its connections and
        its listeners."""
        for proxy in self.link_proxies(name):
            self._call("PATCH", f"/proxies/{proxy}", {"enabled": enabled})


@dataclass
class ToxiproxySpec:
    """The one ``toxiproxy-server`` of a stack, its API on loopback."""

    api_port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def process(self, run_dir: Path) -> ManagedProcess:
        return ManagedProcess(
            name="toxiproxy",
            argv=[toxiproxy_binary(), "-host", "127.0.0.1", "-port", str(self.api_port)],
            log_path=run_dir / "logs" / "toxiproxy.log",
        )
