"""``din token``: a tenant's signed token of the running stack (or of one named by ``--keys-dir``, such as a
docker compose stack), for the HTTP gateway's ``Authorization: Bearer``; with ``--model`` and ``--request-id``, the
short-lived proof of one request made from it, for clients such as the nats CLI (``Din-Token`` and
``Din-Request-Id`` headers)."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.commands.target import add_stack_arguments, credentials_of, keys_dir_of, nats_of, stack_state
from din.shared.bus.permissions import tenant_user
from din.shared.credentials import issue_token, read_credentials, request_proof
from din.shared.security import PrincipalKeys, key_file, tenant_principal
from din.stack.processes import StackError


def register(subparsers: argparse._SubParsersAction) -> None:
    token = subparsers.add_parser("token", help="print a tenant's signed token, or one request's proof made from it")
    token.add_argument("--tenant", required=True)
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds the token stays valid")
    token.add_argument("--model", help="print the proof for one request of this model (with --request-id)")
    token.add_argument("--request-id", help="the id the request will carry (its Din-Request-Id header)")
    token.add_argument("--reply", help="bind the proof to this reply subject too (else any reply)")
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
    if (args.model is None) != (args.request_id is None):
        raise StackError("a request's proof needs both --model and --request-id")
    token = issue_token(args.tenant, secrets[args.tenant], ttl_s=args.ttl)
    print(token if args.model is None else request_proof(token, args.model, args.request_id, args.reply))
    return 0
