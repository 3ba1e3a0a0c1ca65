"""``din token``: a signed token for a tenant of the running stack, for clients such as the nats CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

from din.stack.launcher import DEFAULT_DIN_DIR, STATE_FILE_NAME, read_state, state_nats
from din.stack.processes import StackError
from shared.bus.permissions import tenant_user
from shared.credentials import issue_token, read_credentials
from shared.security import PrincipalKeys, key_file, tenant_principal


def register(subparsers: argparse._SubParsersAction) -> None:
    token = subparsers.add_parser("token", help="print a signed token for a tenant of the running stack")
    token.add_argument("--tenant", required=True)
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds the token stays valid")
    token.add_argument("--din-dir", type=Path, default=DEFAULT_DIN_DIR)
    token.set_defaults(handler=cmd_token)


def running_credentials(din_dir: Path) -> tuple[dict, dict[str, str]]:
    """The running stack's state and its tenants' secrets."""
    state = read_state(din_dir / STATE_FILE_NAME)
    if state is None:
        raise StackError("no stack is running: start one with `din up --detach`")
    return state, read_credentials(Path(state["run_dir"]) / "credentials.json")


def running_tenant(din_dir: Path, tenant: str, site: str | None = None
                   ) -> tuple[str, str, PrincipalKeys | None, dict]:
    """The NATS URL of ``site`` (the hub's when None), a fresh token, the key material of ``tenant`` in the
    running stack and the connect options of its NATS user there."""
    state, secrets = running_credentials(din_dir)
    url, options = state_nats(state, site, tenant_user(tenant))
    keys_path = key_file(Path(state["run_dir"]) / "keys", tenant_principal(tenant))
    keys = PrincipalKeys.load(keys_path) if keys_path.exists() else None
    token = issue_token(tenant, secrets[tenant]) if tenant in secrets else ""
    return url, token, keys, options


def cmd_token(args: argparse.Namespace) -> int:
    _, secrets = running_credentials(args.din_dir)
    if args.tenant not in secrets:
        raise StackError(f"tenant {args.tenant!r} is not in this network: {', '.join(sorted(secrets))}")
    print(issue_token(args.tenant, secrets[args.tenant], ttl_s=args.ttl))
    return 0
