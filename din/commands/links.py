"""``din links``: show, change, cut and restore the WAN links of the running stack (through Toxiproxy)."""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

from pydantic import ValidationError

from din.shared.topology import MAX_LOSS_PERCENT, LinkConditions, Topology, load_topology
from din.stack.launcher import (
    DEFAULT_DIN_DIR,
    DEFAULT_TOPOLOGY,
    STATE_FILE_NAME,
    PortPlan,
    format_table,
    read_state,
    stack_wan_links,
)
from din.stack.processes import StackError
from din.stack.wan import LOOPBACK, ToxiproxyClient, WanLink, conditions_of

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$")
NO_CAP = ("none", "unlimited", "off")


def parse_duration_ms(value: str) -> int:
    """``50ms``, ``0.05s`` or ``50`` (milliseconds) as whole milliseconds."""
    match = _DURATION.match(value)
    if not match:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration: write e.g. 50ms or 0.05s")
    number, unit = float(match.group(1)), match.group(2) or "ms"
    return round(number * 1000 if unit == "s" else number)


def parse_bandwidth(value: str) -> int | None:
    """Kilobytes per second, or ``none`` for no cap."""
    if value.strip().lower() in NO_CAP:
        return None
    try:
        rate = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a bandwidth: KB/s as a whole number, or none") from None
    if rate < 1:
        raise argparse.ArgumentTypeError("bandwidth must be at least 1 KB/s (or none for no cap)")
    return rate


def parse_loss(value: str) -> float:
    """A share of segments lost, in percent: ``0.5``, ``0.5%`` or ``0``."""
    try:
        percent = float(value.strip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a loss: write a percent, e.g. 0.5 or 0.5%") from None
    if not 0 <= percent <= MAX_LOSS_PERCENT:
        raise argparse.ArgumentTypeError(
            f"loss must be between 0 and {MAX_LOSS_PERCENT:g} % (to stop all traffic, `din links cut` the link)"
        )
    return percent


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``links`` with its actions ``set``, ``cut``, ``restore`` and ``apply`` (none: show)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--din-dir", type=Path, default=DEFAULT_DIN_DIR, help=f"folder holding stack.json (default: {DEFAULT_DIN_DIR})"
    )
    common.add_argument(
        "--toxiproxy", metavar="URL", default=None,
        help="Toxiproxy API to use, not the one of the stack in --din-dir (e.g. http://toxiproxy:8474 in compose)",
    )
    # Actions take these too, without a default that would override one given before the action.
    action_common = argparse.ArgumentParser(add_help=False)
    action_common.add_argument("--din-dir", type=Path, default=argparse.SUPPRESS, help="as for `din links`")
    action_common.add_argument("--toxiproxy", metavar="URL", default=argparse.SUPPRESS, help="as for `din links`")
    links = subparsers.add_parser(
        "links", parents=[common], help="show or change the running stack's WAN links",
        description="Each edge site's leaf server reaches the hub through a Toxiproxy proxy named after the site. "
        "Latency, jitter and loss apply to each direction, so a request-reply across a link pays twice the latency. "
        "A lost segment is retransmitted (TCP), never lost: the stream behind it waits.",
    )
    links.set_defaults(handler=cmd_links_show)
    actions = links.add_subparsers(dest="action", metavar="ACTION")
    change = actions.add_parser("set", parents=[action_common], help="change a link's conditions")
    change.add_argument("site", help="the edge site whose link to the hub to change")
    change.add_argument("--latency", type=parse_duration_ms, help="one-way delay, e.g. 50ms")
    change.add_argument("--jitter", type=parse_duration_ms, help="delay varies by up to this much either way")
    change.add_argument("--bandwidth", type=parse_bandwidth, default=..., help="cap per direction in KB/s, or none")
    change.add_argument(
        "--loss", type=parse_loss,
        help="percent of TCP segments lost each way, e.g. 0.5; each is retransmitted, stalling the stream behind it "
        "(one round trip, or the retransmission timeout of at least 200 ms when nothing follows)",
    )
    change.set_defaults(handler=cmd_links_set)
    cut = actions.add_parser("cut", parents=[action_common], help="cut a link: its leaf disconnects until restored")
    cut.add_argument("site")
    cut.set_defaults(handler=cmd_links_cut)
    restore = actions.add_parser("restore", parents=[action_common], help="restore a cut link")
    restore.add_argument("site")
    restore.set_defaults(handler=cmd_links_restore)
    apply = actions.add_parser(
        "apply", parents=[action_common], help="create every edge site's link proxy with the topology's conditions",
        description="What `din up` does once its toxiproxy listens, for a toxiproxy started elsewhere (the compose "
        "file's links-init step): one proxy per edge site, listening on the port `din up` gives it, to the hub's "
        "leafnode port, with the topology's latency, jitter, bandwidth and loss. Existing proxies are replaced.",
    )
    apply.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY, help="topology file (default: %(default)s)")
    apply.add_argument("--listen-host", default=LOOPBACK, help="address the proxies listen on (default: %(default)s)")
    apply.add_argument("--hub-host", default=LOOPBACK, help="host of the hub's leafnode port (default: %(default)s)")
    apply.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for toxiproxy to answer")
    apply.set_defaults(handler=cmd_links_apply)


