"""``python -m din.probe SUBJECT``: a container healthcheck asking one DIN service instance whether it is ready.

Every service answers its health subject (``Subjects.health(service, instance)``) with a ``HealthV1``; the probe
asks it once over the instance's own site NATS server and exits 0 when the answer says ``ready``, 1 otherwise
(no answer, refused, not ready). It runs inside the service's container, so it reads that container's
``DIN_NATS_URL``, ``DIN_SITE`` and ``DIN_BUS_CA_FILE`` (TLS verified against DIN's CA on a ``tls://`` URL) and
logs in as the ``health-probe`` NATS user (``--creds``), who may only ask health subjects and hear its own
replies. ``docker-compose.yml`` runs it as every DIN service's healthcheck, so ``docker compose up --wait``
returns when the network serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys

PROBE_USER = "health-probe"
"""The NATS user of healthchecks (issued by ``din compose init`` with ``din.compose.probe_permissions``)."""
INBOX_ROOT = "_DIN_INBOX"
"""``shared.bus.permissions.SERVICE_INBOX_ROOT``, spelled out: the probe imports nothing of DIN's (a healthcheck
runs every few seconds in every container, and ``shared.bus`` pulls in the whole security package)."""


def connect_options(url: str, site: str, creds: str | None, ca_file: str | None) -> dict:
    """``shared.bus.connect.nats_options`` for the probe user, without its imports."""
    options: dict = {}
    if creds:
        options["user_credentials"] = creds
        options["inbox_prefix"] = f"{INBOX_ROOT}.{site}.{PROBE_USER}"
    if ca_file and url.startswith("tls://"):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        options["tls"] = context
    return options


async def ask(url: str, subject: str, *, site: str, creds: str | None, ca_file: str | None,
              timeout_s: float) -> tuple[bool, str]:
    """``(ready, why)`` from one request on ``subject``."""
    import nats

    try:
        nc = await nats.connect(url, connect_timeout=timeout_s, allow_reconnect=False, max_reconnect_attempts=0,
                                name=PROBE_USER, **connect_options(url, site, creds, ca_file))
    except Exception as exc:  # noqa: BLE001 - any failure to connect is "not healthy", with its reason
        return False, f"cannot connect to {url}: {exc.__class__.__name__}: {exc}"
    try:
        reply = await nc.request(subject, b"{}", timeout=timeout_s)
        answer = json.loads(reply.data)
    except Exception as exc:  # noqa: BLE001 - no responders, timeout, refusal, garbage: not healthy
        return False, f"no health answer on {subject}: {exc.__class__.__name__}: {exc}"
    finally:
        await nc.close()
    if not isinstance(answer, dict) or answer.get("ready") is not True:
        return False, f"{subject} answered not ready: {answer}"
    return True, f"{subject} ready"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m din.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("subject", help="health subject of the instance, e.g. din.v1.health.admission.factory")
    parser.add_argument("--creds", default=os.environ.get("DIN_PROBE_CREDS"), help="NATS credentials file")
    parser.add_argument("--nats-url", default=os.environ.get("DIN_NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument("--site", default=os.environ.get("DIN_SITE", "cloud"))
    parser.add_argument("--ca-file", default=os.environ.get("DIN_BUS_CA_FILE"))
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for connecting and for the answer")
    args = parser.parse_args(argv)
    ready, why = asyncio.run(ask(args.nats_url, args.subject, site=args.site, creds=args.creds,
                                 ca_file=args.ca_file, timeout_s=args.timeout))
    print(why, file=sys.stdout if ready else sys.stderr)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
