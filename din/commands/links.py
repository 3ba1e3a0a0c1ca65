"""``din links``: show, change, cut and restore the WAN links of the running stack (through Toxiproxy)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from pydantic import ValidationError

from din.stack.launcher import DEFAULT_DIN_DIR, STATE_FILE_NAME, format_table, read_state
from din.stack.processes import StackError
from din.stack.wan import ToxiproxyClient, conditions_of
from shared.topology import LinkConditions

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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``links`` with its actions ``set``, ``cut`` and ``restore`` (none: show)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--din-dir", type=Path, default=DEFAULT_DIN_DIR, help=f"folder holding stack.json (default: {DEFAULT_DIN_DIR})"
    )
    # Actions take --din-dir too, without a default that would override one given before the action.
    action_common = argparse.ArgumentParser(add_help=False)
    action_common.add_argument("--din-dir", type=Path, default=argparse.SUPPRESS, help="as for `din links`")
    links = subparsers.add_parser(
        "links", parents=[common], help="show or change the running stack's WAN links",
        description="Each edge site's leaf server reaches the hub through a Toxiproxy proxy named after the site. "
        "Latency and jitter apply to each direction, so a request-reply across a link pays twice the latency.",
    )
    links.set_defaults(handler=cmd_links_show)
    actions = links.add_subparsers(dest="action", metavar="ACTION")
    change = actions.add_parser("set", parents=[action_common], help="change a link's conditions")
    change.add_argument("site", help="the edge site whose link to the hub to change")
    change.add_argument("--latency", type=parse_duration_ms, help="one-way delay, e.g. 50ms")
    change.add_argument("--jitter", type=parse_duration_ms, help="delay varies by up to this much either way")
    change.add_argument("--bandwidth", type=parse_bandwidth, default=..., help="cap per direction in KB/s, or none")
    change.set_defaults(handler=cmd_links_set)
    cut = actions.add_parser("cut", parents=[action_common], help="cut a link: its leaf disconnects until restored")
    cut.add_argument("site")
    cut.set_defaults(handler=cmd_links_cut)
    restore = actions.add_parser("restore", parents=[action_common], help="restore a cut link")
    restore.add_argument("site")
    restore.set_defaults(handler=cmd_links_restore)


def toxiproxy_of(din_dir: Path) -> tuple[dict, ToxiproxyClient]:
    """The running stack's state and a client of its toxiproxy; a clear error when there is none."""
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
    for link in state.get("links", []):
        proxy = proxies.get(link["site"])
        if proxy is None:
            rows.append([link["site"], link["hub"], link["path"], "-", "-", "-", "MISSING", link["listen"]])
            continue
        shown = conditions_of(proxy.get("toxics") or [])
        bandwidth = f"{shown.bandwidth_kb_s} KB/s" if shown.bandwidth_kb_s else "no cap"
        rows.append([
            link["site"], link["hub"], link["path"], f"{shown.latency_ms} ms", f"±{shown.jitter_ms} ms", bandwidth,
            "up" if proxy.get("enabled") else "CUT", link["listen"],
        ])
    headers = ["LINK", "TO", "PATH", "LATENCY", "JITTER", "BANDWIDTH", "STATE", "PROXY"]
    return format_table(headers, rows)


def cmd_links_show(args: argparse.Namespace) -> int:
    state, client = toxiproxy_of(args.din_dir)
    print(links_table(state, client))
    return 0


def cmd_links_set(args: argparse.Namespace) -> int:
    _, client = toxiproxy_of(args.din_dir)
    current = client.conditions(args.site)
    given = {"latency_ms": args.latency, "jitter_ms": args.jitter}
    changes = {k: v for k, v in given.items() if v is not None}
    if args.bandwidth is not ...:
        changes["bandwidth_kb_s"] = args.bandwidth
    if not changes:
        raise StackError("nothing to change: pass --latency, --jitter or --bandwidth")
    try:
        wanted = LinkConditions.model_validate(current.model_dump() | changes)
    except ValidationError as exc:
        raise StackError(f"link {args.site}: {exc.errors()[0]['msg']}") from None
    client.set_conditions(args.site, wanted)
    print(f"link {args.site}: {describe(wanted)}")
    return 0


def cmd_links_cut(args: argparse.Namespace) -> int:
    _, client = toxiproxy_of(args.din_dir)
    client.set_enabled(args.site, False)
    print(f"link {args.site} cut: its leaf server is disconnected from the hub until `din links restore {args.site}`")
    return 0


def cmd_links_restore(args: argparse.Namespace) -> int:
    _, client = toxiproxy_of(args.din_dir)
    client.set_enabled(args.site, True)
    print(f"link {args.site} restored: its leaf server reconnects within a few seconds")
    return 0


def describe(conditions: LinkConditions) -> str:
    """``40 ms ± 10 ms, no cap``."""
    cap = f"{conditions.bandwidth_kb_s} KB/s" if conditions.bandwidth_kb_s else "no bandwidth cap"
    return f"{conditions.latency_ms} ms ± {conditions.jitter_ms} ms one way, {cap}"
