"""``din nats-env``: the environment the ``nats`` CLI needs to reach the running stack as the operator.

``eval "$(din nats-env)"`` sets ``NATS_URL``, ``NATS_CREDS`` and ``NATS_CA`` (read by the ``nats`` CLI for
``--server``, ``--creds`` and ``--tlsca``), so ``nats micro ls`` lists every service and ``nats sub`` sees the bus;
``--system`` logs in as the system account's user instead, for ``nats server list|report|info``; ``--tenant T``
as tenant T's NATS user, for sending requests as its clients do (``DIN_INBOX_PREFIX`` is then the tenant's inbox
prefix at that site, for ``nats req --inbox-prefix``: the only replies admission sends are into a tenant's own
inboxes).
"""

from __future__ import annotations

import argparse
import shlex

from din.commands.target import add_stack_arguments, nats_of, stack_state
from din.shared.bus.nats_auth import SYSTEM_USER
from din.shared.bus.permissions import OPERATOR_USER, tenant_inbox, tenant_user
from din.shared.bus.tls import CA_CERT
from din.stack.processes import StackError, local_tool

NATS_CLI_VERSION = "v0.5.0"
"""The ``nats`` CLI ``ops/setup.sh`` builds (``github.com/nats-io/natscli/nats``) into ``.din/bin``."""


def nats_cli() -> str:
    """Path of the ``nats`` CLI: ``.din/bin`` first, then ``PATH``."""
    return local_tool("nats", f"run `bash ops/setup.sh` (it builds natscli {NATS_CLI_VERSION}), or "
                      f"`go install github.com/nats-io/natscli/nats@{NATS_CLI_VERSION}`")


def register(subparsers: argparse._SubParsersAction) -> None:
    env = subparsers.add_parser("nats-env", help="print the NATS_URL/NATS_CREDS/NATS_CA exports the nats CLI "
                                                 "needs to reach the running stack (eval \"$(din nats-env)\")")
    env.add_argument("--site", help="connect to this site's server (default: the hub's)")
    who = env.add_mutually_exclusive_group()
    who.add_argument("--system", action="store_true",
                     help="as the system account's user, for `nats server list|report|info`")
    who.add_argument("--tenant", help="as this tenant's NATS user, to send requests as its clients do (also "
                                      "prints DIN_INBOX_PREFIX, for `nats req --inbox-prefix`)")
    add_stack_arguments(env)
    env.set_defaults(handler=cmd_nats_env)


def nats_env(state: dict, site: str | None = None, *, system: bool = False, tenant: str | None = None
             ) -> dict[str, str]:
    """The ``nats`` CLI's environment for the operator (or the system user, ``system``, or ``tenant``'s user) at
    ``site``."""
    user = SYSTEM_USER if system else tenant_user(tenant) if tenant else OPERATOR_USER
    url, options = nats_of(state, site, user)
    env = {"NATS_URL": url}
    if tenant:
        env["DIN_INBOX_PREFIX"] = tenant_inbox(tenant, site or next(iter(state["urls"]["nats"])))
    if "user_credentials" in options:
        env["NATS_CREDS"] = options["user_credentials"]
    elif system:
        raise StackError("this stack runs --insecure: it has no system account (its servers' monitoring port "
                         "answers instead)")
    bus_dir = state.get("bus_dir")
    if bus_dir and url.startswith("tls://"):
        env["NATS_CA"] = f"{bus_dir}/{CA_CERT}"
    return env


def cmd_nats_env(args: argparse.Namespace) -> int:
    state = stack_state(args, args.site)
    for name, value in nats_env(state, args.site, system=args.system, tenant=args.tenant).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0