def topology_links(topology: Topology, *, listen_host: str = LOOPBACK, hub_host: str = LOOPBACK) -> list[WanLink]:
    """Every edge site's link to the hub's (first) server on ``din up``'s default ports, with the given hosts."""
    return [replace(link, listen_host=listen_host, upstream_host=hub_host)
            for link in stack_wan_links(topology, PortPlan()) if link.server == 1]


def toxiproxy_of(din_dir: Path, url: str | None = None) -> tuple[dict, ToxiproxyClient]:
    """The running stack's state and a client of its toxiproxy (or of ``url``, state then empty); a clear error
    when there is none."""
    if url:
        return {}, ToxiproxyClient(url)
    state = read_state(Path(din_dir) / STATE_FILE_NAME)
    if state is None:
        raise StackError("no stack running: start one with `din up`")
    url = (state.get("urls") or {}).get("toxiproxy")
    if not url:
        raise StackError("the running stack has no WAN links (it was started with --no-wan)")
    return state, ToxiproxyClient(url)


def links_table(state: dict, client: ToxiproxyClient) -> str:
    """A table of every link of ``state``: path, current conditions, up or cut."""
    proxies = client.proxies()
    rows = []
    listed = state.get("links") or [
        {"site": name, "hub": proxy.get("upstream", "-"), "path": "-", "listen": proxy.get("listen", "-")}
        for name, proxy in sorted(proxies.items())
    ]
    for link in listed:
        proxy = proxies.get(link["site"])
        if proxy is None:
            rows.append([link["site"], link["hub"], link["path"], "-", "-", "-", "-", "MISSING", link["listen"]])
            continue
        shown = conditions_of(proxy.get("toxics") or [])
        bandwidth = f"{shown.bandwidth_kb_s} KB/s" if shown.bandwidth_kb_s else "no cap"
        rows.append([
            link["site"], link["hub"], link["path"], f"{shown.latency_ms} ms", f"±{shown.jitter_ms} ms", bandwidth,
            f"{shown.loss_percent:g} %", "up" if proxy.get("enabled") else "CUT", link["listen"],
        ])
    headers = ["LINK", "TO", "PATH", "LATENCY", "JITTER", "BANDWIDTH", "LOSS", "STATE", "PROXY"]
    return format_table(headers, rows)


def cmd_links_show(args: argparse.Namespace) -> int:
    state, client = toxiproxy_of(args.din_dir, args.toxiproxy)
    print(links_table(state, client))
    return 0


def cmd_links_set(args: argparse.Namespace) -> int:
    _, client = toxiproxy_of(args.din_dir, args.toxiproxy)
    current = client.conditions(args.site)
    given = {"latency_ms": args.latency, "jitter_ms": args.jitter, "loss_percent": args.loss}
    changes = {k: v for k, v in given.items() if v is not None}
    if args.bandwidth is not ...:
        changes["bandwidth_kb_s"] = args.bandwidth
    if not changes:
        raise StackError("nothing to change: pass --latency, --jitter, --bandwidth or --loss")
    try:
        wanted = LinkConditions.model_validate(current.model_dump() | changes)
    except ValidationError as exc:
        raise StackError(f"link {args.site}: {exc.errors()[0]['msg']}") from None
    client.set_conditions(args.site, wanted)
    print(f"link {args.site}: {describe(wanted)}")
    return 0


def cmd_links_cut(args: argparse.Namespace) -> int:
    _, client = toxiproxy_of(args.din_dir, args.toxiproxy)
    client.set_enabled(args.site, False)
    print(f"link {args.site} cut: its leaf server is disconnected from the hub until `din links restore {args.site}`")
    return 0


def cmd_links_restore(args: argparse.Namespace) -> int:
    _, client = toxiproxy_of(args.din_dir, args.toxiproxy)
    client.set_enabled(args.site, True)
    print(f"link {args.site} restored: its leaf server reconnects within a few seconds")
    return 0


def cmd_links_apply(args: argparse.Namespace) -> int:
    if not args.toxiproxy:
        raise StackError("pass --toxiproxy URL: `din up` applies the topology's links itself")
    links = topology_links(load_topology(args.topology), listen_host=args.listen_host, hub_host=args.hub_host)
    client = ToxiproxyClient(args.toxiproxy)
    client.wait_ready(args.timeout)
    client.populate(links)
    for link in links:
        print(f"link {link.site} ({link.path}, {link.proxy['listen']} -> {link.proxy['upstream']}): "
              f"{describe(link.conditions)}")
    return 0


def describe(conditions: LinkConditions) -> str:
    """``40 ms ± 10 ms one way, no bandwidth cap, 0.1 % loss (retransmitted after 80 ms or 280 ms)``."""
    cap = f"{conditions.bandwidth_kb_s} KB/s" if conditions.bandwidth_kb_s else "no bandwidth cap"
    loss = (
        f"{conditions.loss_percent:g} % loss (retransmitted after {conditions.round_trip_ms} ms or "
        f"{conditions.retransmit_timeout_ms} ms)" if conditions.loss_percent else "no loss"
    )
    return f"{conditions.latency_ms} ms ± {conditions.jitter_ms} ms one way, {cap}, {loss}"
