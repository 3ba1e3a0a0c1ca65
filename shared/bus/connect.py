"""How a process connects to NATS on a closed bus: its credentials, its inbox prefix, TLS against DIN's CA.

``nats_options`` gives nats-py's ``connect`` keyword arguments, ``broker_options``
FastStream's ``NatsBroker``'s. A process without credentials connects as before
(an ``--insecure`` stack). A NATS URL may list several servers, comma-separated
(a clustered hub); ``nats_servers`` gives them as the list both clients take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from din.shared.bus.nats_auth import creds_user
from din.shared.bus.permissions import inbox_for
from din.shared.bus.tls import client_context


def nats_servers(url: str) -> list[str]:
    """The server URLs of ``url`` (``nats://a:4222,nats://b:4322``: every server of a clustered hub)."""
    return [part.strip() for part in url.split(",") if part.strip()]


def nats_options(url: str, site: str, creds_file: str | Path | None, ca_file: str | Path | None = None) -> dict:
    """nats-py ``connect`` options for user ``creds_file`` at ``site`` (``{}`` without credentials or CA)."""
    options: dict[str, Any] = {}
    if creds_file is not None:
        options["user_credentials"] = str(creds_file)
        options["inbox_prefix"] = inbox_for(creds_user(creds_file), site)
    if ca_file is not None and url.startswith("tls://"):
        options["tls"] = client_context(ca_file)
    return options


def settings_options(settings: Any) -> dict:
    """``nats_options`` of a service's settings (``nats_url``, ``site``, ``nats_creds_file``, ``bus_ca_file``)."""
    return nats_options(settings.nats_url, settings.site, settings.nats_creds_file, settings.bus_ca_file)


def broker_options(settings: Any) -> dict:
    """FastStream ``NatsBroker`` options of a service's settings (TLS goes in as its ``security``)."""
    from faststream.security import BaseSecurity

    options = settings_options(settings)
    tls = options.pop("tls", None)
    if tls is not None:
        options["security"] = BaseSecurity(ssl_context=tls)
    return options
