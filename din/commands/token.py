"""``din token``: a signed token for a tenant of the running stack (or of one named by ``--keys-dir``, such as a
docker compose stack), for clients such as the nats CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.commands.target import add_stack_arguments, credentials_of, keys_dir_of, nats_of, stack_state
from din.shared.bus.permissions import tenant_user
from din.shared.credentials import issue_token, read_credentials
from din.shared.security import PrincipalKeys, key_file, tenant_principal
from din.stack.processes import StackError


def register(subparsers: argparse._SubParsersAction) -> None:
    token = subparsers.add_parser("token", help="print a signed token for a tenant of the running stack")
    token.add_argument("--tenant", required=True)
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds the token stays valid")
    add_stack_arguments(token, nats=False)
    token.set_defaults(handler=cmd_token)


def _source_state(source: argparse.Namespace | Path, site: str | None = None) -> dict:
    if isinstance(source, argparse.Namespace):
        return stack_state(source, site)
    return stack_state(argparse.Namespace(din_dir=Path(source)), site)


def running_credentials(source: argparse.Namespace | Path, site: str | None = None
                        ) -> tuple[dict, dict[str, str]]:
    """The state and tenants' secrets of the stack ``source`` names (parsed options, or a ``--din-dir``)."""
    state = _source_state(source, site)
    return state, read_credentials(credentials_of(state))


def running_tenant(source: argparse.Namespace | Path, tenant: str, site: str | None = None
                   ) -> tuple[str, str, PrincipalKeys | None, dict]:
    """The NATS URL of ``site`` (the hub's when None), a fresh token, the key material of ``tenant`` in the
    stack ``source`` names and the connect options of its NATS user there."""
    state, secrets = running_credentials(source, site)
    url, options = nats_of(state, site, tenant_user(tenant))
    keys_path = key_file(keys_dir_of(state), tenant_principal(tenant))
    keys = PrincipalKeys.load(keys_path) if keys_path.exists() else None
    token = issue_token(tenant, secrets[tenant]) if tenant in secrets else ""
    return url, token, keys, options


def cmd_token(args: argparse.Namespace) -> int:
    _, secrets = running_credentials(args)
    if args.tenant not in secrets:
        raise StackError(f"tenant {args.tenant!r} is not in this network: {', '.join(sorted(secrets))}")
    print(issue_token(args.tenant, secrets[args.tenant], ttl_s=args.ttl))
    return 0
